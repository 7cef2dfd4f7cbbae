"""Reading pretrained weights and loading them strictly into a `VisionTransformer`.

Supported files (`read_state_dict`):
  .ckpt         MindSpore checkpoint (`mindspore.load_checkpoint`); names as stored.
  .safetensors  read with a small numpy reader (no dependency on the safetensors package);
                F32/F16/BF16/F64 become float32, integer tensors keep their type.
  .npz          either timm names (`blocks.0.attn.qkv.weight`, ...) or the original Google ViT
                layout (`Transformer/encoderblock_N/...`, optionally under `opt/target/`),
                which is converted to timm names and shapes.
  .pth/.pt/.bin PyTorch state dict (timm / DeiT repository); needs `torch`, and is read with
                `weights_only=True` so that no pickled code is ever run.

Every reader returns a plain dict name -> numpy array. `to_model_names` renames timm LayerNorm
parameters (`X.weight`/`X.bias`) to MindSpore's (`X.gamma`/`X.beta`), and
`load_checkpoint_into` checks names and shapes against the model before copying anything:
missing keys, unexpected keys and shape mismatches are all reported at once in a
`CheckpointError` that names the file.

Non-parameter entries. MindSpore checkpoints may carry optimizer state (`moment1.*`,
`global_step`, `learning_rate`, ...) and values written with `append_dict` (epoch numbers,
strings, scalars). Those are dropped by `is_metadata_key` / the `.ckpt` reader: entries whose
name has a prefix in `METADATA_PREFIXES` (or is in `METADATA_NAMES`), strings, non-float
tensors and 0-d scalars. A later stage that stores quantization metadata (scales, zero points,
bit widths) in checkpoints should put it under a prefix registered with
`register_metadata_prefix` (the prefix `quant.` is registered here already) so that the float
loader ignores it; `read_state_dict(path, keep_metadata=True)` returns everything.
"""
import json
import os
import re

import numpy as np

from ..utils import short_repr

__all__ = ["CheckpointError", "TorchRequiredError", "SUPPORTED_EXTENSIONS", "METADATA_PREFIXES",
           "METADATA_NAMES", "register_metadata_prefix", "is_metadata_key", "read_state_dict",
           "read_safetensors", "convert_google_vit", "to_model_names", "load_checkpoint_into", "check_finite",
           "save_mindspore_checkpoint"]

SUPPORTED_EXTENSIONS = (".ckpt", ".safetensors", ".npz", ".pth", ".pt", ".bin")

# Names that are never model parameters (optimizer state, training bookkeeping, metadata).
METADATA_PREFIXES = ["moment1.", "moment2.", "moments.", "accum.", "adam_m.", "adam_v.",
                     "global_step", "learning_rate", "beta1_power", "beta2_power", "scale_sense",
                     "current_iterator_step", "last_overflow_iterator_step", "epoch_num", "step_num",
                     "quant."]
METADATA_NAMES = {"lr", "epoch", "step", "loss_scale"}

_MAX_LIST = 12  # how many keys an error message lists before summarizing


class CheckpointError(ValueError):
    """A checkpoint cannot be read, or does not fit the model. The message names the file."""


class TorchRequiredError(CheckpointError, ImportError):
    """A PyTorch file was given but torch is not installed."""


def register_metadata_prefix(prefix):
    """Declare that checkpoint entries starting with `prefix` are metadata, not parameters."""
    if prefix not in METADATA_PREFIXES:
        METADATA_PREFIXES.append(prefix)


def is_metadata_key(name):
    return name in METADATA_NAMES or any(name.startswith(p) for p in METADATA_PREFIXES)


def _label(path):
    return os.fspath(path) if path is not None else "<state dict>"


def _list(items):
    items = list(items)
    shown = ", ".join(str(i) for i in items[:_MAX_LIST])
    if len(items) > _MAX_LIST:
        shown += f", ... ({len(items) - _MAX_LIST} more)"
    return shown


def _shape(s):
    return "(" + ", ".join(str(int(d)) for d in s) + ")"


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

