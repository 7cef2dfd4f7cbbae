"""Which cells get quantized (one table), model-wide quantization mode, model size, and the
quantized checkpoint (integer weights, intervals, bits per layer, model name)."""
import json
import os
import warnings

import numpy as np
import mindspore as ms
from mindspore import nn, Tensor

from ..models.vit import MatMul
from ..utils import first_line, quiet_mindspore_log, save_checkpoint_atomic, short_repr
from .layers import QUANT_CELLS, QuantConv2d, QuantDense, QuantMatMul, quant_conv_from, quant_dense_from, \
    quant_matmul_from
from .packing import pack_codes, unpack_codes
from .quantizer import KINDS, MAX_BITS, MIN_BITS, quantize_np

# v2: weight codes packed at their bit width (`<layer>.weight_packed`, uint8); v1 (still read):
# int8 up to 8 bits, int16 above (`<layer>.weight_int`).
QCKPT_FORMAT = "vtptq-quantized-v2"
QCKPT_FORMAT_V1 = "vtptq-quantized-v1"
READABLE_FORMATS = (QCKPT_FORMAT, QCKPT_FORMAT_V1)
PACKING = "code - qmin, little-endian bitstream (src/quant/packing.py)"
META_KEY = "quant_meta"
MAX_CLASSES = 1_000_000  # as the config's num_classes: a head is allocated whole

# Name suffix -> (FP cell type, config key that switches it, None = always). The paper
# quantizes every linear layer of the blocks, the patch embedding and both attention
# matmuls; the classifier head is not mentioned and defaults to floating point.
QUANT_TABLE = (
    ("patch_embed.proj", nn.Conv2d, "quantize_patch_embed"),
    ("attn.qkv", nn.Dense, None),
    ("attn.matmul1", MatMul, "quantize_matmul1"),
    ("attn.matmul2", MatMul, "quantize_matmul2"),
    ("attn.proj", nn.Dense, None),
    ("mlp.fc1", nn.Dense, None),
    ("mlp.fc2", nn.Dense, None),
    ("head", nn.Dense, "quantize_head"),
)


# Defaults of the switches above (quant.py passes the resolved config, which has them all).
SWITCH_DEFAULTS = {"quantize_patch_embed": True, "quantize_matmul1": True, "quantize_matmul2": True,
                   "quantize_head": False}


def _matches(name, suffix):
    return name == suffix or name.endswith("." + suffix)


def quant_targets(model, qcfg):
    """Names of the cells that qcfg quantizes, in forward order."""
    names = []
    for name, cell in model.cells_and_names():
        for suffix, typ, key in QUANT_TABLE:
            if _matches(name, suffix) and isinstance(cell, typ) and (key is None or qcfg.get(key, SWITCH_DEFAULTS[key])):
                names.append(name)
    return names


def _set_child(model, name, new):
    parent_name, _, child = name.rpartition(".")
    parent = dict(model.cells_and_names())[parent_name] if parent_name else model
    parent.insert_child_to_cell(child, new)
    for p in new.get_parameters():  # keep the full-precision names: blocks.N.attn.qkv.weight, ...
        p.name = f"{name}.{p.name.rpartition('.')[2]}"


