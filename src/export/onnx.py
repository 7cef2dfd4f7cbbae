"""Integer ONNX graph of a quantized VisionTransformer, and an onnxruntime runner for it.

export_onnx builds the graph by hand from the model's parameters and intervals (MindSpore's
own exporter fails on the exact, erf-based GELU). Quantized layers are written in QDQ form:

    weight:     codes (in, out) -> DequantizeLinear (per tensor, or per output channel: axis 1)
    activation: [Clip to the grid] -> QuantizeLinear -> DequantizeLinear

The stored values are the fake-quantized model's codes clip(round(x / Δ), qmin, qmax) (round
half to even on both sides), shifted so that no integer kernel of onnxruntime can saturate on
any CPU (see "integer encodings" below): the left operand of every product is uint8 from 0
(zero point -qmin), a weight int8 where check_integer_products proves that two adjacent
products sum within int16, else uint8 (zero point -qmin), and K and V uint8 (zero point -qmin). onnxruntime's QDQ
optimizer (ORT_ENABLE_ALL) turns every quantized product into an integer kernel on the CPU
(MatMulIntegerToFloat; QLinearMatMul for attn·V, whose requantization it merges with the next
layer's QuantizeLinear). The sums are exact int32 where MindSpore sums floats, so a value
lying within float rounding of a rounding boundary can get the neighbouring code
(tests/test_onnx.py bounds the difference). Operands wider than 8 bits (mixed precision can
give 9 or 10) use int16 / uint16 QDQ (opset 21): same codes, but onnxruntime runs that
product in float32. LayerNorm, softmax, GELU, residuals and an unquantized head stay float.
The metadata key `integer_products` records each product's stored ranges, kernel class and
pair-sum bound.

vtptq_plus grids: the asymmetric post-GELU grid of mlp.fc2 is QDQ with its zero point (uint8),
so fc2 stays an integer kernel; a log2 / log√2 softmax grid has no onnxruntime kernel and is
written exactly with float ops (Div, Log, Round, Pow, Where: see _log_quant), so attn·V then
runs as a float MatMul of the log-grid values and the dequantized V. The LayerNorm fold and
per-channel weights need nothing new (folded parameters; per-channel DequantizeLinear).

Importing this module does not import onnx or onnxruntime; each function imports what it needs.
"""
import json
import os

import numpy as np

from ..utils import atomic_write_bytes

OPSET = 21  # LayerNormalization (17), int16 QuantizeLinear / DequantizeLinear (21)
FORMAT = "vtptq-onnx-v1"
INPUT, OUTPUT = "input", "logits"


# ----------------------------------------------------------------------------- checks
def _layer_bits(qcells):
    """{layer: {operand: {bits, signed}}} (metadata)."""
    return {name: {op: getattr(cell, f"{op}_q").as_dict() for op in cell.operands} for name, cell in qcells}


# ----------------------------------------------------------------------------- 16-bit pair sums
def _stored_range(name, producer, inits):
    """(dtype, lo, hi) of the stored values behind a DequantizeLinear output `name` (None if
    `name` is not one): an initializer's actual codes, else QuantizeLinear's type range narrowed
    by a constant Clip in front of it."""
    dq = producer.get(name)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    dtype = inits[dq.input[2]].dtype
    if dq.input[0] in inits:
        v = inits[dq.input[0]]
        return dtype, int(v.min()), int(v.max())
    qn = producer[dq.input[0]]
    lo, hi = int(np.iinfo(dtype).min), int(np.iinfo(dtype).max)
    clip = producer.get(qn.input[0])
    if clip is not None and clip.op_type == "Clip":
        s, z = np.float32(inits[qn.input[1]]), int(inits[qn.input[2]])
        lo = max(lo, int(np.rint(np.float32(inits[clip.input[1]]) / s)) + z)
        hi = min(hi, int(np.rint(np.float32(inits[clip.input[2]]) / s)) + z)
    return dtype, lo, hi


