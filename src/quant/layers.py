"""Fake-quantized Cells that replace nn.Dense, nn.Conv2d and the attention MatMul.

Each keeps the full-precision parameter names (`weight`, `bias`), so an FP checkpoint still
loads, and adds its intervals as parameters of its own: `w_scale` (weight), `a_scale`
(input; for a MatMul the first operand) and, for a MatMul, `b_scale` (second operand).
Bit widths and signedness are Python attributes, fixed before a GRAPH-mode compile.
Whether a cell quantizes is set by `set_quant(weight, act)`, model-wide through
`src.quant.convert.set_quant_mode`.
"""
import numpy as np
from mindspore import nn, Parameter, Tensor

from .. import kernels
from ..models.vit import MatMul, dense, patch_conv
from .quantizer import LOG_INV_STEP, check_bits, check_kind, fake_quant, fake_quant_asym, fake_quant_log, qrange


def _scale_param(shape, name):
    return Parameter(Tensor(np.ones(shape, np.float32)), name=name, requires_grad=False)


class _QuantOperand:
    """Bits, signedness, integer range and grid kind of one quantized operand (kind: 'uniform',
    or for vtptq_plus 'log2' / 'logsqrt2' / 'asym', see quantizer.KINDS; those are unsigned)."""

    def __init__(self, bits, signed=True, kind="uniform"):
        self.bits = check_bits(bits)
        self.kind = check_kind(kind)
        self.signed = bool(signed) and kind == "uniform"
        self.qmin, self.qmax = qrange(self.bits, self.signed)
        self.inv_step = LOG_INV_STEP.get(kind, 0.0)  # > 0 for a log grid

    def kernel_config(self, zero_point):
        """Config tensor of the fused CPU quantizer (src/kernels): lo, hi, zero point on/off, threads."""
        return kernels.config(self.qmin, self.qmax, float(bool(zero_point)))

    def as_dict(self):
        d = {"bits": self.bits, "signed": self.signed}
        if self.kind != "uniform":
            d["kind"] = self.kind
        return d


