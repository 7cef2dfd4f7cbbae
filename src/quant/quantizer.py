"""Uniform quantizer maths: integer grids, initial intervals, fake quantization.

Symmetric signed grid [-2^(b-1), 2^(b-1) - 1] (the paper's), or unsigned [0, 2^b - 1] for
non-negative tensors (softmax output). One interval Δ per tensor, or per output channel
(axis 0) for weights. Rounding is half to even, as np.round, mindspore.ops.round and ONNX
QuantizeLinear do:

    q = clip(round(x / Δ), qmin, qmax),   x̂ = q · Δ
"""
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


def fake_quant_np(x, scale, bits, signed=True):
    """x̂ = clip(round(x / Δ), qmin, qmax) · Δ in float32 (numpy reference)."""
    qmin, qmax = qrange(bits, signed)
    scale = np.asarray(scale, np.float32)
    out = np.divide(np.asarray(x, np.float32), scale, dtype=np.float32)
    np.round(out, out=out)
    np.clip(out, qmin, qmax, out=out)
    out *= scale
    return out


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
