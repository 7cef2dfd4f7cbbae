"""Packed quantized checkpoint (bit packing, v2 layout, v1 still read), MindIR export and its
loader, and export.py end to end.

Kept fast: a tiny registered ViT (28x28, patch 7, 1 channel, width 32, depth 2) with random
weights, except the on-disk size checks, which use the embedded deit_fmnist (its size makes
the per-entry overhead of the checkpoint format negligible, as for real models).
"""
import importlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _helpers import registered_vit, randomize

import mindspore as ms
from mindspore import Tensor, nn

from src.config import defaults
from src.engine import predict
from src.models import create_model
from src.quant import (calibrate_model, load_quantized_checkpoint, model_size_mb, quant_cells, quantize_model,
                       read_quant_meta, save_quantized_checkpoint)
from src.quant import convert, packing
from src.quant.packing import pack_codes, packed_nbytes, unpack_codes
from src.quant.quantizer import qrange, quantize_np, storage_dtype
from src.export import mindir
from src.export.mindir import MindIRModel, export_mindir, mindir_model_name, read_mindir_meta

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
export_script = importlib.import_module("export")

ms.set_device("CPU")  # before any kernel runs (export.py sets it again)

TINY = "_test_export_tiny_vit"
TINY_CFG = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
FMNIST_CKPT = os.path.join(REPO, "assets", "deit_fmnist.ckpt")


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def restore_mode():
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


@pytest.fixture(autouse=True)
def graph_mode():
    """MindIR export and the loaded graphs are compiled: GRAPH mode, as eval.py runs."""
    ms.set_context(mode=ms.GRAPH_MODE)


@pytest.fixture(scope="module", autouse=True)
def tiny_registered():
    with registered_vit(TINY, TINY_CFG):
        yield TINY