def check_integer_products(proto):
    """Prove, for every MatMul of two DequantizeLinear outputs in an ONNX graph, that no integer
    kernel of onnxruntime can saturate: {matmul name: {left, right, kernel, pair_sum}}.

    left / right: [dtype, lo, hi] of the stored values. kernel: 'u8s8' (int8 right operand;
    the graph relies on the sum of two adjacent products fitting int16, which `pair_sum` bounds,
    with an int8 left operand counted as onnxruntime shifts it, +128), 'u8u8' (exact on every
    CPU) or 'float' (a 16-bit operand: onnxruntime dequantizes). A u8s8 product whose pair sum
    can leave int16 is a ValueError naming it."""
    from onnx import numpy_helper
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    report = {}
    for node in proto.graph.node:
        if node.op_type != "MatMul":
            continue
        left, right = (_stored_range(i, producer, inits) for i in node.input)
        if left is None or right is None:
            continue
        entry = {"left": [left[0].name, left[1], left[2]], "right": [right[0].name, right[1], right[2]]}
        if left[0].itemsize > 1 or right[0].itemsize > 1:
            entry["kernel"] = "float"
        elif right[0] == np.uint8:
            entry["kernel"] = "u8u8"
        else:
            left_max = left[2] + (128 if left[0] == np.int8 else 0)
            bounds = pair_sum_range(left_max, right[1], right[2])
            entry.update(kernel="u8s8", pair_sum=list(bounds))
            if not fits_int16(bounds):
                raise ValueError(f"{node.name}: uint8 x int8 product whose sum of two adjacent products can reach "
                                 f"{bounds} (left values up to {left_max}, right {right[1]}..{right[2]}); "
                                 f"onnxruntime's non-VNNI kernel saturates it at int16 {INT16}")
        report[node.name] = entry
    return report


# ----------------------------------------------------------------------------- graph builder
class _Graph:
    """Nodes and initializers of one ONNX graph, with unique names."""

    def __init__(self, static=False):
        from onnx import helper, numpy_helper
        self.static = static  # all shapes fixed (batch_size given)
        self.helper, self.numpy_helper = helper, numpy_helper
        self.nodes, self.inits = [], []
        self._count = {}

    def _name(self, prefix):
        n = self._count.get(prefix, 0)
        self._count[prefix] = n + 1
        return prefix if n == 0 else f"{prefix}_{n}"

    def const(self, prefix, value, dtype=np.float32):
        name = self._name(prefix)
        self.inits.append(self.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, prefix, n_out=1, **attrs):
        outs = [self._name(f"{prefix}/{op_type}" + (f":{i}" if n_out > 1 else "")) for i in range(n_out)]
        self.nodes.append(self.helper.make_node(op_type, list(inputs), outs, name=outs[0], **attrs))
        return outs if n_out > 1 else outs[0]


def _q_dtype(bits, signed):
    if bits <= 8:
        return np.int8 if signed else np.uint8
    return np.int16 if signed else np.uint16


# ----------------------------------------------------------------------------- integer encodings
# onnxruntime's CPU kernels multiply the stored 8-bit values of the two operands of an integer
# product (the zero points are applied afterwards, through row and column sums). Its uint8 x
# int8 kernel on x86 without VNNI (AVX2, AVX-512 without VNNI) uses vpmaddubsw, which adds two
# adjacent products in saturating 16-bit arithmetic: 255·127·2 does not fit. uint8 x uint8
# widens both to 16 bits (vpmaddwd, exact in int32), and VNNI and ARM64 dot products sum in
# int32. So the export writes the left operand of every product as uint8 whose lowest code is
# 0 (zero point -qmin + z), and the right operand as int8 only where the worst-case sum of two
# adjacent products provably fits int16 (check_integer_products), else as uint8 (zero point
# -qmin + z). Both are the fake-quant model's codes, shifted; no value changes.
INT16 = (-32768, 32767)


def pair_sum_range(left_max, right_lo, right_hi):
    """(lowest, highest) sum of two adjacent products l0·r0 + l1·r1 with stored left values in
    [0, left_max] (uint8) and stored right values in [right_lo, right_hi]."""
    return 2 * int(left_max) * min(int(right_lo), 0), 2 * int(left_max) * max(int(right_hi), 0)