class QuantCellMixin:
    """Shared state of the quantized cells: which operands exist and whether each is quantized."""

    operands = ()  # names of the operands, e.g. ("w", "a"); each has <name>_scale and <name>_q

    bias_corr = None  # bias correction (numpy, per output channel); applied while quantized
    _fp_bias = None
    weight_q = None  # learned weight rounding (vtptq_plus recon_iters): the weight while w is quantized
    _fp_weight = None
    w_frozen = False  # the weight parameter holds the quantized weight while w is on: no weight quantizer
    fq_op = None  # the fused CPU activation quantizer (src/kernels), or None: the MindSpore chain
    layer_name = None  # the cell's name in its model (set by quantize_model): the key of per-layer state

    def _init_kernels(self):
        """Use the fused CPU quantizer for the activation operands if src/kernels provides it now."""
        self.fq_op = kernels.fake_quant_op()
        self._zero = Tensor(np.zeros((1,), np.float32))
        for op in self.operands:
            if op != "w":
                self._set_kernel_config(op)

    def _set_kernel_config(self, name):
        if self.fq_op is not None:
            q = getattr(self, f"{name}_q")
            setattr(self, f"{name}_cfg", q.kernel_config(q.kind == "asym"))

    def set_quant(self, weight=None, act=None):
        """Turn quantization of the weight (w) and of the activations (a, b) on or off. With a
        bias correction, the bias is the FP bias minus the correction while any quantizer is on,
        and the FP bias while all are off (so FP reference passes stay those of the FP network)."""
        if weight is not None and "w" in self.operands:
            self.w_on = bool(weight)
        if act is not None:
            for op in self.operands:
                if op != "w":
                    setattr(self, f"{op}_on", bool(act))
        self._apply_weight()
        self._apply_bias()

    def quantizing(self):
        return any(getattr(self, f"{op}_on") for op in self.operands)

    def set_bias_correction(self, corr):
        """Subtract `corr` (out,) from the bias whenever the cell quantizes."""
        if self._fp_bias is None:
            self._fp_bias = self.bias.asnumpy().copy()
        self.bias_corr = np.asarray(corr, np.float32).reshape(self._fp_bias.shape)
        self._apply_bias()

    def set_quantized_weight(self, value):
        """Use `value` (codes x interval, e.g. from learned rounding) as the weight whenever the
        weight quantizer is on, and the FP weight while it is off."""
        if self._fp_weight is None:
            self._fp_weight = self.weight.asnumpy().copy()
        self.weight_q = np.asarray(value, np.float32).reshape(self._fp_weight.shape)
        self._apply_weight()

    def freeze_weight(self, already_quantized=False):
        """Store the fake-quantized weight once (as weight_q, computed by the forward pass's own
        quantizer, so the values are those it would give) and skip the weight quantizer from now
        on: fake quantization is idempotent on its own grid, so the outputs stay bit-identical and
        an evaluation no longer re-quantizes constant weights in every forward pass. Turning the
        weight quantizer off still restores the FP weight. already_quantized: the weight parameter
        holds codes x interval already (a loaded quantized checkpoint, which has no FP weight):
        only the quantizer is skipped, and no copy is kept. Python attribute: set before a GRAPH
        compile."""
        if "w" not in self.operands or self.w_frozen:
            return
        if already_quantized:
            self.w_frozen = True
            return
        q = self.w_q
        w = self.weight_q if self.weight_q is not None else (
            self._fp_weight if self._fp_weight is not None else self.weight.asnumpy())
        value = fake_quant(Tensor(np.asarray(w, np.float32)), self.w_scale, q.qmin, q.qmax).asnumpy()
        self.set_quantized_weight(value)
        self.w_frozen = True

    def _apply_weight(self):
        """The weight parameter: weight_q while the weight quantizer is on, the FP weight while it
        is off (only once a quantized weight was set)."""
        if self.weight_q is not None:
            self.weight.set_data(Tensor(self.weight_q if self.w_on else self._fp_weight))

    def _apply_bias(self):
        """The bias parameter: the FP bias minus the correction while any quantizer is on, the FP
        bias while all are off (only once a correction was set)."""
        if self.bias_corr is not None:
            value = self._fp_bias - self.bias_corr if self.quantizing() else self._fp_bias
            self.bias.set_data(Tensor(value.astype(np.float32)))

    def _check_not_frozen(self, name):
        if name == "w" and self.w_frozen:
            raise RuntimeError(f"{type(self).__name__}: the weight is frozen (freeze_weight); its interval and "
                               f"bits can no longer change")

    def set_bits(self, name, bits, signed=None, kind=None):
        self._check_not_frozen(name)
        q = getattr(self, f"{name}_q")
        kind = q.kind if kind is None else kind
        if kind == "asym" and not hasattr(self, f"{name}_zero_point"):
            raise ValueError(f"operand '{name}' of {type(self).__name__} has no zero point (create the cell with asym)")
        setattr(self, f"{name}_q", _QuantOperand(bits, q.signed if signed is None else signed, kind))
        if name != "w":
            self._set_kernel_config(name)

    def set_scale(self, name, value):
        self._check_not_frozen(name)
        p = getattr(self, f"{name}_scale")
        value = np.asarray(value, np.float32).reshape(p.shape)
        if not np.all(np.isfinite(value)) or np.any(value <= 0):
            raise ValueError(f"{p.name}: intervals must be finite and positive")
        p.set_data(Tensor(value))

    def get_scale(self, name):
        return getattr(self, f"{name}_scale").asnumpy().copy()

    def quant_info(self):
        """Per-operand bits, signedness and intervals (lists), for result.json and checkpoints."""
        info = {}
        for op in self.operands:
            d = getattr(self, f"{op}_q").as_dict()
            d["scale"] = self.get_scale(op).ravel().tolist()
            d["enabled"] = getattr(self, f"{op}_on")
            if hasattr(self, f"{op}_zero_point"):
                d["zero_point"] = float(getattr(self, f"{op}_zero_point").asnumpy()[0])
            info[op] = d
        return info


class _WeightLayerMixin(QuantCellMixin):
    """A layer with a quantized weight (`w_scale`) and a quantized input (`a_scale`)."""

    operands = ("w", "a")

    def _init_quant(self, w_bits, a_bits, per_channel, channel_shape, asym=False):
        self.per_channel = per_channel
        self.asym = bool(asym)  # input on an asymmetric grid with zero point `a_zero_point` (vtptq_plus)
        self.w_q, self.a_q = _QuantOperand(w_bits), _QuantOperand(a_bits, kind="asym" if asym else "uniform")
        self.w_scale = _scale_param(channel_shape if per_channel else (1,), "w_scale")
        self.a_scale = _scale_param((1,), "a_scale")
        if self.asym:
            self.a_zero_point = Parameter(Tensor(np.zeros((1,), np.float32)), name="a_zero_point", requires_grad=False)
        self.w_on = self.a_on = False
        self._init_kernels()

    def set_zero_point(self, value):
        self.a_zero_point.set_data(Tensor(np.asarray(value, np.float32).reshape(1)))

    def _quant_input_weight(self, x):
        w = self.weight
        if self.a_on and self.fq_op is not None:
            x = self.fq_op(x, self.a_scale, self.a_zero_point if self.asym else self._zero, self.a_cfg)
        elif self.a_on and self.asym:
            x = fake_quant_asym(x, self.a_scale, self.a_zero_point, self.a_q.qmax)
        elif self.a_on:
            x = fake_quant(x, self.a_scale, self.a_q.qmin, self.a_q.qmax)
        if self.w_on and not self.w_frozen:
            w = fake_quant(w, self.w_scale, self.w_q.qmin, self.w_q.qmax)
        return x, w


