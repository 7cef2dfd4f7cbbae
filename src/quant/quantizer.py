"""Uniform quantizer maths: integer grids, initial intervals, fake quantization.

Symmetric signed grid [-2^(b-1), 2^(b-1) - 1] (the paper's), or unsigned [0, 2^b - 1] for
non-negative tensors (softmax output). One interval Δ per tensor, or per output channel
(axis 0) for weights. Rounding is half to even, as np.round, mindspore.ops.round and ONNX
QuantizeLinear do:

    q = clip(round(x / Δ), qmin, qmax),   x̂ = q · Δ
"""
import ctypes

import numpy as np
from mindspore import ops

from ..models.vit import divide

MIN_BITS, MAX_BITS = 2, 16
EPS = 1e-12


def check_bits(bits, what="bits"):
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{what} is {bits!r}; expected an integer from {MIN_BITS} to {MAX_BITS}")
    return int(bits)


def qrange(bits, signed=True):
    """(qmin, qmax) of the integer grid."""
    check_bits(bits)
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def init_scale(x, bits, signed=True, per_channel=False, combine=None):
    """Max-based interval: max|x| / (2^(b-1) - 1) (signed) or max(x) / (2^b - 1) (unsigned).

    per_channel: one interval per index of axis 0, shape (C, 1, ...) broadcastable to x;
    otherwise shape (1,). Never zero (an all-zero tensor gets a tiny interval). combine: applied
    to the float32 maximum (max over the ranks of a sharded calibration, src/distributed.py)."""
    x = np.asarray(x, dtype=np.float32)
    _, qmax = qrange(bits, signed)
    axes = tuple(range(1, x.ndim)) if per_channel else None
    if signed:
        m = np.abs(x).max(axis=axes, keepdims=per_channel) if x.size else np.float32(0)
    else:
        m = np.maximum(x.max(axis=axes, keepdims=per_channel), 0) if x.size else np.float32(0)
    m = np.asarray(m, np.float32) if combine is None else combine(np.asarray(m, np.float32))
    s = np.maximum(m / qmax, EPS).astype(np.float32)
    return s if per_channel else s.reshape(1)


def percentile_scale(x, bits, percentile, signed=True):
    """Interval from the given percentile of |x| (signed) or of x (unsigned), shape (1,)."""
    x = np.asarray(x, dtype=np.float32).ravel()
    _, qmax = qrange(bits, signed)
    v = np.abs(x) if signed else np.maximum(x, 0)
    m = np.percentile(v, percentile) if v.size else 0.0
    return np.maximum(np.float32(m) / qmax, EPS).astype(np.float32).reshape(1)


def quantize_np(x, scale, bits, signed=True):
    """Integer codes clip(round(x / Δ), qmin, qmax) as int32 (numpy reference)."""
    qmin, qmax = qrange(bits, signed)
    return np.clip(np.round(np.asarray(x, np.float32) / scale), qmin, qmax).astype(np.int32)


KERNEL_MIN_ELEMS = 1 << 14  # fake_quant_np's outputs from this size on take the compiled kernel


def fake_quant_np(x, scale, bits, signed=True, out=None):
    """x̂ = clip(round(x / Δ), qmin, qmax) · Δ in float32 (numpy reference). Large outputs whose
    scale broadcasts as the interval search's candidates do (_fake_quant_kernel) are computed in
    one pass by a compiled kernel, bit for bit as these numpy operations. out: None, or a
    C-contiguous float32 or float64 array of the result's shape to write into (float64: the
    float32 result converted, as .astype(np.float64) gives it); returns the result."""
    qmin, qmax = qrange(bits, signed)
    scale = np.asarray(scale, np.float32)
    x = np.asarray(x, np.float32)
    done = _fake_quant_kernel(x, scale, qmin, qmax, out)
    if done is not None:
        return done
    y = np.divide(x, scale, dtype=np.float32)
    np.round(y, out=y)
    np.clip(y, qmin, qmax, out=y)
    y *= scale
    if out is None:
        return y
    np.copyto(out, y)
    return out


def _fake_quant_layout(x_shape, s_shape):
    """How a scale broadcasts over x in fake_quant_np, as the kernel FakeQuantCandidates takes it:
    (output shape, lead, period, inner) where the output is `lead` candidate axes (x of size 1
    there) followed by x's own axes, over which the scale takes `period` values, each for a run of
    `inner` consecutive elements (one scale: period 1). None for any other broadcast."""
    try:
        out = np.broadcast_shapes(x_shape, s_shape)
    except ValueError:
        return None
    nd = len(out)
    xs = (1,) * (nd - len(x_shape)) + tuple(x_shape)
    ss = (1,) * (nd - len(s_shape)) + tuple(s_shape)
    lead = nd
    while lead > 0 and xs[lead - 1] == out[lead - 1]:
        lead -= 1
    if any(xs[j] != 1 for j in range(lead)):
        return None
    varying = [j for j in range(lead, nd) if ss[j] != 1]
    if not varying:  # one scale per candidate: a single run over all of x
        return out, lead, 1, max(1, int(np.prod(out[lead:], dtype=np.int64)))
    a, b = varying[0], varying[-1] + 1
    if any(ss[j] != out[j] for j in range(a, b)):
        return None
    return out, lead, int(np.prod(out[a:b], dtype=np.int64)), int(np.prod(out[b:], dtype=np.int64))