def fits_int16(bounds):
    return INT16[0] <= bounds[0] and bounds[1] <= INT16[1]


class _Codes:
    """How one operand of a product is stored: numpy dtype, zero point (int, or an array per
    output channel of a weight) and the range [lo, hi] of the stored values."""

    def __init__(self, dtype, zero_point, lo, hi):
        self.dtype, self.zero_point, self.lo, self.hi = dtype, zero_point, int(lo), int(hi)


def _left_codes(q, z=0):
    """Left operand (activation) on the grid of quantizer q with zero point z: uint8 from 0 when
    the grid has at most 2^8 levels, else its 16-bit type (onnxruntime then runs the product in float)."""
    if q.bits > 8:
        dtype = _q_dtype(q.bits, q.signed)
        return _Codes(dtype, z, q.qmin, q.qmax)
    return _Codes(np.uint8, z - q.qmin, 0, q.qmax - q.qmin)


def _right_codes(q, lo, hi, left, z=0, weight=True):
    """Right operand whose codes lie in [lo, hi] (grid of q): a weight is int8 where no pair of
    products with the left operand can leave int16, else uint8 from 0; an activation (K, V) is
    uint8 from 0 (onnxruntime would shift an int8 one to uint8 itself)."""
    if q.bits > 8 or left.dtype != np.uint8:
        return _Codes(_q_dtype(q.bits, q.signed), z, lo + z, hi + z)
    if weight and q.signed and fits_int16(pair_sum_range(left.hi, lo + z, hi + z)):
        return _Codes(np.int8, z, lo + z, hi + z)
    return _Codes(np.uint8, z - q.qmin, lo - q.qmin, hi - q.qmin)


def _qdq_activation(g, x, scale, q, prefix, codes):
    """x -> [Clip] -> QuantizeLinear -> DequantizeLinear with a per-tensor interval `scale`,
    stored as `codes` (_Codes); a log2 / log√2 grid is written with float ops."""
    if q.inv_step > 0:
        return _log_quant(g, x, scale, q, prefix)
    dtype, zs = codes.dtype, int(codes.zero_point)
    s = np.float32(np.asarray(scale, np.float32).reshape(-1)[0])
    info = np.iinfo(dtype)
    if (codes.lo, codes.hi) != (info.min, info.max):  # narrower grid than the storage type: clip first
        x = g.op("Clip", [x, g.const(f"{prefix}.clip_min", np.float32(codes.lo - zs) * s),
                          g.const(f"{prefix}.clip_max", np.float32(codes.hi - zs) * s)], prefix)
    sc, zp = g.const(f"{prefix}.scale", s), g.const(f"{prefix}.zero_point", zs, dtype)
    return g.op("DequantizeLinear", [g.op("QuantizeLinear", [x, sc, zp], prefix), sc, zp], prefix)


def _log_quant(g, x, scale, q, prefix):
    """The log2 / log√2 grid of src.quant.quantizer (vtptq_plus softmax output) in float ops:
    e = max(round(-log2(max(x / Δ, tiny)) / k), 0); x̂ = 0 if e > 2^b - 2 or x <= 0, else Δ·2^(-e·k).
    onnxruntime has no integer kernel for it: the product with V then runs in float32."""
    from ..quant.quantizer import LOG_TINY
    s = np.float32(np.asarray(scale, np.float32).reshape(-1)[0])
    ratio = g.op("Div", [x, g.const(f"{prefix}.scale", s)], prefix)
    y = g.op("Max", [ratio, g.const(f"{prefix}.tiny", np.float32(LOG_TINY))], prefix)
    log2 = g.op("Div", [g.op("Log", [y], prefix), g.const(f"{prefix}.ln2", np.float32(np.log(2.0)))], prefix)
    e = g.op("Round", [g.op("Mul", [log2, g.const(f"{prefix}.neg_inv_step", np.float32(-q.inv_step))], prefix)],
             prefix)
    e = g.op("Max", [e, g.const(f"{prefix}.zero", np.float32(0))], prefix)
    level = g.op("Mul", [g.const(f"{prefix}.top", s),
                         g.op("Pow", [g.const(f"{prefix}.two", np.float32(2)),
                                      g.op("Div", [g.op("Neg", [e], prefix),
                                                   g.const(f"{prefix}.inv_step", np.float32(q.inv_step))], prefix)],
                              prefix)], prefix)
    zero = g.op("Or", [g.op("Greater", [e, g.const(f"{prefix}.last", np.float32(2 ** q.bits - 2))], prefix),
                       g.op("LessOrEqual", [ratio, g.const(f"{prefix}.zero_ratio", np.float32(0))], prefix)], prefix)
    return g.op("Where", [zero, g.const(f"{prefix}.zero_level", np.float32(0)), level], prefix)


