"""Uniform quantizer maths: integer grids, initial intervals, fake quantization.

Symmetric signed grid [-2^(b-1), 2^(b-1) - 1] (the paper's), or unsigned [0, 2^b - 1] for
non-negative tensors (softmax output). One interval Δ per tensor, or per output channel
(axis 0) for weights. Rounding is half to even, as np.round, mindspore.ops.round and ONNX
QuantizeLinear do:

    q = clip(round(x / Δ), qmin, qmax),   x̂ = q · Δ
"""
import numpy as np
from mindspore import ops

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
    return ops.clamp(ops.round(x / scale), qmin, qmax) * scale


def storage_dtype(bits):
    """numpy integer type that stores codes of `bits` bits: int8 up to 8 bits, int16 above (the
    layout of quantized checkpoint format v1; v2 packs codes densely, see packing.py)."""
    return np.int8 if bits <= 8 else np.int16