def _fake_quant_kernel(x, scale, qmin, qmax, out=None):
    """fake_quant_np of float32 x and scale by the compiled FakeQuantCandidates (cpu_ops.cc), into
    `out` when given, or None (a small output, another broadcast, or the kernels off)."""
    if x.size < KERNEL_MIN_ELEMS:
        return None
    layout = _fake_quant_layout(x.shape, scale.shape)
    if layout is None:
        return None
    out_shape, lead, period, inner = layout
    if out is not None and (out.shape != tuple(out_shape) or out.dtype not in (np.float32, np.float64)
                            or not out.flags.c_contiguous):
        raise ValueError(f"fake_quant_np: out is {out.dtype} {out.shape}; expected a C-contiguous float32 or "
                         f"float64 array of shape {tuple(out_shape)}")
    fn = _fq_kernel()
    if fn is None:
        return None
    c = int(np.prod(out_shape[:lead], dtype=np.int64))
    ss = (1,) * (len(out_shape) - scale.ndim) + scale.shape
    scales = np.ascontiguousarray(np.broadcast_to(scale.reshape(ss), tuple(out_shape[:lead]) + ss[lead:]))
    xc = np.ascontiguousarray(x)
    y = np.empty(out_shape, np.float32) if out is None else out
    status = fn(xc.ctypes.data, xc.size, scales.ctypes.data, c, period, inner, float(qmin), float(qmax),
                y.ctypes.data, int(y.dtype == np.float64))
    if status == 3:  # built without AVX: numpy's passes are faster
        _NO_VECTOR_KERNEL[0] = True
        return None
    if status != 0:
        raise RuntimeError("FakeQuantCandidates: bad arguments")
    return y


def fake_quant_row_sums_np(x, scale, bits, signed=True, out=None):
    """(x̂, Σ) for x (..., T, K) float32 and one interval per candidate, scale (C, 1, ..., 1):
    x̂ = fake_quant_np(x, scale, bits, signed, out=out) (C, ..., T, K) and its sum over the rows,
    Σ = x̂.sum(axis=-2, dtype=np.float64) (C, ..., K), in one pass by the compiled kernel
    FakeQuantRowSums where it applies (the same bits), else by numpy."""
    qmin, qmax = qrange(bits, signed)
    scale = np.asarray(scale, np.float32)
    x = np.asarray(x, np.float32)
    fn = layout = None
    if x.ndim >= 2 and x.shape[-1] >= 8 and x.size >= KERNEL_MIN_ELEMS and not _NO_VECTOR_KERNEL[0]:
        layout = _fake_quant_layout(x.shape, scale.shape)
        if layout is not None and layout[1] == 1 and layout[2] == 1 and scale.size == layout[0][0]:
            fn = _row_sums_kernel()
    if fn is not None:
        shape = tuple(layout[0])
        c = shape[0]
        if out is not None and (out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous):
            raise ValueError(f"fake_quant_row_sums_np: out is {out.dtype} {out.shape}; expected a C-contiguous "
                             f"float32 array of shape {shape}")
        y = np.empty(shape, np.float32) if out is None else out
        sums = np.empty(shape[:-2] + shape[-1:], np.float64)
        xc = np.ascontiguousarray(x)
        rows, width = x.shape[-2], x.shape[-1]
        status = fn(xc.ctypes.data, xc.size // (rows * width), rows, width,
                    np.ascontiguousarray(scale.reshape(c)).ctypes.data, c, float(qmin), float(qmax),
                    y.ctypes.data, sums.ctypes.data)
        if status == 0:
            return y, sums
        if status != 3:
            raise RuntimeError("FakeQuantRowSums: bad arguments")
        _NO_VECTOR_KERNEL[0] = True
    y = fake_quant_np(x, scale, bits, signed, out=out)
    return y, y.sum(axis=-2, dtype=np.float64)


_NO_VECTOR_KERNEL = [False]  # set when the kernels were built without AVX (numpy computes then)


def _vector_kernel(name, *argtypes):
    """The compiled numpy kernel `name` of cpu_ops.cc, or None (kernels off, or not vectorized
    on this CPU)."""
    if _NO_VECTOR_KERNEL[0]:
        return None
    from ..kernels import numpy_kernel
    return numpy_kernel(name, argtypes)


def _fq_kernel():
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    return _vector_kernel("FakeQuantCandidates", p, i64, p, i64, i64, i64, f32, f32, p, ctypes.c_int)


def _row_sums_kernel():
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    return _vector_kernel("FakeQuantRowSums", p, i64, i64, i64, p, i64, f32, f32, p, p)


def fake_quant(x, scale, qmin, qmax):
    """MindSpore fake quantization; `scale` a Tensor broadcastable to x, qmin/qmax Python numbers."""
    return ops.clamp(ops.round(divide(x, scale)), qmin, qmax) * scale