def _linear(g, x, weight, bias, prefix, cell=None):
    """x (B, N, in) @ weight.T (+ bias), weight (out, in). `cell`: the quantized cell (QDQ), or None (float)."""
    if cell is None:
        y = g.op("MatMul", [x, g.const(f"{prefix}.weight", weight.T)], prefix)
    else:
        from ..quant.quantizer import quantize_np
        w_scale = cell.get_scale("w")
        codes = quantize_np(weight, w_scale.reshape((-1,) + (1,) * (weight.ndim - 1)), cell.w_q.bits, cell.w_q.signed)
        a_zp = int(round(float(cell.a_zero_point.asnumpy().reshape(-1)[0]))) if getattr(cell, "asym", False) else 0
        left = _left_codes(cell.a_q, a_zp)
        right = _right_codes(cell.w_q, codes.min(), codes.max(), left)
        # MatMul takes the weight as (in, out): the per-channel axis (output channels) becomes 1
        w_scale = w_scale.reshape(-1).astype(np.float32)
        per_channel = w_scale.size > 1
        sc = g.const(f"{prefix}.w_scale", w_scale if per_channel else w_scale[0])
        zp = g.const(f"{prefix}.w_zero_point", np.full(w_scale.size, right.zero_point) if per_channel
                     else right.zero_point, right.dtype)
        wq = g.const(f"{prefix}.weight_int", codes.T + right.zero_point, right.dtype)
        w = g.op("DequantizeLinear", [wq, sc, zp], prefix, **({"axis": 1} if per_channel else {}))
        x = _qdq_activation(g, x, cell.get_scale("a"), cell.a_q, f"{prefix}.a", left)
        y = g.op("MatMul", [x, w], prefix)
    if bias is not None:
        # With a fixed batch (static shapes), onnxruntime's MatMulAddFusion rewrites MatMul + 1-D
        # bias into Reshape + Gemm + Reshape, which leaves the QDQ weight unfused (float Gemm) and,
        # with int8 activations, fails to load in onnxruntime 1.32 (mismatched int8/uint8 types
        # in the QuantizeLinear it adds); a (1, 1, out) bias is not matched. With a symbolic batch
        # the 1-D bias stays, so that fc1's bias + GELU fuse into one BiasGelu kernel.
        y = g.op("Add", [y, g.const(f"{prefix}.bias", bias.reshape(1, 1, -1) if g.static else bias)], prefix)
    return y


def _dense(g, x, cell, prefix, quantized):
    """nn.Dense or QuantDense. The float graph of a quantized cell uses its FP bias (that of the
    model with quantizers off, without bias correction)."""
    from ..quant.layers import QUANT_CELLS
    is_q = isinstance(cell, QUANT_CELLS)
    bias = None
    if cell.has_bias:
        bias = cell._fp_bias if (is_q and not quantized and cell._fp_bias is not None) else cell.bias.asnumpy()
    weight = cell.weight.asnumpy().reshape(cell.weight.shape[0], -1)  # a conv weight (D, C, p, p) -> (D, C·p·p)
    return _linear(g, x, weight, bias, prefix, cell if (is_q and quantized) else None)


