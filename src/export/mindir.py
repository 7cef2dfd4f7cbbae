"""MindIR export of a quantized model, and a loader that evaluates the exported file like a Cell.

The exported graph is the quantized Cell's forward pass in quantized mode (fake quantization:
weights and activations rounded to their grids and rescaled, float32 arithmetic), compiled for
one fixed input shape (batch, C, H, W); its logits equal the Cell's. MindIRModel splits and
zero-pads other batch sizes.

Metadata: the file carries its own, in the MindIR ModelProto's `user_info` map (written through
mindspore.export's `custom_func`): key `vtptq`, a JSON object with format, model name,
num_classes, batch size and input shape. No sidecar file. A MindIR file without it (exported
elsewhere) still loads: the input shape and class count then come from the graph's input and
output, and the model name is None.

Models whose parameters exceed MindSpore's 1 GB limit for one file (ViT-L) are saved by
mindspore.export as a graph file plus a `<stem>_variables/` folder next to it; export_mindir
then writes `path` (the graph) and `<stem>_variables/`, which must stay side by side.
"""
import json
import os
import shutil
import tempfile

import numpy as np

from ..utils import make_readable, os_errors_name

MINDIR_FORMAT = "vtptq-mindir-v1"
USER_INFO_KEY = "vtptq"
USER_INFO_FIELD = 14  # ModelProto.user_info (mindspore/core/proto/mind_ir.proto)


def _check_path(path):
    path = os.fspath(path)
    if not path.endswith(".mindir"):
        raise ValueError(f"{path}: a MindIR file name must end with '.mindir' (mindspore.load requires it)")
    return path


def _variables_dir(path):
    """The folder that holds the parameters of a split (> 1 GB) MindIR file."""
    return path[:-len(".mindir")] + "_variables"


