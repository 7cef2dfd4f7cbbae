"""Which cells get quantized (one table), model-wide quantization mode, model size, and the
quantized checkpoint (integer weights, intervals, bits per layer, model name)."""
import json
import warnings

import numpy as np
import mindspore as ms
from mindspore import nn, Tensor

from ..models.vit import MatMul
from ..utils import save_checkpoint_atomic
from .layers import QUANT_CELLS, QuantConv2d, QuantDense, QuantMatMul, quant_conv_from, quant_dense_from, \
    quant_matmul_from
from .quantizer import quantize_np, storage_dtype

QCKPT_FORMAT = "vtptq-quantized-v1"
META_KEY = "quant_meta"

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
            new = quant_dense_from(cell, wb, ab, per_channel)
        else:
            unsigned = name.endswith("matmul2") and qcfg.get("softmax_unsigned", False)
            new = quant_matmul_from(cell, ab, bits.get("b", ab), a_signed=not unsigned)
            if name.endswith("matmul1"):  # Q·Kᵀ: its output times the attention's scale is the score matrix
                new.is_attention_scores = True
                new.scores_scale = float(cells[name.rpartition(".")[0]].scale)
        _set_child(model, name, new)
    return names


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


def _is_scale(name):
    return name.rsplit(".", 1)[-1] in ("w_scale", "a_scale", "b_scale")


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


def layer_report(model):
    """{layer name: {operand: {bits, signed, scale, enabled}}} of the quantized cells."""
    return {name: cell.quant_info() for name, cell in quant_cells(model)}


def save_quantized_checkpoint(model, path, model_name, extra_meta=None):
    """Write the quantized model: integer weight codes (int8 up to 8 bits, int16 above) under
    `<layer>.weight_int`, intervals, every other parameter in float32, and a JSON
    `quant_meta` entry (format, model name, classes, per-layer bits). Atomic."""
    cells = dict(quant_cells(model))
    layers, entries, skip = {}, [], set()
    for name, cell in cells.items():
        layers[name] = {"type": type(cell).__name__,
                        **{op: getattr(cell, f"{op}_q").as_dict() for op in cell.operands}}
        if "w" in cell.operands:
            codes = quantize_np(cell.weight.asnumpy(), cell.get_scale("w"), cell.w_q.bits, cell.w_q.signed)
            entries.append({"name": f"{name}.weight_int", "data": Tensor(codes.astype(storage_dtype(cell.w_q.bits)))})
            skip.add(f"{name}.weight")
    for pname, p in model.parameters_and_names():
        if pname not in skip:
            entries.append({"name": pname, "data": Tensor(p.asnumpy())})
    meta = {"format": QCKPT_FORMAT, "model": model_name, "num_classes": int(model.num_classes), "layers": layers}
    meta.update(extra_meta or {})
    save_checkpoint_atomic(entries, path, append_dict={META_KEY: json.dumps(meta)})


def read_quant_meta(path):
    """The `quant_meta` dict of a quantized checkpoint, or None for any other checkpoint."""
    if not str(path).endswith(".ckpt"):
        return None
    params = ms.load_checkpoint(path)
    if META_KEY not in params:
        return None
    raw = params[META_KEY]
    meta = json.loads(raw if isinstance(raw, str) else str(raw.asnumpy()))
    if meta.get("format") != QCKPT_FORMAT:
        raise ValueError(f"{path}: unknown quantized checkpoint format {meta.get('format')!r}; expected {QCKPT_FORMAT}")
    return meta, params


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
    model = create_model(meta["model"], num_classes=meta["num_classes"])
    layers = meta["layers"]
    qcfg = {"w_bits": 8, "a_bits": 8, "quantize_head": False, "quantize_patch_embed": False,
            "quantize_matmul1": False, "quantize_matmul2": False}
    for suffix, _, key in QUANT_TABLE:
        if key is not None:
            qcfg[key] = any(_matches(n, suffix) for n in layers)
    qcfg["weight_per_channel"] = any(params[f"{n}.w_scale"].shape[0] > 1 for n in layers if "w" in layers[n])
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
            cell.set_bits(op, d[op]["bits"], d[op]["signed"])
            cell.set_scale(op, params[f"{name}.{op}_scale"].asnumpy())
            loaded.add(f"{name}.{op}_scale")
        if "w" in cell.operands:
            codes = params[f"{name}.weight_int"].asnumpy().astype(np.float32)
            cell.weight.set_data(Tensor(codes * cell.get_scale("w")))
            loaded.update({f"{name}.weight_int", f"{name}.weight"})
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
    model.model_name = meta["model"]
    return model, meta


__all__ = ["QUANT_TABLE", "quant_targets", "quantize_model", "quant_cells", "set_quant_mode", "model_size_mb",
           "layer_report", "save_quantized_checkpoint", "load_quantized_checkpoint", "read_quant_meta",
           "QuantDense", "QuantConv2d", "QuantMatMul"]