def quantize_model(model, qcfg, layer_bits=None):
    """Swap the cells named by QUANT_TABLE and qcfg for fake-quantized ones, in place.

    qcfg keys: w_bits, a_bits, weight_per_channel, softmax_unsigned, quantize_head,
    quantize_patch_embed, quantize_matmul1, quantize_matmul2. layer_bits: optional
    {name: {"w": bits, "a": bits, "b": bits}} overriding the uniform widths (mixed precision).
    Returns the replaced names in forward order. Quantization starts switched off."""
    layer_bits = layer_bits or {}
    cells = dict(model.cells_and_names())
    names = quant_targets(model, qcfg)
    if not names:
        warnings.warn(f"quantize_model: no cell of {type(model).__name__} matched the quantization table")
    per_channel = bool(qcfg.get("weight_per_channel", False))
    for name in names:
        cell, bits = cells[name], layer_bits.get(name, {})
        wb, ab = bits.get("w", qcfg["w_bits"]), bits.get("a", qcfg["a_bits"])
        if isinstance(cell, nn.Conv2d):
            new = quant_conv_from(cell, wb, ab, per_channel)
        elif isinstance(cell, nn.Dense):
            asym = name.endswith("mlp.fc2") and bool(qcfg.get("gelu_asymmetric"))  # vtptq_plus
            new = quant_dense_from(cell, wb, ab, per_channel, asym=asym)
        else:
            unsigned = name.endswith("matmul2") and qcfg.get("softmax_unsigned", False)
            kind = softmax_kind(qcfg) if name.endswith("matmul2") else "uniform"
            new = quant_matmul_from(cell, ab, bits.get("b", ab), a_signed=not unsigned, a_kind=kind)
            if name.endswith("matmul1"):  # Q·Kᵀ: its output times the attention's scale is the score matrix
                new.is_attention_scores = True
                new.scores_scale = float(cells[name.rpartition(".")[0]].scale)
        new.layer_name = name
        _set_child(model, name, new)
    return names


def softmax_kind(qcfg):
    """Initial grid kind of the softmax output (vtptq_plus's softmax_quantizer; 'auto' starts
    from log2 and calibration picks per layer)."""
    choice = qcfg.get("softmax_quantizer") or "uniform"
    return "log2" if choice == "auto" else choice


def quant_cells(model):
    """[(name, cell)] of the fake-quantized cells, in forward order."""
    return [(n, c) for n, c in model.cells_and_names() if isinstance(c, QUANT_CELLS)]


def set_quant_mode(model, mode):
    """Model-wide mode: 'fp' (every quantizer off) or 'quantized' (every quantizer on)."""
    if mode not in ("fp", "quantized"):
        raise ValueError(f"quant mode is {mode!r}; expected 'fp' or 'quantized'")
    on = mode == "quantized"
    for _, cell in quant_cells(model):
        cell.set_quant(weight=on, act=on)


def freeze_weights(model, already_quantized=False):
    """Quantize every quantized layer's weight once and skip its weight quantizer in the forward
    pass (QuantCellMixin.freeze_weight; the outputs are bit-identical). For evaluation, after the
    intervals are final. already_quantized: the weights hold codes x interval (a loaded checkpoint)."""
    for _, cell in quant_cells(model):
        cell.freeze_weight(already_quantized)


def evaluation_model(model, model_name):
    """The model `eval.py --ckpt` builds from this quantized model's checkpoint (saved to a
    temporary folder and loaded: weights frozen, in quantized mode), for benchmarks."""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "quantized.ckpt")
        save_quantized_checkpoint(model, path, model_name)
        return load_quantized_checkpoint(path, model_name)[0]


def _is_scale(name):
    return name.rsplit(".", 1)[-1] in ("w_scale", "a_scale", "b_scale", "a_zero_point")


def check_calibrated(qcells):
    """A one-line ValueError for a quantized cell (of [(name, cell)]) that is switched off or
    never calibrated (an interval still at its initial 1.0): the exporters refuse such a model."""
    for name, cell in qcells:
        for op in cell.operands:
            if not getattr(cell, f"{op}_on"):
                raise ValueError(f"{name}: quantizer '{op}' is off; export a model in quantized mode "
                                 f"(src.quant.set_quant_mode(model, 'quantized'))")
            if np.all(cell.get_scale(op) == 1.0):
                raise ValueError(f"{name}: interval '{op}_scale' is still its initial 1.0 (not calibrated); "
                                 f"calibrate the model (quant.py) before exporting")