def read_state_dict(path, keep_metadata=False):
    """Read a weight file into a dict name -> numpy array (float parameters as float32).

    Names are those of the file (timm names for .safetensors/.pth/.npz, converted from the
    Google layout for its .npz files; MindSpore names for .ckpt); see `to_model_names`.
    keep_metadata: keep entries that `is_metadata_key` would drop.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".ckpt":
        state = _read_ckpt(path, keep_metadata)
    elif ext == ".safetensors":
        state = read_safetensors(path)
    elif ext == ".npz":
        state = _read_npz(path)
    elif ext in (".pth", ".pt", ".bin"):
        state = _read_torch(path)
    else:
        raise CheckpointError(f"unsupported checkpoint file '{path}': extension '{ext or '(none)'}' "
                              f"is not one of {', '.join(SUPPORTED_EXTENSIONS)}")
    if not keep_metadata:
        state = {k: v for k, v in state.items() if not is_metadata_key(k)}
    return state


def _read_ckpt(path, keep_metadata):
    import mindspore as ms
    from ..utils import first_line, quiet_mindspore_log
    try:
        with quiet_mindspore_log():  # its own log line would name the file a second time
            raw = ms.load_checkpoint(path)
    except Exception as e:  # MindSpore raises ValueError/RuntimeError on corrupt files
        raise CheckpointError(f"cannot read MindSpore checkpoint '{path}': {first_line(e)}") from e
    state = {}
    for name, value in raw.items():
        if isinstance(value, str) or not hasattr(value, "asnumpy"):
            continue  # strings/other values written with append_dict
        is_float = value.dtype in (ms.float16, ms.float32, ms.float64, ms.bfloat16)
        if is_float and value.dtype != ms.float32:
            value = value.astype(ms.float32)
        arr = value.asnumpy()
        if not keep_metadata and (not is_float or arr.ndim == 0):
            continue  # step counters, epoch numbers, scalar learning rates ...
        state[name] = arr
    return state


_ST_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
              "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


# Bounds checked before anything is allocated: the JSON header (the format's own limit) and
# the number of dimensions of a tensor.
MAX_SAFETENSORS_HEADER = 100_000_000
MAX_TENSOR_DIMS = 8


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _st_entry(path, name, info, data_bytes):
    """(dtype, shape, begin, end) of one safetensors header entry, every field checked; a bad
    one is a one-line CheckpointError naming the file, the tensor and the key."""
    def bad(key, value, expected):
        raise CheckpointError(f"'{path}': tensor {name!r}: '{key}' is {short_repr(value)}; expected {expected}")

    if not isinstance(info, dict):
        bad("entry", info, "a mapping with 'dtype', 'shape' and 'data_offsets'")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in info:
            raise CheckpointError(f"'{path}': tensor {name!r} has no '{key}'")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        bad("dtype", dtype, f"one of {', '.join(_ST_DTYPES)}")
    if not (isinstance(shape, list) and len(shape) <= MAX_TENSOR_DIMS and all(_is_int(d) and d >= 0 for d in shape)):
        bad("shape", shape, f"a list of at most {MAX_TENSOR_DIMS} non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(v) for v in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        bad("data_offsets", offsets, f"[begin, end] with 0 <= begin <= end <= {data_bytes} (the data's size)")
    begin, end = offsets
    count = 1
    for d in shape:  # Python integers: no overflow
        count *= d
    if count * np.dtype(_ST_DTYPES[dtype]).itemsize != end - begin:
        raise CheckpointError(f"'{path}': tensor {name!r}: 'data_offsets' {offsets} hold {end - begin} bytes; "
                              f"dtype {dtype} and shape {shape} need {count * np.dtype(_ST_DTYPES[dtype]).itemsize}")
    return dtype, tuple(shape), begin, end


def read_safetensors(path):
    """Minimal .safetensors reader: 8-byte little-endian header length, a JSON header
    {name: {dtype, shape, data_offsets: [begin, end]}} (plus optional `__metadata__`), then
    the raw little-endian data, offsets counted from the end of the header. Every field of
    the header is checked (types, ranges, sizes against the file) before any tensor is read."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"'{path}' is not a safetensors file (too short)")
        n = int.from_bytes(head, "little")
        if n <= 0 or 8 + n > size or n > MAX_SAFETENSORS_HEADER:
            raise CheckpointError(f"'{path}' is not a safetensors file (header length {n}; expected 1 to "
                                  f"{min(size - 8, MAX_SAFETENSORS_HEADER)} bytes)")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"'{path}' is not a safetensors file (bad JSON header: "
                                  f"{str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"'{path}': the safetensors header is a JSON {type(header).__name__}; "
                                  "expected an object of tensor names")
        base = 8 + n
        entries = {name: _st_entry(path, name, info, size - base)
                   for name, info in header.items() if name != "__metadata__"}
        state = {}
        for name, (dtype, shape, begin, end) in entries.items():
            np_dtype = np.dtype(_ST_DTYPES[dtype])
            f.seek(base + begin)
            data = f.read(end - begin)
            if len(data) != end - begin:
                raise CheckpointError(f"'{path}': tensor {name!r} is cut short (the file changed while read)")
            arr = np.frombuffer(data, dtype=np_dtype).reshape(shape)
            if dtype == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            elif dtype in ("F16", "F64"):
                arr = arr.astype(np.float32)
            else:
                arr = arr.astype(arr.dtype.newbyteorder("="), copy=True)  # native and writable
            state[name] = arr
    return state