def export_mindir(model, path, batch_size, image_size=None, in_chans=None, model_name=None, extra_meta=None):
    """Export `model` (a quantized Cell, left in the mode it is in: load_quantized_checkpoint gives
    quantized mode) to the MindIR file `path` (must end in .mindir) for inputs of shape
    (batch_size, in_chans, image_size, image_size); image_size and in_chans default to the
    model's img_size and in_chans, model_name to model.model_name.

    Written atomically: exported into a temporary folder next to `path`, then renamed; on an
    error nothing is left behind. Returns the metadata dict stored in the file."""
    from ..quant.convert import check_calibrated, quant_cells
    path = _check_path(path)
    check_calibrated(quant_cells(model))  # a quantizer off or never calibrated: refused, nothing written
    batch_size = int(batch_size)
    if batch_size < 1:
        raise ValueError(f"batch size is {batch_size}; expected >= 1")
    image_size = int(image_size if image_size is not None else model.img_size)
    in_chans = int(in_chans if in_chans is not None else model.in_chans)
    shape = [batch_size, in_chans, image_size, image_size]
    meta = {"format": MINDIR_FORMAT, "model": model_name or getattr(model, "model_name", None),
            "num_classes": int(model.num_classes), "batch_size": batch_size, "input_shape": shape}
    meta.update(extra_meta or {})

    def add_user_info(proto):
        proto.user_info[USER_INFO_KEY] = json.dumps(meta)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp", dir=directory)
    try:
        with os_errors_name(path, tmp_dir):  # a full disk names the .mindir file, not the temporary
            _export_into(model, shape, add_user_info, tmp_dir, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return meta


def _export_into(model, shape, add_user_info, tmp_dir, path):
    """mindspore.export into tmp_dir, then the file (and a split save's variables folder) renamed
    onto `path`."""
    import mindspore as ms
    base = os.path.basename(path)
    stem = base[:-len(".mindir")]
    from ..kernels import unfused
    model.set_train(False)
    with unfused(model):  # MindSpore's own operations: the file must not need this machine's fused kernels
        ms.export(model, ms.Tensor(np.zeros(shape, np.float32)), file_name=os.path.join(tmp_dir, stem),
                  file_format="MINDIR", custom_func=add_user_info)
    together = os.path.join(tmp_dir, base)
    split_graph = os.path.join(tmp_dir, f"{stem}_graph.mindir")
    variables = os.path.join(tmp_dir, f"{stem}_variables")
    if os.path.isfile(together):
        produced = together
    elif os.path.isfile(split_graph) and os.path.isdir(variables):
        produced = split_graph
        target = _variables_dir(path)
        if os.path.isdir(target):
            shutil.rmtree(target)
        os.replace(variables, target)
    else:
        raise RuntimeError(f"mindspore.export wrote none of the expected files in {tmp_dir}: "
                           f"{sorted(os.listdir(tmp_dir))}")
    make_readable(produced)
    os.replace(produced, path)


def _parse_proto(data, path):
    from mindspore.train.serialization import mindir_model
    proto = mindir_model()
    try:
        proto.ParseFromString(data)
    except Exception as e:  # protobuf's DecodeError: a file that is not MindIR
        raise ValueError(f"{path}: not a MindIR file ({type(e).__name__})") from None
    return proto


def _read_varint(f):
    value = shift = 0
    while True:
        byte = f.read(1)
        if not byte:
            raise EOFError
        value |= (byte[0] & 0x7F) << shift
        shift += 7
        if byte[0] < 0x80 or shift > 63:
            return value


def _user_info_fields(path):
    """The raw `user_info` fields of a MindIR file (wire format, field 14), found by walking the
    top-level fields and seeking over the others (the graph with its weights is never read)."""
    size = os.path.getsize(path)
    kept = []
    with open(path, "rb") as f:
        while f.tell() < size:
            try:
                key = _read_varint(f)
                field, wire = key >> 3, key & 7
                if wire == 0:
                    _read_varint(f)
                elif wire in (1, 5):
                    f.seek(8 if wire == 1 else 4, os.SEEK_CUR)
                elif wire == 2:
                    length = _read_varint(f)
                    if f.tell() + length > size:
                        raise EOFError
                    if field == USER_INFO_FIELD:
                        kept.append(_varint_bytes(key) + _varint_bytes(length) + f.read(length))
                    else:
                        f.seek(length, os.SEEK_CUR)
                else:
                    raise EOFError
            except EOFError:
                raise ValueError(f"{path}: not a MindIR file (bad protobuf framing)") from None
    return b"".join(kept)


def _varint_bytes(value):
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def read_mindir_meta(path):
    """Metadata of a MindIR file: the dict export_mindir stored, or, for a file exported
    elsewhere, {model: None, num_classes, batch_size, input_shape} from the graph's first input
    and output. FileNotFoundError if it does not exist; ValueError if it is not MindIR."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: MindIR file not found")
    raw = _parse_proto(_user_info_fields(path), path).user_info.get(USER_INFO_KEY)
    if raw:
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: unreadable '{USER_INFO_KEY}' metadata") from None
    with open(path, "rb") as f:  # a file exported elsewhere: parse the graph for its shapes
        proto = _parse_proto(f.read(), path)
    meta = {"format": None, "model": None, "num_classes": None, "batch_size": None, "input_shape": None}
    graph = proto.graph
    if graph.input and graph.input[0].tensor:
        dims = [int(d) for d in graph.input[0].tensor[0].dims]
        meta.update(input_shape=dims, batch_size=dims[0] if dims else None)
    if graph.output and graph.output[0].tensor:
        dims = [int(d) for d in graph.output[0].tensor[0].dims]
        meta["num_classes"] = dims[-1] if dims else None
    return meta


def mindir_model_name(path):
    """The model name a MindIR file was exported from (export_mindir's metadata), or None."""
    try:
        return read_mindir_meta(path).get("model")
    except (FileNotFoundError, ValueError):
        return None


class MindIRModel:
    """An exported MindIR file, called like the model: x Tensor (B, C, H, W) -> logits Tensor
    (B, num_classes) for any B (split into, and zero-padded to, the exported batch size).

    Attributes: path, model_name (None for a file without export_mindir's metadata),
    num_classes, batch_size, input_shape, meta."""

    def __init__(self, path):
        import mindspore as ms
        from mindspore import nn
        path = _check_path(path)
        self.meta = read_mindir_meta(path)  # FileNotFoundError first
        self.path = path
        self.model_name = self.meta.get("model")
        self.num_classes = self.meta.get("num_classes")
        self.input_shape = self.meta.get("input_shape")
        self.batch_size = self.meta.get("batch_size")
        if not self.input_shape or not self.batch_size or self.batch_size < 1:
            raise ValueError(f"{path}: MindIR graph without a fixed input shape")
        try:
            self.graph_cell = nn.GraphCell(ms.load(os.path.abspath(path)))
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"{path}: mindspore.load failed: {str(e).splitlines()[0] if str(e) else e}") from None

    def set_train(self, mode=False):
        """No-op (an exported graph has no training mode); returns self like Cell.set_train."""
        return self

    def __call__(self, x):
        import mindspore as ms
        expect = tuple(self.input_shape[1:])
        if len(x.shape) != 4 or tuple(x.shape[1:]) != expect:
            raise ValueError(f"{self.path}: input of shape {tuple(x.shape)}; the graph takes (B, "
                             f"{', '.join(str(d) for d in expect)})")
        n, b = x.shape[0], self.batch_size
        if n == b:
            return self.graph_cell(x)
        images = x.asnumpy() if isinstance(x, ms.Tensor) else np.asarray(x)
        images = images.astype(np.float32, copy=False)
        out = []
        for start in range(0, n, b):
            part = images[start:start + b]
            if len(part) < b:
                part = np.concatenate([part, np.zeros((b - len(part),) + part.shape[1:], np.float32)])
            out.append(self.graph_cell(ms.Tensor(part)).asnumpy()[:min(b, n - start)])
        if not out:
            return ms.Tensor(np.zeros((0, self.num_classes or 0), np.float32))
        return ms.Tensor(np.concatenate(out))

    def __repr__(self):
        return f"MindIRModel({self.path!r}, model={self.model_name!r}, batch_size={self.batch_size})"


__all__ = ["export_mindir", "MindIRModel", "mindir_model_name", "read_mindir_meta", "MINDIR_FORMAT"]