def model_size_mb(model, quantized=True):
    """Parameter storage in MB (10^6 bytes): weights of quantized layers at their bit width
    (when `quantized`), every other parameter at 32 bits; intervals are not counted."""
    qbits = {}
    if quantized:
        for name, cell in quant_cells(model):
            if "w" in cell.operands and cell.w_on:
                qbits[f"{name}.weight"] = cell.w_q.bits
    bits = 0
    for pname, p in model.parameters_and_names():
        if _is_scale(pname):
            continue
        bits += int(np.prod(p.shape)) * qbits.get(pname, 32)
    return bits / 8 / 1e6


def size_breakdown(model):
    """Bytes of every quantity the quantized model stores, itemised (the deployed model: the
    weights as packed codes, everything else as quantized.ckpt holds it):
    - quantized_weights: each quantized layer's weight codes packed at its width, ceil(n·b / 8);
    - fp_parameters: every other parameter in float32 (biases with their correction, LayerNorm
      with a folded vtptq_plus reparameterization, embeddings, an FP head), 4 bytes each;
    - intervals: the interval of every quantized operand (one per tensor, or one per output
      channel of a per-channel weight), float32;
    - zero_points: the zero point of an asymmetric grid (vtptq_plus post-GELU), float32;
    - grid_descriptors: one byte per quantized operand for its width, signedness and grid kind
      (uniform, asymmetric, log2, log√2).
    Only operands that are on count. model_size_mb is the paper's measure (quantized weights at
    their width plus the FP parameters), without the last three items."""
    cells = dict(quant_cells(model))
    on = {}
    for name, cell in cells.items():
        for op in cell.operands:
            if getattr(cell, f"{op}_on"):
                on[f"{name}.{op}"] = getattr(cell, f"{op}_q")
    parts = dict.fromkeys(("quantized_weights", "fp_parameters", "intervals", "zero_points", "grid_descriptors"), 0)
    for pname, p in model.parameters_and_names():
        n = int(np.prod(p.shape))
        layer, leaf = pname.rsplit(".", 1) if "." in pname else ("", pname)
        if leaf == "weight" and f"{layer}.w" in on:
            parts["quantized_weights"] += -(-n * on[f"{layer}.w"].bits // 8)
        elif leaf in ("w_scale", "a_scale", "b_scale"):
            parts["intervals"] += 4 * n if f"{layer}.{leaf[0]}" in on else 0
        elif leaf == "a_zero_point":
            parts["zero_points"] += 4 * n if f"{layer}.a" in on else 0
        else:
            parts["fp_parameters"] += 4 * n
    parts["grid_descriptors"] = len(on)
    return parts


def stored_size_mb(model):
    """Sum of size_breakdown(model) in MB (10^6 bytes)."""
    return sum(size_breakdown(model).values()) / 1e6


def layer_report(model):
    """{layer name: {operand: {bits, signed, scale, enabled}}} of the quantized cells."""
    return {name: cell.quant_info() for name, cell in quant_cells(model)}


def save_quantized_checkpoint(model, path, model_name, extra_meta=None):
    """Write the quantized model: the integer weight codes of every quantized layer packed
    densely at their bit width (src.quant.packing: code - qmin, little-endian bitstream) as a
    uint8 array `<layer>.weight_packed`, the intervals and every other parameter in float32,
    and a JSON `quant_meta` entry (format, model name, classes, per-layer bits, and under
    `packed_weights` each packed weight's shape, bits and signedness). Atomic.

    The file is then about model_size_mb(model) plus the intervals and a few bytes per entry."""
    cells = dict(quant_cells(model))
    layers, entries, skip, packed = {}, [], set(), {}
    for name, cell in cells.items():
        layers[name] = {"type": type(cell).__name__,
                        **{op: getattr(cell, f"{op}_q").as_dict() for op in cell.operands}}
        if "w" in cell.operands:
            bits, signed = cell.w_q.bits, cell.w_q.signed
            weight = cell.weight.asnumpy()
            codes = quantize_np(weight, cell.get_scale("w"), bits, signed)
            entries.append({"name": f"{name}.weight_packed", "data": Tensor(pack_codes(codes, bits, signed))})
            packed[name] = {"shape": list(weight.shape), "bits": bits, "signed": signed}
            skip.add(f"{name}.weight")
    for pname, p in model.parameters_and_names():
        if pname not in skip:
            entries.append({"name": pname, "data": Tensor(p.asnumpy())})
    meta = {"format": QCKPT_FORMAT, "model": model_name, "num_classes": int(model.num_classes), "layers": layers,
            "packing": PACKING, "packed_weights": packed}
    meta.update(extra_meta or {})
    # UTF-8 bytes of compact JSON: MindSpore would store a str entry at 4 bytes per character
    text = json.dumps(meta, separators=(",", ":")).encode("utf-8")
    save_checkpoint_atomic(entries, path, append_dict={META_KEY: Tensor(np.frombuffer(text, np.uint8))})


def _decode_meta(raw):
    """quant_meta entry -> dict: UTF-8 bytes in a uint8 tensor (v2) or a string (v1)."""
    if isinstance(raw, str):
        return json.loads(raw)
    value = raw.asnumpy()
    if value.dtype == np.uint8:
        return json.loads(value.tobytes().decode("utf-8"))
    return json.loads(str(value))


def read_quant_meta(path):
    """(quant_meta dict, raw parameters) of a quantized checkpoint (format v2, or v1 with int8/int16
    `<layer>.weight_int`), or None for any other checkpoint. A quant_meta entry that does not
    follow the schema (check_quant_meta) is a one-line ValueError."""
    if not str(path).endswith(".ckpt"):
        return None
    try:
        with quiet_mindspore_log():  # its own log line would name the file a second time
            params = ms.load_checkpoint(path)
    except (RuntimeError, ValueError) as e:  # MindSpore cannot parse the file at all
        raise ValueError(f"{path}: not a MindSpore checkpoint ({first_line(e)})") from None
    if META_KEY not in params:
        return None
    try:
        meta = _decode_meta(params[META_KEY])
    except (ValueError, UnicodeDecodeError) as e:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"{path}: '{META_KEY}' is not UTF-8 JSON ({first_line(e, 120)})") from None
    check_quant_meta(meta, path)
    return meta, params