def images(n=8, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def quantized(name=TINY, bits=8, seed=0, calib=8, **kw):
    """A minmax-calibrated quantized model (random weights for the tiny model, the embedded
    weights for deit_fmnist)."""
    if name == "deit_fmnist":
        model = create_model(name, checkpoint=FMNIST_CKPT)
    else:
        model = randomize(create_model(name), seed)
    cfg = dict(defaults(), w_bits=bits, a_bits=bits, **kw)
    quantize_model(model, cfg)
    calibrate_model(model, images(calib, seed=seed + 10), cfg, log=io.StringIO())
    return model


def logits(model, x, batch=None):
    return predict(model, x, batch or len(x))


def close(a, b, rel=1e-6):
    np.testing.assert_allclose(a, b, rtol=0, atol=rel * max(1.0, float(np.abs(b).max())))


@pytest.fixture(scope="module")
def tiny_w8(tmp_path_factory):
    ms.set_context(mode=ms.GRAPH_MODE)
    model = quantized(bits=8)
    path = str(tmp_path_factory.mktemp("tiny_w8") / "quantized.ckpt")
    save_quantized_checkpoint(model, path, TINY, extra_meta={"method": "minmax", "w_bits": 8, "a_bits": 8})
    return model, path


# ----------------------------------------------------------------------------- bit packing

@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_roundtrip_every_width(bits, signed):
    qmin, qmax = qrange(bits, signed)
    rng = np.random.default_rng(bits)
    for n in (0, 1, 3, 7, 9, 1001):  # odd sizes: not a multiple of 8 codes
        codes = rng.integers(qmin, qmax + 1, size=n)
        if n >= 2:
            codes[0], codes[-1] = qmin, qmax  # both extremes present
        packed = pack_codes(codes, bits, signed)
        assert packed.dtype == np.uint8 and packed.ndim == 1
        assert packed.size == packed_nbytes(n, bits) == (n * bits + 7) // 8
        out = unpack_codes(packed, bits, signed, (n,))
        assert out.dtype == np.int32
        np.testing.assert_array_equal(out, codes)
    codes = rng.integers(qmin, qmax + 1, size=(5, 3, 7))  # any shape, kept by unpack
    np.testing.assert_array_equal(unpack_codes(pack_codes(codes, bits, signed), bits, signed, codes.shape), codes)


@pytest.mark.parametrize("bits", [2, 3, 5, 7, 8, 9, 12, 13, 16])
def test_pack_layout_is_little_endian_bitstream(bits):
    """Bit j of code i is stream bit i*bits + j; stream bit k is bit k%8 of byte k//8."""
    qmin, qmax = qrange(bits, True)
    codes = np.random.default_rng(0).integers(qmin, qmax + 1, size=37)
    ref = sum(int(c - qmin) << (i * bits) for i, c in enumerate(codes)).to_bytes((37 * bits + 7) // 8, "little")
    assert pack_codes(codes, bits, True).tobytes() == ref


def test_pack_known_bytes():
    # 4-bit signed: -8, 7, 0 -> unsigned 0, 15, 8 -> nibbles low first: 0xF0, 0x08
    assert pack_codes(np.array([-8, 7, 0]), 4, True).tolist() == [0xF0, 0x08]
    # 3-bit unsigned 1, 2, 7 -> bits 100 010 111 (lsb first) -> 0b11010001, 0b1
    assert pack_codes(np.array([1, 2, 7]), 3, False).tolist() == [0b11010001, 0b1]
    assert pack_codes(np.array([-32768, 32767]), 16, True).tolist() == [0, 0, 0xFF, 0xFF]


@pytest.mark.parametrize("bits", range(2, 17))
def test_pack_extreme_codes(bits):
    for signed in (True, False):
        qmin, qmax = qrange(bits, signed)
        n = 13
        low = pack_codes(np.full(n, qmin), bits, signed)
        assert not low.any()
        high = pack_codes(np.full(n, qmax), bits, signed)
        stream = int.from_bytes(high.tobytes(), "little")
        assert stream == (1 << (n * bits)) - 1  # all code bits set, padding bits zero
        np.testing.assert_array_equal(unpack_codes(high, bits, signed, (n,)), np.full(n, qmax))


def test_pack_in_chunks_equals_one_piece(monkeypatch):
    codes = np.random.default_rng(3).integers(-16, 16, size=1001)
    whole = pack_codes(codes, 5, True)
    monkeypatch.setattr(packing, "CHUNK", 16)
    np.testing.assert_array_equal(pack_codes(codes, 5, True), whole)
    np.testing.assert_array_equal(unpack_codes(whole, 5, True, codes.shape), codes)


def test_pack_errors():
    with pytest.raises(ValueError, match="outside"):
        pack_codes(np.array([0, 8]), 4, True)
    with pytest.raises(ValueError, match="outside"):
        pack_codes(np.array([-1]), 4, False)
    with pytest.raises(ValueError, match="integers"):
        pack_codes(np.array([0.5]), 4, True)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.array([0]), 1, True)
    with pytest.raises(ValueError, match="expected 2"):
        unpack_codes(np.zeros(3, np.uint8), 4, True, (4,))
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(np.zeros(2, np.int8), 4, True, (4,))


# ----------------------------------------------------------------------------- packed checkpoint

@pytest.mark.parametrize("bits", [4, 6])
def test_packed_checkpoint_size_and_roundtrip(bits, tmp_path):
    ms.set_context(mode=ms.PYNATIVE_MODE)  # no export here: skip GRAPH mode's compilations
    model = quantized("deit_fmnist", bits=bits)
    path = str(tmp_path / "quantized.ckpt")
    save_quantized_checkpoint(model, path, "deit_fmnist")
    size_mb = model_size_mb(model)
    on_disk = os.path.getsize(path) / 1e6
    assert size_mb <= on_disk <= 1.03 * size_mb, (on_disk, size_mb)
    fp_disk = os.path.getsize(FMNIST_CKPT) / 1e6
    assert on_disk < 0.25 * fp_disk  # vs the float32 checkpoint of the same model
    x = images(8, seed=5)
    loaded, meta = load_quantized_checkpoint(path, "deit_fmnist")
    np.testing.assert_array_equal(logits(loaded, x), logits(model, x))
    assert model_size_mb(loaded) == size_mb
    raw = ms.load_checkpoint(path)
    assert meta["format"] == convert.QCKPT_FORMAT == "vtptq-quantized-v2"
    cells = dict(quant_cells(model))
    for name, cell in cells.items():
        assert f"{name}.weight_int" not in raw
        if "w" not in cell.operands:
            assert name not in meta["packed_weights"]
            continue
        assert f"{name}.weight" not in raw
        packed = raw[f"{name}.weight_packed"]
        assert packed.dtype == ms.uint8
        info = meta["packed_weights"][name]
        assert info == {"shape": list(cell.weight.shape), "bits": bits, "signed": True}
        assert packed.shape == (packed_nbytes(np.prod(info["shape"]), bits),)
        np.testing.assert_array_equal(unpack_codes(packed.asnumpy(), bits, True, info["shape"]),
                                      quantize_np(cell.weight.asnumpy(), cell.get_scale("w"), bits))


def test_packed_checkpoint_mixed_widths(tmp_path):
    """Per-layer widths (mixed precision), 16-bit weights and odd weight sizes in one file."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = randomize(create_model(TINY), 2)
    cfg = dict(defaults(), w_bits=8, a_bits=8, quantize_head=True)  # head: 32 x 10 codes
    layer_bits = {"blocks.0.attn.qkv": {"w": 3, "a": 5}, "blocks.1.mlp.fc2": {"w": 16, "a": 16},
                  "head": {"w": 7, "a": 8}, "patch_embed.proj": {"w": 5, "a": 8}}
    quantize_model(model, cfg, layer_bits)
    calibrate_model(model, images(8), cfg, log=io.StringIO())
    path = str(tmp_path / "mp.ckpt")
    save_quantized_checkpoint(model, path, TINY)
    meta, raw = read_quant_meta(path)
    assert meta["packed_weights"]["blocks.0.attn.qkv"]["bits"] == 3
    assert raw["blocks.0.attn.qkv.weight_packed"].shape == (96 * 32 * 3 // 8,)
    assert raw["blocks.1.mlp.fc2.weight_packed"].shape == (32 * 128 * 2,)
    loaded, _ = load_quantized_checkpoint(path)
    x = images(8, seed=4)
    np.testing.assert_array_equal(logits(loaded, x), logits(model, x))
    assert dict(quant_cells(loaded))["blocks.0.attn.qkv"].w_q.bits == 3


def write_v1_checkpoint(model, path, model_name):
    """The layout of format v1 (before packing): int8 (<= 8 bits) / int16 codes under
    `<layer>.weight_int` and the metadata as a JSON string."""
    layers, entries, skip = {}, [], set()
    for name, cell in quant_cells(model):
        layers[name] = {"type": type(cell).__name__,
                        **{op: getattr(cell, f"{op}_q").as_dict() for op in cell.operands}}
        if "w" in cell.operands:
            codes = quantize_np(cell.weight.asnumpy(), cell.get_scale("w"), cell.w_q.bits, cell.w_q.signed)
            entries.append({"name": f"{name}.weight_int", "data": Tensor(codes.astype(storage_dtype(cell.w_q.bits)))})
            skip.add(f"{name}.weight")
    for pname, p in model.parameters_and_names():
        if pname not in skip:
            entries.append({"name": pname, "data": Tensor(p.asnumpy())})
    meta = {"format": "vtptq-quantized-v1", "model": model_name, "num_classes": int(model.num_classes),
            "layers": layers, "method": "minmax"}
    ms.save_checkpoint(entries, path, append_dict={"quant_meta": json.dumps(meta)})


@pytest.mark.parametrize("bits", [8, 12])
def test_v1_checkpoint_still_loads(bits, tmp_path):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = quantized(bits=bits, weight_per_channel=True)
    path = str(tmp_path / "v1.ckpt")
    write_v1_checkpoint(model, path, TINY)
    raw = ms.load_checkpoint(path)
    assert raw["blocks.0.mlp.fc1.weight_int"].dtype == (ms.int8 if bits == 8 else ms.int16)
    meta, _ = read_quant_meta(path)
    assert meta["format"] == "vtptq-quantized-v1" and meta["method"] == "minmax"
    loaded, meta = load_quantized_checkpoint(path, TINY)
    x = images(8, seed=6)
    np.testing.assert_array_equal(logits(loaded, x), logits(model, x))


def test_unknown_format_and_bad_packed_data(tmp_path):
    model = quantized(bits=4)
    path = str(tmp_path / "v9.ckpt")
    save_quantized_checkpoint(model, path, TINY, extra_meta={"format": "vtptq-quantized-v9"})
    with pytest.raises(ValueError, match="unknown quantized checkpoint format"):
        read_quant_meta(path)
    # a packed weight of the wrong length names the checkpoint and the entry
    path = str(tmp_path / "bad.ckpt")
    save_quantized_checkpoint(model, path, TINY)
    raw = ms.load_checkpoint(path)
    entries = [{"name": k, "data": Tensor(v.asnumpy()[:-1] if k == "blocks.0.mlp.fc1.weight_packed" else v.asnumpy())}
               for k, v in raw.items()]
    ms.save_checkpoint(entries, path)
    with pytest.raises(ValueError, match=r"bad\.ckpt.*blocks\.0\.mlp\.fc1\.weight_packed"):
        load_quantized_checkpoint(path)


# ----------------------------------------------------------------------------- MindIR

@pytest.mark.parametrize("bits", [8, 4])
def test_mindir_matches_quantized_cell(bits, tmp_path):
    model = quantized(bits=bits, seed=bits)
    x = images(4, seed=7)
    ref = logits(model, x)
    path = str(tmp_path / "q.mindir")
    meta = export_mindir(model, path, 4, model_name=TINY)
    assert sorted(os.listdir(tmp_path)) == ["q.mindir"]  # exactly `path`, no temporary left
    assert meta["batch_size"] == 4 and meta["input_shape"] == [4, 1, 28, 28] and meta["num_classes"] == 10
    graph = nn.GraphCell(ms.load(path))
    close(graph(Tensor(x)).asnumpy(), ref)
    with open(path, "rb") as f:  # MindSpore's own operations, not this machine's fused kernels (src/kernels)
        assert b"vtptq_cpu_ops" not in f.read()


def test_mindir_model_any_batch(tiny_w8, tmp_path):
    model, _ = tiny_w8
    path = str(tmp_path / "tiny.mindir")
    export_mindir(model, path, 4)
    m = MindIRModel(path)
    assert m.model_name == TINY and m.num_classes == 10 and m.batch_size == 4
    assert m.set_train(False) is m and m.set_train() is m
    assert mindir_model_name(path) == TINY and read_mindir_meta(path)["format"] == mindir.MINDIR_FORMAT
    x = images(10, seed=8)
    ref = logits(model, x, 4)  # the Cell at the same batch size
    for n in (10, 4, 3, 1):
        out = m(Tensor(x[:n]))
        assert isinstance(out, Tensor) and out.shape == (n, 10)
        close(out.asnumpy(), ref[:n])
    with pytest.raises(ValueError, match="input of shape"):
        m(Tensor(np.zeros((2, 3, 28, 28), np.float32)))
    # eval.py's path: engine.build_model dispatches a .mindir file to MindIRModel
    from src.engine import build_model
    assert isinstance(build_model({"ckpt": path, "model": TINY}), MindIRModel)


def test_mindir_missing_file_and_bad_names(tiny_w8, tmp_path):
    missing = str(tmp_path / "missing.mindir")
    with pytest.raises(FileNotFoundError, match="missing.mindir"):
        MindIRModel(missing)
    assert mindir_model_name(missing) is None
    with pytest.raises(ValueError, match=r"\.mindir"):
        MindIRModel(str(tmp_path / "model.bin"))
    with pytest.raises(ValueError, match=r"\.mindir"):
        export_mindir(tiny_w8[0], str(tmp_path / "model.bin"), 2)
    junk = tmp_path / "junk.mindir"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match="junk.mindir"):
        MindIRModel(str(junk))
    assert mindir_model_name(str(junk)) is None
    assert sorted(os.listdir(tmp_path)) == ["junk.mindir"]


def test_mindir_without_metadata(tiny_w8, tmp_path):
    """A MindIR file exported directly with mindspore.export: shape and classes from the graph."""
    model, _ = tiny_w8
    ms.export(model, Tensor(np.zeros((3, 1, 28, 28), np.float32)), file_name=str(tmp_path / "plain"),
              file_format="MINDIR")
    path = str(tmp_path / "plain.mindir")
    m = MindIRModel(path)
    assert m.model_name is None and mindir_model_name(path) is None
    assert m.batch_size == 3 and m.num_classes == 10
    x = images(5, seed=9)
    close(m(Tensor(x)).asnumpy(), logits(model, x, 3))


def test_mindir_export_atomic_on_error(tiny_w8, tmp_path, monkeypatch):
    model, _ = tiny_w8
    path = tmp_path / "q.mindir"
    path.write_bytes(b"previous")

    def failing_export(net, *inputs, file_name, file_format, **kw):
        with open(file_name + ".mindir", "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ms, "export", failing_export)
    with pytest.raises(RuntimeError, match="disk full"):
        export_mindir(model, str(path), 2)
    assert sorted(os.listdir(tmp_path)) == ["q.mindir"] and path.read_bytes() == b"previous"


def test_mindir_split_save(tiny_w8, tmp_path, monkeypatch):
    """Parameters over MindSpore's 1 GB limit go to <stem>_variables/ (forced here)."""
    import mindspore.train.serialization as serialization
    model, _ = tiny_w8
    monkeypatch.setattr(serialization, "TOTAL_SAVE", 0)
    path = str(tmp_path / "big.mindir")
    export_mindir(model, path, 2)
    assert sorted(os.listdir(tmp_path)) == ["big.mindir", "big_variables"]
    x = images(3, seed=11)
    close(MindIRModel(path)(Tensor(x)).asnumpy(), logits(model, x, 2))
    assert export_script.file_size(path) > os.path.getsize(path)


# ----------------------------------------------------------------------------- export.py

def run_export(*args):
    return export_script.cli([str(a) for a in args])


def test_export_cli_mindir(tiny_w8, tmp_path, capsys):
    model, ckpt = tiny_w8
    out = tmp_path / "out" / "tiny.mindir"
    assert run_export("--ckpt", ckpt, "--format", "mindir", "--output", out, "--batch-size", 3) == 0
    text = capsys.readouterr().out
    assert str(out) in text and "quantized checkpoint" in text and "model size" in text and "W8A8" in text
    m = MindIRModel(str(out))
    assert m.batch_size == 3 and m.model_name == TINY and m.meta["w_bits"] == 8 and m.meta["method"] == "minmax"
    x = images(7, seed=12)
    close(m(Tensor(x)).asnumpy(), logits(model, x, 3))
    assert sorted(os.listdir(out.parent)) == ["tiny.mindir"]
    for path in (ckpt, out):  # ordinary permissions, not MindSpore's owner-read-only 0400
        assert os.stat(path).st_mode & 0o600 == 0o600, oct(os.stat(path).st_mode)


def test_export_cli_default_output(tiny_w8, tmp_path, capsys):
    _, ckpt = tiny_w8
    local = tmp_path / "quantized.ckpt"
    local.write_bytes(open(ckpt, "rb").read())
    assert run_export("--ckpt", local, "--format", "mindir") == 0
    assert (tmp_path / "quantized.mindir").is_file()
    assert MindIRModel(str(tmp_path / "quantized.mindir")).batch_size == defaults()["batch_size"]


def test_export_cli_onnx_branch(tiny_w8, tmp_path, capsys, monkeypatch):
    """--format onnx calls src.export.onnx.export_onnx (stubbed here: tested in its own file)."""
    import types
    _, ckpt = tiny_w8
    calls = []

    def export_onnx(model, path, batch_size=None, model_name=None):
        calls.append((type(model).__name__, path, batch_size, model_name))
        with open(path, "wb") as f:
            f.write(b"onnx")

    monkeypatch.setitem(sys.modules, "src.export.onnx", types.SimpleNamespace(export_onnx=export_onnx))
    out = tmp_path / "m.onnx"
    assert run_export("--ckpt", ckpt, "--format", "onnx", "--output", out, "--batch-size", 5) == 0
    assert calls == [("VisionTransformer", str(out), 5, TINY)]
    assert "m.onnx" in capsys.readouterr().out


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


def test_export_cli_errors(tiny_w8, tmp_path, capsys):
    _, ckpt = tiny_w8
    fp = tmp_path / "fp.ckpt"
    ms.save_checkpoint(randomize(create_model(TINY)), str(fp))
    cases = [(["--ckpt", fp, "--format", "mindir"], "not a quantized checkpoint; run quant.py first"),
             (["--ckpt", tmp_path / "none.ckpt", "--format", "mindir"], "not found"),
             (["--ckpt", ckpt, "--format", "mindir", "--output", tmp_path / "x.bin"], ".mindir"),
             (["--ckpt", ckpt, "--format", "tflite"], "invalid choice"),
             (["--ckpt", ckpt, "--format", "mindir", "--batch-size", 0], "batch_size"),
             (["--format", "mindir"], "--ckpt")]
    for args, expect in cases:
        assert run_export(*args) == 2, args
        err = error_lines(capsys.readouterr().err)
        assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], (args, err)
    assert sorted(os.listdir(tmp_path)) == ["fp.ckpt"]  # nothing written


def test_export_script_fp_checkpoint_subprocess(tmp_path):
    """The real script on the embedded FP checkpoint: one error line, non-zero exit, no file."""
    out = tmp_path / "fp.mindir"
    r = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), "--ckpt", FMNIST_CKPT, "--format", "mindir",
                        "--output", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode != 0
    err = error_lines(r.stderr)
    assert len(err) == 1 and "deit_fmnist.ckpt: not a quantized checkpoint; run quant.py first" in err[0], r.stderr
    assert os.listdir(tmp_path) == []