def storage_dtype(bits):
    """numpy integer type that stores codes of `bits` bits: int8 up to 8 bits, int16 above (the
    layout of quantized checkpoint format v1; v2 packs codes densely, see packing.py)."""
    return np.int8 if bits <= 8 else np.int16


# ----------------------------------------------------------------------------- vtptq_plus grids
# Besides the uniform grids above, an operand can have one of these kinds (vtptq_plus):
#   "log2", "logsqrt2": for the softmax output. L = 2^b - 1 nonzero levels Δ·2^(-e·k), k = 1
#       (log2) or 1/2 (log√2), e = 0..L-1, plus 0 (code L): 2^b levels in all.
#         e = max(round(-log2(x / Δ) / k), 0);  x̂ = Δ·2^(-e·k) if e <= L-1 and x > 0, else 0
#       Integer form of attn·V with V̂ = Δ_v·v (v integer): Σ_j x̂_j V̂_j = Δ·Δ_v · Σ_j 2^(-e_j·k)·v_j,
#       for log2 a right shift of v_j by e_j; for log√2 a shift by ⌊e_j/2⌋ and, for odd e_j, a
#       factor 1/√2 applied once to the sum of the odd-code terms (a fixed-point multiply).
#   "asym": an unsigned grid with a zero point z (the post-GELU input of mlp.fc2):
#         q = clip(round(x / Δ) + z, 0, 2^b - 1),  x̂ = (q - z)·Δ      (ONNX QuantizeLinear's form)
KINDS = ("uniform", "log2", "logsqrt2", "asym")
LOG_INV_STEP = {"log2": 1.0, "logsqrt2": 2.0}  # 1/k
LOG_TINY = 1e-30  # x / Δ below this (0 or negative) maps to the zero code


def check_kind(kind):
    if kind not in KINDS:
        raise ValueError(f"quantizer kind is {kind!r}; expected one of {', '.join(KINDS)}")
    return kind


def fake_quant_log_np(x, scale, bits, kind):
    """x̂ of the log2 / log√2 grid with top level Δ = scale (numpy, float32); see KINDS."""
    inv = np.float32(LOG_INV_STEP[kind])
    last = 2 ** check_bits(bits) - 2  # largest nonzero exponent code
    y = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    e = np.maximum(np.round(-np.log2(np.maximum(y, np.float32(LOG_TINY))) * inv), 0).astype(np.float32)
    out = np.asarray(scale, np.float32) * np.exp2(-e / inv)
    return np.where((e > last) | (y <= 0), np.float32(0), out).astype(np.float32)


def log_codes_np(x, scale, bits, kind):
    """Integer codes 0..2^b - 1 of the log grid (2^b - 1 is the zero level)."""
    inv = np.float32(LOG_INV_STEP[kind])
    y = np.asarray(x, np.float32) / np.asarray(scale, np.float32)
    e = np.maximum(np.round(-np.log2(np.maximum(y, np.float32(LOG_TINY))) * inv), 0)
    return np.where(y <= 0, 2 ** check_bits(bits) - 1, np.minimum(e, 2 ** bits - 1)).astype(np.int32)


def zero_point(lo, scale, bits):
    """Zero point of the asymmetric grid that puts the tensor minimum `lo` (<= 0) on the grid:
    clip(round(-lo / Δ), 0, 2^b - 1); same shape as scale."""
    qmax = 2 ** check_bits(bits) - 1
    return np.clip(np.round(-min(float(lo), 0.0) / np.asarray(scale, np.float64)), 0, qmax).astype(np.float32)


def fake_quant_asym_np(x, scale, zp, bits):
    """x̂ = (clip(round(x / Δ) + z, 0, 2^b - 1) - z)·Δ (numpy, float32)."""
    qmax = 2 ** check_bits(bits) - 1
    scale, zp = np.asarray(scale, np.float32), np.asarray(zp, np.float32)
    out = np.round(np.asarray(x, np.float32) / scale) + zp
    np.clip(out, 0, qmax, out=out)
    out -= zp
    out *= scale
    return out


def grid_levels(bits, kind="uniform", signed=True):
    """Number of distinct values the grid can take (2^b for every kind)."""
    if kind in LOG_INV_STEP or kind == "asym":
        return 2 ** check_bits(bits)
    qmin, qmax = qrange(bits, signed)
    return qmax - qmin + 1


def fake_quant_log(x, scale, bits, inv_step):
    """MindSpore form of fake_quant_log_np (inv_step 1.0 for log2, 2.0 for log√2)."""
    last = 2 ** bits - 2
    y = divide(x, scale)
    e = ops.maximum(ops.round(-ops.log2(ops.maximum(y, LOG_TINY)) * inv_step), 0.0)
    return ops.where(ops.logical_or(e > last, y <= 0), ops.zeros_like(x), scale * ops.exp2(divide(-e, inv_step)))


def fake_quant_asym(x, scale, zp, qmax):
    """MindSpore form of fake_quant_asym_np."""
    return (ops.clamp(ops.round(divide(x, scale)) + zp, 0, qmax) - zp) * scale