def _matmul(g, a, b, cell, prefix, quantized):
    """attn.matmul1 / matmul2 (b is already transposed for Q·Kᵀ)."""
    from ..quant.layers import QuantMatMul
    if quantized and isinstance(cell, QuantMatMul):
        left = _left_codes(cell.a_q)
        a = _qdq_activation(g, a, cell.get_scale("a"), cell.a_q, f"{prefix}.a", left)
        b = _qdq_activation(g, b, cell.get_scale("b"), cell.b_q, f"{prefix}.b",
                            _right_codes(cell.b_q, cell.b_q.qmin, cell.b_q.qmax, left, weight=False))
    return g.op("MatMul", [a, b], prefix)


def _layer_norm(g, x, cell, prefix):
    return g.op("LayerNormalization", [x, g.const(f"{prefix}.gamma", cell.gamma.asnumpy()),
                                       g.const(f"{prefix}.beta", cell.beta.asnumpy())], prefix,
                axis=-1, epsilon=float(cell.epsilon))


def _block(g, x, blk, prefix, quantized):
    attn, mlp = blk.attn, blk.mlp
    dim, heads = attn.qkv.weight.shape[1], attn.num_heads
    # attention: qkv (B, N, 3D) -> q, k, v (B, N, D) -> heads; k is transposed to (B, H, hd, N) directly
    h = _layer_norm(g, x, blk.norm1, f"{prefix}.norm1")
    qkv = _dense(g, h, attn.qkv, f"{prefix}.attn.qkv", quantized)
    parts = g.op("Split", [qkv, g.const(f"{prefix}.attn.split", [dim] * 3, np.int64)], f"{prefix}.attn", n_out=3,
                 axis=-1)
    heads_shape = g.const(f"{prefix}.attn.heads_shape", [0, 0, heads, attn.head_dim], np.int64)
    q, k, v = (g.op("Transpose", [g.op("Reshape", [t, heads_shape], f"{prefix}.attn")], f"{prefix}.attn", perm=perm)
               for t, perm in zip(parts, ((0, 2, 1, 3), (0, 2, 3, 1), (0, 2, 1, 3))))
    s = _matmul(g, q, k, attn.matmul1, f"{prefix}.attn.matmul1", quantized)
    s = g.op("Mul", [s, g.const(f"{prefix}.attn.scale", np.float32(attn.scale))], f"{prefix}.attn")
    p = g.op("Softmax", [s], f"{prefix}.attn", axis=-1)
    o = _matmul(g, p, v, attn.matmul2, f"{prefix}.attn.matmul2", quantized)
    o = g.op("Transpose", [o], f"{prefix}.attn", perm=(0, 2, 1, 3))
    o = g.op("Reshape", [o, g.const(f"{prefix}.attn.merge_shape", [0, 0, dim], np.int64)], f"{prefix}.attn")
    x = g.op("Add", [x, _dense(g, o, attn.proj, f"{prefix}.attn.proj", quantized)], prefix)
    # MLP with exact GELU 0.5·x·(1 + erf(x/√2)) (onnxruntime fuses it, with fc1's bias, into BiasGelu)
    h = _layer_norm(g, x, blk.norm2, f"{prefix}.norm2")
    h = _dense(g, h, mlp.fc1, f"{prefix}.mlp.fc1", quantized)
    e = g.op("Erf", [g.op("Div", [h, g.const(f"{prefix}.mlp.sqrt2", np.float32(np.sqrt(2.0)))], f"{prefix}.mlp")],
             f"{prefix}.mlp")
    e = g.op("Add", [e, g.const(f"{prefix}.mlp.one", np.float32(1.0))], f"{prefix}.mlp")
    h = g.op("Mul", [g.op("Mul", [h, g.const(f"{prefix}.mlp.half", np.float32(0.5))], f"{prefix}.mlp"), e],
             f"{prefix}.mlp")
    h = _dense(g, h, mlp.fc2, f"{prefix}.mlp.fc2", quantized)
    return g.op("Add", [x, h], prefix)