def check_quant_meta(meta, path):
    """The parts of quant_meta that loading relies on, checked with one-line errors: format,
    model, num_classes, and per layer and operand its bits and signedness (and, in v2, the
    shape, bits and signedness of each packed weight). Other keys are free."""
    def bad(where, expected, value):
        raise ValueError(f"{path}: quant_meta {where} is {short_repr(value)}; expected {expected}")

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def check_bits(where, d):
        if not isinstance(d, dict):
            bad(where, "a mapping with 'bits' and 'signed'", d)
        if not (is_int(d.get("bits")) and MIN_BITS <= d["bits"] <= MAX_BITS):
            bad(f"{where}.bits", f"an integer from {MIN_BITS} to {MAX_BITS}", d.get("bits"))
        if not isinstance(d.get("signed"), bool):
            bad(f"{where}.signed", "true or false", d.get("signed"))
        if "kind" in d and d["kind"] not in KINDS:
            bad(f"{where}.kind", f"one of {', '.join(KINDS)}", d["kind"])

    if not isinstance(meta, dict):
        bad("", "a JSON object", meta)
    if meta.get("format") not in READABLE_FORMATS:
        raise ValueError(f"{path}: unknown quantized checkpoint format {short_repr(meta.get('format'))}; expected one "
                         f"of {', '.join(READABLE_FORMATS)}")
    if not isinstance(meta.get("model"), str):
        bad("'model'", "a model name", meta.get("model"))
    if not (is_int(meta.get("num_classes")) and 1 <= meta["num_classes"] <= MAX_CLASSES):
        bad("'num_classes'", f"an integer from 1 to {MAX_CLASSES}", meta.get("num_classes"))
    layers = meta.get("layers")
    if not isinstance(layers, dict) or not layers:
        bad("'layers'", "a non-empty mapping of layer names to operands", layers)
    for name, ops in layers.items():
        if not isinstance(ops, dict) or not any(k != "type" for k in ops):
            bad(f"layers.{name}", "a mapping of operands to their bits", ops)
        for op, d in ops.items():
            if op != "type":
                check_bits(f"layers.{name}.{op}", d)
    if meta["format"] == QCKPT_FORMAT:
        packed = meta.get("packed_weights")
        if not isinstance(packed, dict):
            bad("'packed_weights'", "a mapping of layer names to packed weights", packed)
        for name, d in packed.items():
            check_bits(f"packed_weights.{name}", d)
            shape = d.get("shape")
            if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(is_int(v) and v >= 1 for v in shape)):
                bad(f"packed_weights.{name}.shape", "a list of 1 to 8 positive integers", shape)