class QuantDense(_WeightLayerMixin, nn.Dense):
    """nn.Dense with fake-quantized input (`a_scale`) and weight (`w_scale`).

    x: (..., in) -> (..., out). w_scale has shape (1,) or (out, 1) per output channel."""

    def __init__(self, in_channels, out_channels, has_bias=True, w_bits=8, a_bits=8, per_channel=False, asym=False):
        super().__init__(in_channels, out_channels, has_bias=has_bias)
        self._init_quant(w_bits, a_bits, per_channel, (out_channels, 1), asym)

    def construct(self, x):
        x, w = self._quant_input_weight(x)
        return dense(x, w, self.bias if self.has_bias else None)


class QuantConv2d(_WeightLayerMixin, nn.Conv2d):
    """nn.Conv2d of the patch embedding (kernel = stride, no padding; computed as one matrix
    product, see src.models.vit.patch_conv) with fake-quantized input and weight.

    w_scale has shape (1,) or (out, 1, 1, 1) per output channel."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, has_bias=True, w_bits=8, a_bits=8,
                 per_channel=False):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, pad_mode="valid",
                         has_bias=has_bias)
        self._init_quant(w_bits, a_bits, per_channel, (out_channels, 1, 1, 1))

    def construct(self, x):
        x, w = self._quant_input_weight(x)
        return patch_conv(x, w, self.bias if self.has_bias else None, self.kernel_size[0])


class QuantMatMul(QuantCellMixin, MatMul):
    """Product of two activations with both operands fake-quantized: `a_scale` for the first
    (Q, or the softmax output), `b_scale` for the second (K, or V)."""

    operands = ("a", "b")

    def __init__(self, transpose_b=False, a_bits=8, b_bits=8, a_signed=True, b_signed=True):
        super().__init__(transpose_b=transpose_b)
        self.a_q, self.b_q = _QuantOperand(a_bits, a_signed), _QuantOperand(b_bits, b_signed)
        self.a_scale = _scale_param((1,), "a_scale")
        self.b_scale = _scale_param((1,), "b_scale")
        self.a_on = self.b_on = False
        self._init_kernels()
        self.is_attention_scores = False  # set for attn.matmul1 (the ranking loss applies to it)
        self.scores_scale = 1.0

    def construct(self, a, b):
        if self.a_on and self.a_q.inv_step > 0:  # log2 / log√2 grid (vtptq_plus softmax output)
            a = fake_quant_log(a, self.a_scale, self.a_q.bits, self.a_q.inv_step)
        elif self.a_on and self.fq_op is not None:
            a = self.fq_op(a, self.a_scale, self._zero, self.a_cfg)
        elif self.a_on:
            a = fake_quant(a, self.a_scale, self.a_q.qmin, self.a_q.qmax)
        if self.b_on and self.fq_op is not None:
            b = self.fq_op(b, self.b_scale, self._zero, self.b_cfg)
        elif self.b_on:
            b = fake_quant(b, self.b_scale, self.b_q.qmin, self.b_q.qmax)
        return self.bmm(a, b)


def quant_dense_from(cell, w_bits, a_bits, per_channel=False, asym=False):
    q = QuantDense(cell.in_channels, cell.out_channels, has_bias=cell.has_bias, w_bits=w_bits, a_bits=a_bits,
                   per_channel=per_channel, asym=asym)
    _copy_params(cell, q)
    return q


def quant_conv_from(cell, w_bits, a_bits, per_channel=False):
    if tuple(cell.kernel_size) != tuple(cell.stride) or cell.kernel_size[0] != cell.kernel_size[1] \
            or cell.pad_mode != "valid":
        raise ValueError(f"QuantConv2d covers patch embeddings (square kernel = stride, no padding); got kernel "
                         f"{cell.kernel_size}, stride {cell.stride}, pad_mode {cell.pad_mode}")
    q = QuantConv2d(cell.in_channels, cell.out_channels, cell.kernel_size, cell.stride, has_bias=cell.has_bias,
                    w_bits=w_bits, a_bits=a_bits, per_channel=per_channel)
    _copy_params(cell, q)
    return q


def quant_matmul_from(cell, a_bits, b_bits, a_signed=True, a_kind="uniform"):
    q = QuantMatMul(transpose_b=cell.transpose_b, a_bits=a_bits, b_bits=b_bits, a_signed=a_signed)
    if a_kind != "uniform":
        q.set_bits("a", a_bits, kind=a_kind)
    return q


def _copy_params(src, dst):
    dst.weight.set_data(src.weight.data.copy())
    if src.has_bias:
        dst.bias.set_data(src.bias.data.copy())


QUANT_CELLS = (QuantDense, QuantConv2d, QuantMatMul)
