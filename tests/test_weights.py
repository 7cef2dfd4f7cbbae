"""Weight reading/loading (src.models.weights) and scripts/convert_weights.py.

All files are written into tmp_path from random weights; the reference logits come from an
independent float64 numpy forward pass of the ViT written below.
"""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

from src.models import VisionTransformer, create_model
from src.models import registry
from src.models.weights import (CheckpointError, is_metadata_key, load_checkpoint_into, read_state_dict,
                                read_safetensors, save_mindspore_checkpoint, to_model_names)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=2)
TEST_MODEL = "_test_weights_tiny_vit"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------

def make_timm_state(seed=0, img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32,
                    depth=2, num_heads=2, mlp_ratio=4):
    """Random weights under timm's names and shapes (LayerNorm weight/bias)."""
    rng = np.random.default_rng(seed)
    d, h, p = embed_dim, int(embed_dim * mlp_ratio), patch_size
    n = (img_size // patch_size) ** 2 + 1

    def w(o, i):
        return (rng.standard_normal((o, i)) / math.sqrt(i)).astype(np.float32)

    def v(*shape, scale=0.1, loc=0.0):
        return (loc + scale * rng.standard_normal(shape)).astype(np.float32)

    sd = {"cls_token": v(1, 1, d, scale=0.5), "pos_embed": v(1, n, d, scale=0.5),
          "patch_embed.proj.weight": (rng.standard_normal((d, in_chans, p, p))
                                      / math.sqrt(in_chans * p * p)).astype(np.float32),
          "patch_embed.proj.bias": v(d)}
    for b in range(depth):
        t = f"blocks.{b}."
        sd.update({t + "norm1.weight": v(d, loc=1.0), t + "norm1.bias": v(d),
                   t + "attn.qkv.weight": w(3 * d, d), t + "attn.qkv.bias": v(3 * d),
                   t + "attn.proj.weight": w(d, d), t + "attn.proj.bias": v(d),
                   t + "norm2.weight": v(d, loc=1.0), t + "norm2.bias": v(d),
                   t + "mlp.fc1.weight": w(h, d), t + "mlp.fc1.bias": v(h),
                   t + "mlp.fc2.weight": w(d, h), t + "mlp.fc2.bias": v(d)})
    sd.update({"norm.weight": v(d, loc=1.0), "norm.bias": v(d),
               "head.weight": w(num_classes, d), "head.bias": v(num_classes)})
    return sd


def to_google_layout(sd, num_heads, prefix=""):
    """timm names/shapes -> original (JAX) ViT npz layout, written independently of the loader."""
    d = sd["cls_token"].shape[-1]
    hd = d // num_heads
    g = {"embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
         "embedding/bias": sd["patch_embed.proj.bias"], "cls": sd["cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["pos_embed"],
         "Transformer/encoder_norm/scale": sd["norm.weight"], "Transformer/encoder_norm/bias": sd["norm.bias"],
         "head/kernel": sd["head.weight"].T, "head/bias": sd["head.bias"]}
    b = 0
    while f"blocks.{b}.norm1.weight" in sd:
        t, s = f"blocks.{b}.", f"Transformer/encoderblock_{b}/"
        a = s + "MultiHeadDotProductAttention_1/"
        g[s + "LayerNorm_0/scale"], g[s + "LayerNorm_0/bias"] = sd[t + "norm1.weight"], sd[t + "norm1.bias"]
        g[s + "LayerNorm_2/scale"], g[s + "LayerNorm_2/bias"] = sd[t + "norm2.weight"], sd[t + "norm2.bias"]
        qkv_w, qkv_b = sd[t + "attn.qkv.weight"], sd[t + "attn.qkv.bias"]
        for j, part in enumerate(("query", "key", "value")):
            g[a + part + "/kernel"] = qkv_w[j * d:(j + 1) * d].T.reshape(d, num_heads, hd)
            g[a + part + "/bias"] = qkv_b[j * d:(j + 1) * d].reshape(num_heads, hd)
        g[a + "out/kernel"] = sd[t + "attn.proj.weight"].T.reshape(num_heads, hd, d)
        g[a + "out/bias"] = sd[t + "attn.proj.bias"]
        for k in (0, 1):
            fc = f"mlp.fc{k + 1}."
            g[s + f"MlpBlock_3/Dense_{k}/kernel"] = sd[t + fc + "weight"].T
            g[s + f"MlpBlock_3/Dense_{k}/bias"] = sd[t + fc + "bias"]
        b += 1
    return {prefix + k: np.ascontiguousarray(v) for k, v in g.items()}


_erf = np.vectorize(math.erf)


def numpy_vit(sd, x, patch_size, num_heads, eps=1e-6):
    """Independent float64 forward pass of a timm-style ViT; returns logits (B, classes)."""
    sd = {k: v.astype(np.float64) for k, v in sd.items()}
    x = x.astype(np.float64)
    bsz, c, hgt, wid = x.shape
    p = patch_size
    gh, gw = hgt // p, wid // p
    wconv = sd["patch_embed.proj.weight"]
    d = wconv.shape[0]
    patches = x.reshape(bsz, c, gh, p, gw, p).transpose(0, 2, 4, 1, 3, 5).reshape(bsz, gh * gw, c * p * p)
    t = patches @ wconv.reshape(d, -1).T + sd["patch_embed.proj.bias"]
    t = np.concatenate([np.broadcast_to(sd["cls_token"], (bsz, 1, d)), t], axis=1) + sd["pos_embed"]

    def ln(z, pre):
        mu = z.mean(-1, keepdims=True)
        var = ((z - mu) ** 2).mean(-1, keepdims=True)
        return (z - mu) / np.sqrt(var + eps) * sd[pre + ".weight"] + sd[pre + ".bias"]

    def lin(z, pre):
        return z @ sd[pre + ".weight"].T + sd[pre + ".bias"]

    hd = d // num_heads
    n = t.shape[1]
    b = 0
    while f"blocks.{b}.norm1.weight" in sd:
        pre = f"blocks.{b}."
        qkv = lin(ln(t, pre + "norm1"), pre + "attn.qkv").reshape(bsz, n, 3, num_heads, hd).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        s = q @ k.swapaxes(-1, -2) * hd ** -0.5
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(0, 2, 1, 3).reshape(bsz, n, d)
        t = t + lin(o, pre + "attn.proj")
        h = lin(ln(t, pre + "norm2"), pre + "mlp.fc1")
        h = 0.5 * h * (1.0 + _erf(h / math.sqrt(2.0)))
        t = t + lin(h, pre + "mlp.fc2")
        b += 1
    t = ln(t, "norm")
    return lin(t[:, 0], "head")


def make_input(seed=1, batch=2, chans=3, size=32):
    return np.random.default_rng(seed).standard_normal((batch, chans, size, size)).astype(np.float32)


def logits(model, x):
    return model(Tensor(x)).asnumpy()


def params_np(model):
    return {n: p.asnumpy() for n, p in model.parameters_and_names()}


def write_safetensors(path, arrays, dtypes=None, metadata=None):
    """Tiny independent safetensors writer; dtypes maps name -> 'F32'|'F16'|'BF16'|'I64'|...
    BF16 is produced by truncating float32 to its upper 16 bits."""
    dtypes = dtypes or {}
    header, blobs, off = {}, [], 0
    if metadata:
        header["__metadata__"] = metadata
    for name, arr in arrays.items():
        dt = dtypes.get(name, "F32")
        if dt == "BF16":
            raw = (np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
        else:
            np_dt = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I64": "<i8", "I32": "<i4"}[dt]
            raw = np.ascontiguousarray(arr, dtype=np_dt).tobytes()
        header[name] = {"dtype": dt, "shape": list(arr.shape), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(len(h).to_bytes(8, "little"))
        f.write(h)
        for raw in blobs:
            f.write(raw)


@pytest.fixture(scope="module")
def registered():
    """A tiny model registered under TEST_MODEL for create_model; unregistered afterwards."""

    def _test_weights_tiny_vit(**kw):
        return VisionTransformer(**{**CFG, **kw})

    registry.register_model(dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=1.0,
                                 interpolation="bicubic", dataset="test"))(_test_weights_tiny_vit)
    yield TEST_MODEL
    registry._MODELS.pop(TEST_MODEL, None)
    registry._DATA_CFGS.pop(TEST_MODEL, None)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """The random timm state dict, its reference logits, and a safetensors file of it."""
    st_numpy = pytest.importorskip("safetensors.numpy")
    sd = make_timm_state(seed=0)
    x = make_input()
    ref = numpy_vit(sd, x, CFG["patch_size"], CFG["num_heads"])
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    st_numpy.save_file(sd, str(path))
    return sd, x, ref, path


def tiny(**kw):
    return VisionTransformer(**{**CFG, **kw})


# ------------------------------------------------------------------------------------------
# parity with the independent numpy forward pass
# ------------------------------------------------------------------------------------------

def test_safetensors_parity_pynative_and_graph(weights, registered):
    sd, x, ref, path = weights
    model = create_model(registered, checkpoint=str(path))
    model.set_train(False)
    out_py = logits(model, x)
    assert np.abs(out_py - ref).max() <= 1e-4, np.abs(out_py - ref).max()
    assert np.abs(ref).max() > 0.1  # the comparison is not trivially about ~0 logits
    try:
        ms.set_context(mode=ms.GRAPH_MODE)
        graph_model = tiny()
        load_checkpoint_into(graph_model, str(path))
        graph_model.set_train(False)
        out_graph = logits(graph_model, x)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    assert np.abs(out_graph - ref).max() <= 1e-4, np.abs(out_graph - ref).max()


def test_all_formats_give_identical_weights(weights, tmp_path):
    sd, x, ref, path = weights
    base = tiny()
    loaded = load_checkpoint_into(base, str(path))
    assert sorted(loaded) == sorted(n for n, _ in base.parameters_and_names())
    base_params, base_out = params_np(base), logits(base, x)

    np.savez(tmp_path / "timm.npz", **sd)
    ckpt = tmp_path / "sub" / "tiny.ckpt"
    save_mindspore_checkpoint(base, str(ckpt))
    np.savez(tmp_path / "google.npz", **to_google_layout(sd, CFG["num_heads"]))
    np.savez(tmp_path / "google_opt.npz", **to_google_layout(sd, CFG["num_heads"], prefix="opt/target/"))
    sources = [str(tmp_path / "timm.npz"), str(ckpt), str(tmp_path / "google.npz"),
               str(tmp_path / "google_opt.npz"), dict(sd)]
    for src in sources:
        m = tiny()
        load_checkpoint_into(m, src)
        got = params_np(m)
        for k, v in base_params.items():
            np.testing.assert_array_equal(got[k], v, err_msg=f"{k} from {src if isinstance(src, str) else 'dict'}")
        np.testing.assert_array_equal(logits(m, x), base_out)


def test_read_state_dict_names_per_format(weights, tmp_path):
    sd, _, _, path = weights
    st = read_state_dict(str(path))
    assert set(st) == set(sd) and all(v.dtype == np.float32 for v in st.values())
    m = tiny()
    renamed = to_model_names(st, m)
    assert set(renamed) == {n for n, _ in m.parameters_and_names()}
    assert "blocks.0.norm1.gamma" in renamed and "blocks.0.attn.qkv.weight" in renamed
    assert to_model_names(renamed, m).keys() == renamed.keys()  # MindSpore names pass through


# ------------------------------------------------------------------------------------------
# safetensors reader
# ------------------------------------------------------------------------------------------

def test_safetensors_reader_dtypes(tmp_path):
    rng = np.random.default_rng(3)
    a32 = rng.standard_normal((3, 5)).astype(np.float32)
    arrays = {"f32": a32, "f16": a32.astype(np.float16), "bf16": a32, "f64": a32.astype(np.float64),
              "i64": np.arange(6, dtype=np.int64).reshape(2, 3) - 3, "i32": np.array([7, -1], np.int32),
              "scalar": np.array(2.5, np.float32)}
    dtypes = {"f16": "F16", "bf16": "BF16", "f64": "F64", "i64": "I64", "i32": "I32"}
    path = tmp_path / "mixed.safetensors"
    write_safetensors(path, arrays, dtypes, metadata={"format": "np"})
    got = read_safetensors(str(path))
    assert set(got) == set(arrays)
    np.testing.assert_array_equal(got["f32"], a32)
    assert got["f16"].dtype == np.float32
    np.testing.assert_array_equal(got["f16"], a32.astype(np.float16).astype(np.float32))
    bf = (a32.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)
    assert got["bf16"].dtype == np.float32
    np.testing.assert_array_equal(got["bf16"], bf)
    assert np.abs(got["bf16"] - a32).max() <= np.abs(a32).max() * 2 ** -7
    np.testing.assert_array_equal(got["f64"], a32)
    assert got["i64"].dtype == np.int64 and got["i32"].dtype == np.int32
    np.testing.assert_array_equal(got["i64"], arrays["i64"])
    np.testing.assert_array_equal(got["i32"], arrays["i32"])
    assert got["scalar"].shape == () and got["scalar"] == 2.5


def test_safetensors_reader_matches_package_writer(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    arrays = {"a": np.arange(12, dtype=np.float16).reshape(3, 4), "b": np.ones((2, 1, 3), np.float64),
              "c": np.array([1, 2, 3], np.int64)}
    st_numpy.save_file(arrays, str(tmp_path / "p.safetensors"), metadata={"k": "v"})
    got = read_safetensors(str(tmp_path / "p.safetensors"))
    for k, v in arrays.items():
        np.testing.assert_array_equal(got[k], v)
    assert got["a"].dtype == np.float32 and got["c"].dtype == np.int64


def test_safetensors_reader_rejects_garbage(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 20)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        read_safetensors(str(bad))


# ------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------

def test_missing_unexpected_and_shape_mismatch_are_reported(weights, tmp_path):
    sd = dict(weights[0])
    del sd["blocks.1.mlp.fc2.bias"]
    sd["blocks.0.attn.extra"] = np.zeros(3, np.float32)
    sd["blocks.0.mlp.fc1.weight"] = np.zeros((64, 32), np.float32)
    f = tmp_path / "broken.npz"
    np.savez(f, **sd)
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint_into(tiny(), str(f))
    msg = str(ei.value)
    assert "broken.npz" in msg
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.0.attn.extra" in msg
    assert "blocks.0.mlp.fc1.weight" in msg and "(64, 32)" in msg and "(128, 32)" in msg


def test_long_key_lists_are_truncated():
    m = tiny()
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint_into(m, {})
    msg = str(ei.value)
    n = len(list(m.get_parameters()))
    assert f"missing keys ({n})" in msg and "more)" in msg and len(msg) < 1200


def test_distilled_checkpoint(weights):
    sd = dict(weights[0])
    sd["dist_token"] = np.zeros((1, 1, 32), np.float32)
    sd["head_dist.weight"] = np.zeros((10, 32), np.float32)
    sd["head_dist.bias"] = np.zeros((10,), np.float32)
    with pytest.raises(CheckpointError, match="distilled"):
        load_checkpoint_into(tiny(), sd)


def test_num_classes_mismatch_and_drop_head(weights, registered):
    sd, x, _, path = weights
    with pytest.raises(CheckpointError) as ei:
        create_model(registered, num_classes=5, checkpoint=str(path))
    msg = str(ei.value)
    assert "10 classes" in msg and "has 5" in msg and "drop_head" in msg and "--drop-head" in msg
    assert str(path) in msg
    m = create_model(registered, num_classes=5, checkpoint=str(path), drop_head=True)
    got = params_np(m)
    assert got["head.weight"].shape == (5, 32)
    np.testing.assert_array_equal(got["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    np.testing.assert_array_equal(got["norm.gamma"], sd["norm.weight"])
    assert logits(m, x).shape == (2, 5)
    # drop_head also works when the checkpoint has no head at all
    nohead = {k: v for k, v in sd.items() if not k.startswith("head.")}
    load_checkpoint_into(tiny(num_classes=5), nohead, drop_head=True)


def test_pos_embed_mismatch_is_not_interpolated(weights):
    sd = weights[0]
    with pytest.raises(CheckpointError) as ei:
        load_checkpoint_into(tiny(img_size=48), sd)
    msg = str(ei.value)
    assert "pos_embed" in msg and "(1, 17, 32)" in msg and "(1, 37, 32)" in msg


def test_google_pre_logits_rejected(weights, tmp_path):
    g = to_google_layout(weights[0], CFG["num_heads"])
    g["pre_logits/kernel"] = np.zeros((32, 32), np.float32)
    g["pre_logits/bias"] = np.zeros((32,), np.float32)
    np.savez(tmp_path / "vit21k.npz", **g)
    with pytest.raises(CheckpointError, match="pre_logits"):
        load_checkpoint_into(tiny(), str(tmp_path / "vit21k.npz"))


def test_unsupported_extension_and_missing_file(tmp_path):
    f = tmp_path / "weights.h5"
    f.write_bytes(b"x")
    with pytest.raises(ValueError) as ei:
        read_state_dict(str(f))
    assert "weights.h5" in str(ei.value) and ".safetensors" in str(ei.value)
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        load_checkpoint_into(tiny(), str(tmp_path / "nope.ckpt"))


def test_pth_without_torch(tmp_path):
    try:
        import torch  # noqa: F401
        pytest.skip("torch is installed")
    except ImportError:
        pass
    f = tmp_path / "deit.pth"
    f.write_bytes(b"PK\x03\x04 not really a torch file")
    with pytest.raises(CheckpointError) as ei:
        read_state_dict(str(f))
    msg = str(ei.value)
    assert "torch" in msg and "deit.pth" in msg and "convert_weights.py" in msg
    assert isinstance(ei.value, ImportError)


def test_ckpt_metadata_is_ignored(weights, tmp_path):
    sd, x, _, path = weights
    m = tiny()
    load_checkpoint_into(m, str(path))
    extra = [{"name": "moment1.head.weight", "data": Tensor(np.ones((10, 32), np.float32))},
             {"name": "global_step", "data": Tensor(np.array([3], np.int32))},
             {"name": "quant.blocks.0.attn.qkv.scale", "data": Tensor(np.ones((1,), np.float32))}]
    params = [{"name": n, "data": p} for n, p in m.parameters_and_names()]
    f = tmp_path / "train_state.ckpt"
    ms.save_checkpoint(params + extra, str(f), append_dict={"epoch_num": 7, "lr": 0.01, "note": "hello"})
    assert is_metadata_key("quant.blocks.0.attn.qkv.scale") and not is_metadata_key("head.weight")
    state = read_state_dict(str(f))
    assert set(state) == {n for n, _ in m.parameters_and_names()}
    assert "moment1.head.weight" in read_state_dict(str(f), keep_metadata=True)
    m2 = tiny()
    load_checkpoint_into(m2, str(f))
    np.testing.assert_array_equal(logits(m2, x), logits(m, x))


# ------------------------------------------------------------------------------------------
# scripts/convert_weights.py
# ------------------------------------------------------------------------------------------

def _run_convert(*args):
    env = dict(os.environ, GLOG_v="3", PYTHONPATH="")
    return subprocess.run([sys.executable, os.path.join(REPO, "scripts", "convert_weights.py"), *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_convert_script_end_to_end(tmp_path):
    st_numpy = pytest.importorskip("safetensors.numpy")
    sd = make_timm_state(seed=5, img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128,
                         depth=4, num_heads=4)
    src = tmp_path / "fm.safetensors"
    st_numpy.save_file(sd, str(src))
    out = tmp_path / "fm.ckpt"
    r = _run_convert("--model", "deit_fmnist", "--input", str(src), "--output", str(out))
    assert r.returncode == 0, r.stderr
    assert out.exists() and "wrote" in r.stdout
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    m = create_model("deit_fmnist", checkpoint=str(out))
    x = make_input(seed=2, batch=2, chans=1, size=28)
    ref = numpy_vit(sd, x, 7, 4)
    assert np.abs(logits(m, x) - ref).max() <= 1e-4

    # a bad input: exit status 2 and a single "error: ..." line naming the file
    bad = tmp_path / "fm.h5"
    bad.write_bytes(b"x")
    r = _run_convert("--model", "deit_fmnist", "--input", str(bad), "--output", str(tmp_path / "o.ckpt"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error: ")]
    assert len(err) == 1 and "fm.h5" in err[0], r.stderr
    assert not (tmp_path / "o.ckpt").exists()