def _weight_codes(path, meta, params, name, cell):
    """Integer weight codes of layer `name` from a v2 (packed) or v1 (int8/int16) checkpoint,
    checked against the cell's weight shape; returns (codes, the raw entry's name)."""
    shape = tuple(cell.weight.shape)
    if meta["format"] == QCKPT_FORMAT_V1:
        key = f"{name}.weight_int"
        if key not in params:
            raise ValueError(f"{path}: quantized checkpoint has no '{key}'")
        codes = params[key].asnumpy()
    else:
        key = f"{name}.weight_packed"
        info = meta.get("packed_weights", {}).get(name)
        if key not in params or info is None:
            raise ValueError(f"{path}: quantized checkpoint has no packed weight of layer '{name}'")
        if info["bits"] != cell.w_q.bits or bool(info["signed"]) != cell.w_q.signed:
            raise ValueError(f"{path}: packed weight of '{name}' has {info['bits']} bits (signed "
                             f"{info['signed']}), the layer {cell.w_q.bits} (signed {cell.w_q.signed})")
        if tuple(info["shape"]) != shape:  # before unpacking: the shape sizes the codes' array
            raise ValueError(f"{path}: quant_meta packed_weights.{name}.shape is {list(info['shape'])}; layer "
                             f"'{name}' expects {list(shape)}")
        try:
            codes = unpack_codes(params[key].asnumpy(), info["bits"], info["signed"], info["shape"])
        except ValueError as e:
            raise ValueError(f"{path}: '{key}': {e}") from None
    if tuple(codes.shape) != shape:
        raise ValueError(f"{path}: '{key}' has shape {tuple(codes.shape)}; layer '{name}' expects {shape}")
    return codes, key


def _check_entries(path, meta, params):
    """Before anything is built from a quantized checkpoint: its head has num_classes outputs
    (a count that sizes an allocation is checked against the file), and every float entry
    is finite (the first NaN or infinity is named)."""
    from ..models.weights import check_finite
    n = meta["num_classes"]
    head = [(k, tuple(params[k].shape)[:1]) for k in ("head.bias", "head.weight") if k in params]
    if "head" in meta.get("packed_weights", {}):
        head.append(("quant_meta packed_weights.head.shape", tuple(meta["packed_weights"]["head"]["shape"][:1])))
    if not head:
        raise ValueError(f"{path}: quantized checkpoint has no 'head.bias'; cannot check quant_meta 'num_classes' "
                         f"({n}) against the head")
    for key, rows in head:
        if rows != (n,):
            raise ValueError(f"{path}: quant_meta 'num_classes' is {n} but '{key}' has {rows[0] if rows else 0} "
                             "rows; expected the head's number of classes")
    for key, value in params.items():
        if key == META_KEY or isinstance(value, str) or not hasattr(value, "asnumpy"):
            continue
        if value.dtype in (ms.float16, ms.float32, ms.float64, ms.bfloat16):
            check_finite(value.astype(ms.float32).asnumpy(), key, str(path))  # a CheckpointError (ValueError)