def _read_npz(path):
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files}
    except ValueError as e:
        raise CheckpointError(f"cannot read '{path}' as a numpy .npz archive of arrays: {e}") from e
    except Exception as e:  # zipfile.BadZipFile, OSError
        raise CheckpointError(f"cannot read '{path}' as a numpy .npz archive: {e}") from e
    state = {(k[len("opt/target/"):] if k.startswith("opt/target/") else k): v for k, v in state.items()}
    if any(k.startswith("Transformer/") for k in state):
        state = convert_google_vit(state, path)
    return {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in state.items()}


def convert_google_vit(state, path=None):
    """Convert the original (JAX/Flax) ViT checkpoint layout to timm names and shapes.

    Conv kernel HWIO -> OIHW; dense kernels (in, out) -> (out, in); per-head query/key/value
    kernels (D, heads, head_dim) are fused into timm's `qkv.weight` (3D, D) in q, k, v order.
    Keys that are not recognized are passed through unchanged (the strict loader reports them).
    """
    src = dict(state)
    if any(k.startswith("pre_logits/") for k in src):
        raise CheckpointError(f"'{_label(path)}' has a 'pre_logits' representation layer (ViT "
                              "checkpoints pre-trained on ImageNet-21k with a pre-logits head); "
                              "this layer is not supported, use a fine-tuned checkpoint without it")
    out = {}

    def take(key):
        if key not in src:
            raise CheckpointError(f"'{_label(path)}': Google ViT layout but '{key}' is missing")
        return np.asarray(src.pop(key))

    def dense(prefix, name):
        out[name + ".weight"] = take(prefix + "/kernel").T
        out[name + ".bias"] = take(prefix + "/bias")

    def norm(prefix, name):
        out[name + ".weight"] = take(prefix + "/scale")
        out[name + ".bias"] = take(prefix + "/bias")

    if "embedding/kernel" in src:
        out["patch_embed.proj.weight"] = take("embedding/kernel").transpose(3, 2, 0, 1)
        out["patch_embed.proj.bias"] = take("embedding/bias")
    if "cls" in src:
        out["cls_token"] = take("cls")
    if "Transformer/posembed_input/pos_embedding" in src:
        out["pos_embed"] = take("Transformer/posembed_input/pos_embedding")
    if "Transformer/encoder_norm/scale" in src:
        norm("Transformer/encoder_norm", "norm")
    if "head/kernel" in src:
        dense("head", "head")
    blocks = sorted({int(m.group(1)) for k in src
                     for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
    for i in blocks:
        p, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        norm(p + "LayerNorm_0", t + "norm1")
        norm(p + "LayerNorm_2", t + "norm2")
        att = p + "MultiHeadDotProductAttention_1/"
        ws, bs = [], []
        for part in ("query", "key", "value"):
            k = take(att + part + "/kernel")             # (D, heads, head_dim)
            ws.append(k.reshape(k.shape[0], -1).T)       # (heads*head_dim, D)
            bs.append(take(att + part + "/bias").reshape(-1))
        out[t + "attn.qkv.weight"] = np.concatenate(ws, axis=0)
        out[t + "attn.qkv.bias"] = np.concatenate(bs, axis=0)
        k = take(att + "out/kernel")                     # (heads, head_dim, D)
        out[t + "attn.proj.weight"] = k.reshape(-1, k.shape[-1]).T
        out[t + "attn.proj.bias"] = take(att + "out/bias")
        dense(p + "MlpBlock_3/Dense_0", t + "mlp.fc1")
        dense(p + "MlpBlock_3/Dense_1", t + "mlp.fc2")
    out.update(src)  # leftovers: reported as unexpected by the loader
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


_TORCH_HELP = ("save it as .safetensors or .npz where PyTorch is available, e.g. "
               "python -c \"import torch, safetensors.torch as st; sd = torch.load('IN.pth', "
               "map_location='cpu', weights_only=True); sd = sd.get('model', sd); "
               "st.save_file({k: v.contiguous() for k, v in sd.items()}, 'OUT.safetensors')\" "
               "(or numpy.savez('OUT.npz', **{k: v.float().numpy() for k, v in sd.items()})), then use "
               "that file directly or convert it with scripts/convert_weights.py")


def _read_torch(path):
    try:
        import torch
    except ImportError as e:
        raise TorchRequiredError(f"reading the PyTorch file '{path}' needs torch, which is not "
                                 f"installed; {_TORCH_HELP}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # includes the refusal of pickled code under weights_only
        raise CheckpointError(f"cannot read PyTorch file '{path}' with weights_only=True "
                              f"(only plain tensor state dicts are accepted): {e}") from e
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"PyTorch file '{path}' does not hold a state dict "
                              f"(got {type(obj).__name__})")
    state = {}
    for k, v in obj.items():
        if not torch.is_tensor(v):
            continue
        if k.startswith("module."):
            k = k[len("module."):]
        v = v.detach().cpu()
        state[k] = v.float().numpy() if v.is_floating_point() else v.numpy()
    return state


# --------------------------------------------------------------------------------------------
# Loading into a model
# --------------------------------------------------------------------------------------------

def _model_params(model):
    return dict(model.parameters_and_names())


def to_model_names(state, model):
    """Rename a state dict to the model's parameter names: timm LayerNorm `X.weight`/`X.bias`
    become `X.gamma`/`X.beta` where the model has `X.gamma`; other names pass through."""
    params = _model_params(model)
    out = {}
    for k, v in state.items():
        for old, new in ((".weight", ".gamma"), (".bias", ".beta")):
            if k.endswith(old):
                cand = k[: -len(old)] + new
                if cand in params and k not in params:
                    k = cand
                break
        out[k] = v
    return out


QUANT_STATE_SUFFIXES = (".w_scale", ".a_scale", ".b_scale")


def _is_quant_state(name):
    return name.endswith(QUANT_STATE_SUFFIXES)


def load_checkpoint_into(model, path_or_state, drop_head=False):
    """Strictly load weights into `model` (a file path or a dict name -> array).

    Every parameter of the model must be present with its exact shape and nothing else may
    be in the checkpoint (metadata entries aside); otherwise a `CheckpointError` lists the
    missing and unexpected keys and the mismatched shapes. drop_head: do not load `head.*`
    (the model keeps its freshly initialized head, e.g. for another number of classes).
    Returns the list of parameter names that were loaded.
    """
    from mindspore import Tensor
    if isinstance(path_or_state, dict):
        label, state = "<state dict>", {k: np.asarray(v) for k, v in path_or_state.items()
                                        if not is_metadata_key(k)}
        if any(k.startswith("Transformer/") for k in state):
            state = convert_google_vit(state)
    else:
        label, state = os.fspath(path_or_state), read_state_dict(path_or_state)
    mname = getattr(model, "model_name", type(model).__name__)
    where = f"checkpoint '{label}'"

    if "dist_token" in state or any(k.startswith("head_dist.") for k in state):
        raise CheckpointError(f"{where} is a distilled DeiT model (it has 'dist_token'/'head_dist'); "
                              "distilled models are not supported, use the non-distilled deit_* "
                              "weights (e.g. deit_small_patch16_224-cd65a155.pth)")
    if any(k.startswith("pre_logits.") for k in state):
        raise CheckpointError(f"{where} has a 'pre_logits' representation layer, which is not "
                              "supported; use a fine-tuned checkpoint without it")

    state = to_model_names(state, model)
    params = _model_params(model)

    if drop_head:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        expected = {k: p for k, p in params.items() if not k.startswith("head.")}
    else:
        expected = params
        hw = state.get("head.weight")
        mw = params.get("head.weight")
        if hw is not None and mw is None:
            raise CheckpointError(f"{where} has a classification head with {hw.shape[0]} classes but "
                                  f"model '{mname}' has none; pass drop_head=True (--drop-head) to "
                                  "skip the checkpoint's head")
        if hw is not None and hw.ndim == 2 and tuple(hw.shape) != tuple(mw.shape) \
                and hw.shape[1:] == tuple(mw.shape[1:]):
            raise CheckpointError(f"{where} has a head for {hw.shape[0]} classes but model '{mname}' "
                                  f"has {mw.shape[0]} (head.weight {_shape(hw.shape)} vs "
                                  f"{_shape(mw.shape)}); pass num_classes={hw.shape[0]} to use the "
                                  "checkpoint's head, or drop_head=True (eval.py/convert_weights.py "
                                  "flag --drop-head) to keep a freshly initialized head")
    pe = state.get("pos_embed")
    if pe is not None and "pos_embed" in expected and tuple(pe.shape) != tuple(expected["pos_embed"].shape):
        raise CheckpointError(f"{where}: pos_embed shape {_shape(pe.shape)} does not match model "
                              f"'{mname}' pos_embed {_shape(expected['pos_embed'].shape)} (different "
                              "input resolution, patch size or width); position embeddings are not "
                              "interpolated, use a model that matches the checkpoint")

    # the intervals of fake-quantized cells are calibration state, not FP weights: an FP
    # checkpoint loads into a quantized model and leaves them as they are
    expected = {k: p for k, p in expected.items() if k in state or not _is_quant_state(k)}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {_shape(state[k].shape)} vs model {_shape(p.shape)}"
                  for k, p in expected.items() if k in state and tuple(state[k].shape) != tuple(p.shape)]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}): {_list(mismatched)}")
        raise CheckpointError(f"{where} does not match model '{mname}': " + "; ".join(parts))

    for k in state:  # every value checked before any is copied, the first bad one named
        arr = np.asarray(state[k])
        if arr.dtype.kind not in "fiub":
            raise CheckpointError(f"{where}: '{k}' has non-numeric dtype {arr.dtype}")
        check_finite(arr, k, where)
    for k, p in expected.items():
        p.set_data(Tensor(np.ascontiguousarray(state[k]), dtype=p.dtype))
    return list(expected)


def check_finite(arr, key, where):
    """A CheckpointError naming `where` and `key` if the float array holds a NaN or an infinity."""
    arr = np.asarray(arr)
    if arr.dtype.kind != "f":
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        first = np.unravel_index(int(np.argmax(bad)), arr.shape) if arr.ndim else ()
        raise CheckpointError(f"{where}: '{key}' holds {int(bad.sum())} NaN or infinite values (first "
                              f"{float(arr[first])} at index {list(map(int, first))}); weights must be finite")


def save_mindspore_checkpoint(model, path):
    """Write the model's parameters to a MindSpore .ckpt file atomically."""
    from ..utils import save_checkpoint_atomic
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    save_checkpoint_atomic(model, path)