def _build_graph(model, g, quantized, batch):
    """The forward of src.models.vit.VisionTransformer; returns the output name."""
    pe = model.patch_embed
    c, p, grid = model.in_chans, pe.patch_size, pe.grid_size
    # patch embedding as src.models.vit.patch_conv: (B, C, H, W) -> (B, T, C·p·p) -> matrix product
    x = g.op("Reshape", [INPUT, g.const("patch_embed.split_shape", [-1, c, grid, p, grid, p], np.int64)], "patch_embed")
    x = g.op("Transpose", [x], "patch_embed", perm=(0, 2, 4, 1, 3, 5))
    x = g.op("Reshape", [x, g.const("patch_embed.cols_shape", [-1, grid * grid, c * p * p], np.int64)], "patch_embed")
    x = _dense(g, x, pe.proj, "patch_embed.proj", quantized)
    # cls token broadcast to (B, 1, D), concatenated in front, plus the position embedding
    d = model.embed_dim
    if batch is None:
        b = g.op("Slice", [g.op("Shape", [x], "cls"), g.const("cls.zero", [0], np.int64), g.const("cls.one", [1], np.int64)],
                 "cls")
        shape = g.op("Concat", [b, g.const("cls.tail", [1, d], np.int64)], "cls", axis=0)
    else:
        shape = g.const("cls.shape", [batch, 1, d], np.int64)
    cls = g.op("Expand", [g.const("cls_token", model.cls_token.asnumpy()), shape], "cls")
    x = g.op("Concat", [cls, x], "embed", axis=1)
    x = g.op("Add", [x, g.const("pos_embed", model.pos_embed.asnumpy())], "embed")
    for i, blk in enumerate(model.blocks):
        x = _block(g, x, blk, f"blocks.{i}", quantized)
    # head: LayerNorm is per token, so norm(x)[:, 0] == norm(x[:, 0]); the cls token is kept as
    # (B, 1, D) up to the classifier so that a quantized head also takes the 3-D integer path
    one = g.const("head.one", [1], np.int64)
    x = g.op("Slice", [x, g.const("head.zero", [0], np.int64), one, one], "head")
    x = _layer_norm(g, x, model.norm, "norm")
    if model.num_classes > 0:
        x = _dense(g, x, model.head, "head", quantized)
    return g.op("Squeeze", [x, one], OUTPUT)


def _model_name(model, model_name):
    return model_name or getattr(model, "model_name", None)


def export_onnx(model, path, batch_size=None, model_name=None, quantized=True):
    """Write the ONNX graph of a quantized, calibrated VisionTransformer to `path` (atomically).

    batch_size: None for a symbolic batch dimension ('batch'), else a fixed one.
    model_name: stored in the metadata (default: model.model_name, set by create_model).
    quantized: False writes the plain float32 graph of the same parameters (quantizers off,
    FP biases) and accepts an unquantized model too; True (default) needs a quantized model
    in quantized mode with calibrated intervals (else a one-line ValueError, no file written).
    Returns the ONNX ModelProto."""
    import onnx
    from onnx import TensorProto, helper
    from ..quant.convert import check_calibrated, quant_cells
    from ..models.vit import VisionTransformer

    if not isinstance(model, VisionTransformer):
        raise ValueError(f"export_onnx takes a src.models.vit.VisionTransformer, not {type(model).__name__}")
    if batch_size is not None and (isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1):
        raise ValueError(f"batch_size is {batch_size!r}; expected a positive integer or None (symbolic)")
    qcells = quant_cells(model)
    name = _model_name(model, model_name)
    if quantized:
        if not qcells:
            raise ValueError(f"model {name or type(model).__name__} is not quantized: run quant.py first "
                             f"(or export_onnx(..., quantized=False) for the float graph)")
        check_calibrated(qcells)
        for lname, cell in qcells:
            for op in cell.operands:
                if op != "w" and getattr(cell, f"{op}_scale").shape != (1,):
                    raise ValueError(f"{lname}: activation interval '{op}_scale' is not per tensor")

    g = _Graph(static=batch_size is not None)
    out = _build_graph(model, g, quantized, batch_size)
    batch = batch_size if batch_size is not None else "batch"
    inp = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [batch, model.in_chans, model.img_size,
                                                                   model.img_size])
    out_dim = model.num_classes if model.num_classes > 0 else model.embed_dim
    outp = helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, out_dim])
    graph = helper.make_graph(g.nodes, name or "vision_transformer", [inp], [outp], initializer=g.inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="vtptq")
    proto.ir_version = min(proto.ir_version, 10)  # readable by onnxruntime >= 1.16
    meta = {"format": FORMAT, "model_name": name or "", "num_classes": str(int(model.num_classes)),
            "input_shape": json.dumps([model.in_chans, model.img_size, model.img_size]),
            "quantized": json.dumps(bool(quantized)),
            "layer_bits": json.dumps(_layer_bits(qcells) if quantized else {})}
    helper.set_model_props(proto, meta)
    meta["integer_products"] = json.dumps(check_integer_products(proto))
    helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    _save_atomic(proto, path)
    return proto