def load_quantized_checkpoint(path, model_name=None):
    """Build the model saved by save_quantized_checkpoint, in quantized mode.

    model_name: if given and different from the checkpoint's model, an error."""
    from ..models import create_model
    found = read_quant_meta(path)
    if found is None:
        raise ValueError(f"{path}: not a quantized checkpoint (no '{META_KEY}' entry)")
    meta, params = found
    if model_name is not None and model_name != meta["model"]:
        raise ValueError(f"{path}: quantized checkpoint of model '{meta['model']}', not '{model_name}'")
    _check_entries(path, meta, params)  # before the model is built: its head is sized by num_classes
    model = create_model(meta["model"], num_classes=meta["num_classes"])
    layers = meta["layers"]
    qcfg = {"w_bits": 8, "a_bits": 8, "quantize_head": False, "quantize_patch_embed": False,
            "quantize_matmul1": False, "quantize_matmul2": False}
    for suffix, _, key in QUANT_TABLE:
        if key is not None:
            qcfg[key] = any(_matches(n, suffix) for n in layers)
    def entry(key):
        if key not in params:
            raise ValueError(f"{path}: quantized checkpoint has no '{key}' (its quant_meta lists the layer)")
        return params[key]

    def scale_size(key):
        shape = tuple(entry(key).shape)
        if not shape or shape[0] < 1:
            raise ValueError(f"{path}: '{key}' has shape {shape}; expected one interval, or one per output "
                             "channel along the first axis")
        return shape[0]

    qcfg["weight_per_channel"] = any(scale_size(f"{n}.w_scale") > 1 for n in layers if "w" in layers[n])
    qcfg["gelu_asymmetric"] = any(d.get("a", {}).get("kind") == "asym" for d in layers.values())
    layer_bits = {n: {op: v["bits"] for op, v in d.items() if op != "type"} for n, d in layers.items()}
    names = quantize_model(model, qcfg, layer_bits)
    if sorted(names) != sorted(layers):
        raise ValueError(f"{path}: quantized layers {sorted(layers)} do not match model '{meta['model']}' "
                         f"({sorted(names)})")
    cells = dict(quant_cells(model))
    loaded = set()
    for name, d in layers.items():
        cell = cells[name]
        for op in cell.operands:
            if op not in d:
                raise ValueError(f"{path}: quant_meta layers.{name} has no operand '{op}'")
            cell.set_bits(op, d[op]["bits"], d[op]["signed"], d[op].get("kind", "uniform"))
            try:
                cell.set_scale(op, entry(f"{name}.{op}_scale").asnumpy())
            except ValueError as e:  # wrong shape, not finite, not positive
                raise ValueError(f"{path}: '{name}.{op}_scale': {first_line(e)}") from None
            loaded.add(f"{name}.{op}_scale")
        if "w" in cell.operands:
            codes, key = _weight_codes(path, meta, params, name, cell)
            cell.weight.set_data(Tensor(codes.astype(np.float32) * cell.get_scale("w")))
            loaded.update({key, f"{name}.weight"})
    missing = []
    for pname, p in model.parameters_and_names():
        if pname in loaded:
            continue
        if pname not in params:
            missing.append(pname)
            continue
        p.set_data(Tensor(params[pname].asnumpy()))
        loaded.add(pname)
    unexpected = sorted(set(params) - loaded - {META_KEY})
    if missing or unexpected:
        raise ValueError(f"{path}: quantized checkpoint does not fit model '{meta['model']}': "
                         f"missing {missing[:8]}, unexpected {unexpected[:8]}")
    set_quant_mode(model, "quantized")
    freeze_weights(model, already_quantized=True)  # codes x interval already: no weight quantizer in the forward pass
    model.model_name = meta["model"]
    return model, meta


__all__ = ["QUANT_TABLE", "quant_targets", "quantize_model", "quant_cells", "set_quant_mode", "freeze_weights", "evaluation_model", "model_size_mb",
           "size_breakdown", "stored_size_mb",
           "layer_report", "check_calibrated", "save_quantized_checkpoint", "load_quantized_checkpoint", "read_quant_meta",
           "QuantDense", "QuantConv2d", "QuantMatMul"]