def _save_atomic(proto, path):
    """Serialize to a private temporary file in the destination folder, then rename onto `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_bytes(path, proto.SerializeToString())


# ----------------------------------------------------------------------------- loading
def _import_ort(path):
    try:
        import onnxruntime
    except ImportError:
        raise ImportError(f"{path}: running an ONNX model needs onnxruntime (pip install onnxruntime)") from None
    return onnxruntime


def _first_line(exc):
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _check_file(path):
    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such file; expected an ONNX model written by src.export.onnx.export_onnx")


def _session(path, num_threads=None, optimized_model_path=None, optimize=True):
    ort = _import_ort(path)
    _check_file(path)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    if num_threads:
        opts.intra_op_num_threads = int(num_threads)
    if optimized_model_path:
        opts.optimized_model_filepath = str(optimized_model_path)
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / ... types
        raise ValueError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None


def onnx_metadata(path):
    """The metadata_props of an ONNX file as a dict (without building an optimized session)."""
    try:
        import onnx
    except ImportError:
        return dict(_session(path, optimize=False).get_modelmeta().custom_metadata_map)
    _check_file(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ValueError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
    return {p.key: p.value for p in proto.metadata_props}


def onnx_model_name(path):
    """The model name stored by export_onnx in `path`, or None."""
    return onnx_metadata(path).get("model_name") or None


class OnnxModel:
    """An exported model run by onnxruntime (CPU, ORT_ENABLE_ALL), called like a Cell:
    model(x) with x a mindspore Tensor or numpy array (B, C, H, W) float32 -> mindspore Tensor
    of logits. num_threads: intra-op threads (None: onnxruntime's default, one per core).
    optimized_model_path: where onnxruntime writes the graph after its optimizations."""

    def __init__(self, path, num_threads=None, optimized_model_path=None):
        self.path = str(path)
        self.session = _session(path, num_threads, optimized_model_path)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = dict(meta)
        self.model_name = meta.get("model_name") or None
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.input_shape = inp.name, list(inp.shape)
        classes = meta.get("num_classes")
        self.num_classes = int(classes) if classes is not None else out.shape[-1]

    def set_train(self, mode=False):
        return self

    def __call__(self, x):
        import mindspore as ms
        x = x.asnumpy() if hasattr(x, "asnumpy") else x
        x = np.ascontiguousarray(x, dtype=np.float32)
        expect = self.input_shape
        if x.ndim != len(expect) or any(isinstance(e, int) and e != s for e, s in zip(expect, x.shape)):
            raise ValueError(f"{self.path}: input of shape {tuple(x.shape)}; the model takes "
                             f"{tuple(e if isinstance(e, int) else '*' for e in expect)}")
        return ms.Tensor(self.session.run(None, {self.input_name: x})[0])


__all__ = ["export_onnx", "OnnxModel", "onnx_model_name", "onnx_metadata", "check_integer_products"]
