"""Quantization core: quantizer maths, the fake-quantized cells against numpy references, the
table-driven swap, calibration methods, the interval search, the quantized checkpoint,
model size, quant.py end to end on the embedded model and its error handling.

Kept fast: a tiny registered ViT (28x28, patch 7, 1 channel, width 32, depth 2) with random
weights for everything but the embedded end-to-end run (1000 images, 32 calibration images).
"""
import glob
import importlib
import io
import json
import os
import sys

import numpy as np
from _helpers import registered_vit, randomize
import pytest

import mindspore as ms
from mindspore import Tensor

import src.quant
from src.config import defaults
from src.engine import predict
from src.models import create_model
from src.models.weights import load_checkpoint_into
from src.quant import (calibrate_model, load_quantized_checkpoint, model_size_mb, quant_cells, quantize_model,
                       read_quant_meta, save_quantized_checkpoint, set_quant_mode)
from src.quant import search
from src.quant.layers import QuantConv2d, QuantDense, QuantMatMul
from src.quant.packing import unpack_codes
from src.quant.quantizer import (EPS, check_bits, fake_quant, fake_quant_np, init_scale, percentile_scale, qrange,
                                 quantize_np, storage_dtype)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
quant_script = importlib.import_module("quant")
eval_script = importlib.import_module("eval")

# quant.py / eval.py call mindspore.set_device('CPU'), which MindSpore refuses once a kernel has
# run unless it was called before: call it now (at collection), so that this file also runs alone.
ms.set_device("CPU")

TINY = "_test_quant_tiny_vit"
TINY_CFG = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
BLOCK_LAYERS = ("attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj", "mlp.fc1", "mlp.fc2")
DEFAULT_NAMES = ["patch_embed.proj"] + [f"blocks.{b}.{s}" for b in range(2) for s in BLOCK_LAYERS]
N_EMB = 1000  # embedded evaluation images of the end-to-end run


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def restore_mode():
    """quant.py / eval.py set MindSpore's global mode; give the other test files theirs back."""
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


@pytest.fixture(autouse=True)
def pynative():
    """Cells are called directly here: PYNATIVE unless a test says otherwise."""
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.fixture(scope="module", autouse=True)
def tiny_registered():
    with registered_vit(TINY, TINY_CFG):
        yield TINY


def tiny_fp(seed=0):
    return randomize(create_model(TINY), seed)


def qcfg(**kw):
    cfg = defaults()
    cfg.update(kw)
    return cfg


def tiny_quant(seed=0, **kw):
    model = tiny_fp(seed)
    cfg = qcfg(**kw)
    return model, quantize_model(model, cfg), cfg


def images(n=16, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def logits(model, x):
    return predict(model, x, len(x))


def rel_diff(a, b):
    return float(np.abs(a - b).max() / np.abs(b).max())


def calibrate(model, x, cfg):
    return calibrate_model(model, x, cfg, log=io.StringIO())


def scales(model):
    """{layer: {operand: interval array}} of a quantized model."""
    return {n: {op: c.get_scale(op) for op in c.operands} for n, c in quant_cells(model)}


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- quantizer maths

def test_integer_grids():
    assert qrange(3) == (-4, 3) and qrange(3, signed=False) == (0, 7)
    assert qrange(4) == (-8, 7) and qrange(4, signed=False) == (0, 15)
    assert qrange(8) == (-128, 127) and qrange(8, signed=False) == (0, 255)
    assert qrange(16) == (-32768, 32767) and qrange(2) == (-2, 1)


def test_rounding_half_to_even():
    d = 0.25  # exact in binary: x / d hits the .5 ties exactly
    ratios = np.array([0.5, 1.5, 2.5, 3.5, -0.5, -1.5, -2.5, 0.49, 0.51, -2.51], np.float32)
    expect = np.array([0, 2, 2, 4, 0, -2, -2, 0, 1, -3])
    assert quantize_np(ratios * d, d, 8).tolist() == expect.tolist()
    np.testing.assert_array_equal(fake_quant_np(ratios * d, d, 8), (expect * d).astype(np.float32))


@pytest.mark.parametrize("bits,signed,x,expect", [
    (4, True, [-100.0, -8.0, -8.6, 7.0, 7.4, 7.6, 100.0], [-8, -8, -8, 7, 7, 7, 7]),
    (3, True, [-9.0, -4.4, -3.6, 2.6, 3.0, 50.0], [-4, -4, -4, 3, 3, 3]),
    (4, False, [-3.0, -0.4, 0.6, 14.6, 15.0, 20.0], [0, 0, 1, 15, 15, 15]),
    (3, False, [-1.0, 6.6, 7.0, 8.0], [0, 7, 7, 7]),
])
def test_clipping_at_both_ends(bits, signed, x, expect):
    x = np.asarray(x, np.float32)
    assert quantize_np(x, 1.0, bits, signed).tolist() == expect
    np.testing.assert_array_equal(fake_quant_np(x * 0.5, 0.5, bits, signed), np.asarray(expect, np.float32) * 0.5)


def test_init_scale_signed_and_unsigned():
    x = np.array([-6.0, 3.0, 1.0], np.float32)
    np.testing.assert_allclose(init_scale(x, 4), [6 / 7], rtol=1e-7)
    np.testing.assert_allclose(init_scale(x, 8), [6 / 127], rtol=1e-7)
    np.testing.assert_allclose(init_scale(x, 4, signed=False), [3 / 15], rtol=1e-7)  # max(T), not max|T|
    np.testing.assert_allclose(init_scale(x, 8, signed=False), [3 / 255], rtol=1e-7)
    assert init_scale(x, 8).shape == (1,)
    z = init_scale(np.zeros((3, 4)), 8)
    assert z.shape == (1,) and z[0] > 0 and z[0] == np.float32(EPS)
    assert init_scale(-np.ones(4), 8, signed=False)[0] > 0  # all negative: still a positive interval


def test_init_scale_per_channel_axis0():
    x = np.zeros((3, 2, 2), np.float32)
    x[0, 1, 1], x[1, 0, 0], x[2, 0, 1] = -2.0, 0.5, 127.0
    s = init_scale(x, 8, per_channel=True)
    assert s.shape == (3, 1, 1)
    np.testing.assert_allclose(s.ravel(), [2 / 127, 0.5 / 127, 1.0], rtol=1e-7)
    w = np.array([[1.0, -4.0], [0.0, 0.0]], np.float32)
    s = init_scale(w, 4, per_channel=True)
    assert s.shape == (2, 1) and s[0, 0] == np.float32(4 / 7) and s[1, 0] > 0


def test_percentile_scale():
    v = np.arange(1, 101, dtype=np.float32)
    x = np.where(np.arange(100) % 2 == 0, v, -v)  # |x| = 1..100
    np.testing.assert_allclose(percentile_scale(x, 8, 50), [50.5 / 127], rtol=1e-6)  # median of 1..100
    np.testing.assert_allclose(percentile_scale(x, 8, 100), init_scale(x, 8), rtol=1e-7)
    # unsigned: percentile of max(x, 0) = 50 zeros and 1, 3, ..., 99; sorted, the 75th percentile lies
    # at position 0.75 * 99 = 74.25, between 49 and 51
    np.testing.assert_allclose(percentile_scale(x, 4, 75, signed=False), [(49 + 0.25 * 2) / 15], rtol=1e-6)
    assert percentile_scale(x, 8, 99.99)[0] <= init_scale(x, 8)[0]


@pytest.mark.parametrize("bad", [1, 17, 0, -8, 8.0, True, False, "8", None])
def test_check_bits_rejects(bad):
    with pytest.raises(ValueError, match="bits"):
        check_bits(bad)


def test_check_bits_accepts_and_storage_dtype():
    assert check_bits(2) == 2 and check_bits(16) == 16 and check_bits(np.int64(8)) == 8
    assert storage_dtype(2) == np.int8 and storage_dtype(8) == np.int8
    assert storage_dtype(9) == np.int16 and storage_dtype(16) == np.int16


@pytest.mark.parametrize("bits,signed", [(8, True), (4, True), (8, False), (3, False), (16, True)])
def test_fake_quant_op_matches_numpy(bits, signed):
    rng = np.random.default_rng(bits)
    qmin, qmax = qrange(bits, signed)
    scale = np.float32(0.125)
    ties = (np.arange(-2 * qmax - 10, 2 * qmax + 11, dtype=np.float32) * 0.5) * scale  # every .5 tie, and beyond
    rand = rng.standard_normal((4, 7, 9)).astype(np.float32) * (qmax * 0.1)
    for x, s in ((ties, scale), (rand, np.float32(0.0371)), (rand, np.float32(qmax * 0.01))):
        got = fake_quant(Tensor(x), Tensor(np.asarray([s], np.float32)), qmin, qmax).asnumpy()
        np.testing.assert_array_equal(got, fake_quant_np(x, np.float32(s), bits, signed))
    # per-channel interval broadcast over axis 0
    s = (np.abs(rand).reshape(4, -1).max(axis=1) / qmax * 0.8).astype(np.float32).reshape(4, 1, 1)
    got = fake_quant(Tensor(rand), Tensor(s), qmin, qmax).asnumpy()
    np.testing.assert_array_equal(got, fake_quant_np(rand, s, bits, signed))


# ----------------------------------------------------------------------------- quantized cells

def _on(cell, **scales_):
    for k, v in scales_.items():
        cell.set_scale(k, v)
    cell.set_quant(weight=True, act=True)
    return cell


@pytest.mark.parametrize("per_channel", [False, True])
def test_quant_dense_matches_numpy(per_channel):
    rng = np.random.default_rng(3)
    cell = QuantDense(16, 12, w_bits=8, a_bits=8, per_channel=per_channel)
    w = (rng.standard_normal((12, 16)) / 4).astype(np.float32)
    b = rng.standard_normal(12).astype(np.float32)
    cell.weight.set_data(Tensor(w))
    cell.bias.set_data(Tensor(b))
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    sa = np.float32(np.abs(x).max() / 127 * 0.7)  # some inputs clip
    sw = (np.abs(w).max(axis=1, keepdims=True) / 127 * 0.9).astype(np.float32) if per_channel \
        else np.float32(np.abs(w).max() / 127 * 0.9)
    _on(cell, a=sa, w=sw)
    ref = fake_quant_np(x, sa, 8) @ fake_quant_np(w, sw, 8).T + b
    got = cell(Tensor(x)).asnumpy()
    assert got.shape == (2, 5, 12)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    assert np.abs(got - (x @ w.T + b)).max() > 1e-4  # the quantization is really applied
    cell.set_quant(weight=False, act=False)
    np.testing.assert_allclose(cell(Tensor(x)).asnumpy(), x @ w.T + b, rtol=0, atol=1e-5)


def test_set_scale_rejects_bad_intervals():
    cell = QuantDense(4, 3)
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="finite and positive"):
            cell.set_scale("a", bad)


@pytest.mark.parametrize("per_channel", [False, True])
def test_quant_conv2d_matches_numpy(per_channel):
    rng = np.random.default_rng(4)
    cout, cin, p = 6, 3, 4
    cell = QuantConv2d(cin, cout, p, p, w_bits=8, a_bits=8, per_channel=per_channel)
    w = (rng.standard_normal((cout, cin, p, p)) / 7).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    cell.weight.set_data(Tensor(w))
    cell.bias.set_data(Tensor(b))
    x = rng.standard_normal((2, cin, 8, 8)).astype(np.float32)
    sa = np.float32(np.abs(x).max() / 127 * 0.8)
    sw = (np.abs(w).reshape(cout, -1).max(axis=1) / 127).astype(np.float32).reshape(cout, 1, 1, 1) if per_channel \
        else np.float32(np.abs(w).max() / 127)
    _on(cell, a=sa, w=sw)
    xh, wh = fake_quant_np(x, sa, 8), fake_quant_np(w, sw, 8)
    xr = xh.reshape(2, cin, 2, p, 2, p)
    ref = np.einsum("ncaubv,ocuv->noab", xr, wh) + b[None, :, None, None]
    got = cell(Tensor(x)).asnumpy()
    assert got.shape == (2, cout, 2, 2)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("transpose_b,a_signed", [(True, True), (False, False)])
def test_quant_matmul_matches_numpy(transpose_b, a_signed):
    rng = np.random.default_rng(5)
    if transpose_b:  # Q·Kᵀ
        a = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
        bmat = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    else:  # softmax(A)·V: a non-negative first operand on the unsigned grid
        logits_ = rng.standard_normal((2, 2, 5, 5)).astype(np.float32) * 2
        a = (np.exp(logits_) / np.exp(logits_).sum(-1, keepdims=True)).astype(np.float32)
        bmat = rng.standard_normal((2, 2, 5, 4)).astype(np.float32)
    cell = QuantMatMul(transpose_b=transpose_b, a_bits=8, b_bits=8, a_signed=a_signed)
    assert (cell.a_q.qmin, cell.a_q.qmax) == ((-128, 127) if a_signed else (0, 255))
    sa = np.float32((np.abs(a).max() if a_signed else a.max()) / cell.a_q.qmax * 0.6)
    sb = np.float32(np.abs(bmat).max() / 127 * 0.9)
    _on(cell, a=sa, b=sb)
    ah, bh = fake_quant_np(a, sa, 8, a_signed), fake_quant_np(bmat, sb, 8)
    ref = ah @ (np.swapaxes(bh, -1, -2) if transpose_b else bh)
    got = cell(Tensor(a), Tensor(bmat)).asnumpy()
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5)
    if not a_signed:
        assert ah.min() >= 0 and len(np.unique(ah)) > 20  # the unsigned grid uses 0..255


# ----------------------------------------------------------------------------- quantize_model

@pytest.mark.parametrize("switches,removed,added", [
    ({}, [], []),
    ({"quantize_head": True}, [], ["head"]),
    ({"quantize_patch_embed": False}, ["patch_embed.proj"], []),
    ({"quantize_matmul1": False}, ["blocks.0.attn.matmul1", "blocks.1.attn.matmul1"], []),
    ({"quantize_matmul2": False}, ["blocks.0.attn.matmul2", "blocks.1.attn.matmul2"], []),
])
def test_quantize_model_replaced_names(switches, removed, added):
    model, names, _ = tiny_quant(**switches)
    assert names == [n for n in DEFAULT_NAMES if n not in removed] + added
    assert [n for n, _ in quant_cells(model)] == names
    kinds = dict(model.cells_and_names())
    for n in names:
        want = QuantConv2d if n == "patch_embed.proj" else QuantMatMul if "matmul" in n else QuantDense
        assert type(kinds[n]) is want, n
        assert not any(getattr(kinds[n], f"{op}_on") for op in kinds[n].operands)  # starts switched off
    for n in removed + (["head"] if not added else []):
        assert type(kinds[n]).__name__ not in ("QuantConv2d", "QuantDense", "QuantMatMul"), n


def test_matmul_signedness_and_transpose():
    model, _, _ = tiny_quant(softmax_unsigned=True)
    cells = dict(quant_cells(model))
    m1, m2 = cells["blocks.0.attn.matmul1"], cells["blocks.0.attn.matmul2"]
    assert m1.transpose_b and not m2.transpose_b
    assert m1.a_q.signed and m1.b_q.signed and not m2.a_q.signed and m2.b_q.signed


def test_parameter_names_keep_fp_names():
    fp = tiny_fp()
    fp_names = [n for n, _ in fp.parameters_and_names()]
    model, names, _ = tiny_quant()
    params = dict(model.parameters_and_names())
    for n, p in params.items():
        assert p.name == n, (n, p.name)
    scale_names = [n for n in params if n.rsplit(".", 1)[-1] in ("w_scale", "a_scale", "b_scale")]
    assert sorted(set(params) - set(scale_names)) == sorted(fp_names)
    for want in ("blocks.0.attn.qkv.weight", "blocks.0.attn.qkv.bias", "blocks.1.mlp.fc2.weight",
                 "patch_embed.proj.weight", "blocks.0.attn.qkv.w_scale", "blocks.0.attn.qkv.a_scale",
                 "blocks.1.attn.matmul1.a_scale", "blocks.1.attn.matmul1.b_scale", "patch_embed.proj.a_scale"):
        assert want in params, want
    expected_scales = []
    for n in names:
        expected_scales += [f"{n}.a_scale", f"{n}.b_scale"] if "matmul" in n else [f"{n}.w_scale", f"{n}.a_scale"]
    assert sorted(scale_names) == sorted(expected_scales)
    # the FP weights are carried over
    fp_params = dict(fp.parameters_and_names())
    for n in fp_names:
        np.testing.assert_array_equal(params[n].asnumpy(), fp_params[n].asnumpy())


def test_fp_checkpoint_loads_into_quantized_model(tmp_path):
    fp = tiny_fp(seed=7)
    path = str(tmp_path / "fp.ckpt")
    ms.save_checkpoint(fp, path)
    model, _, _ = tiny_quant(seed=0)
    load_checkpoint_into(model, path)
    x = images(4)
    np.testing.assert_allclose(logits(model, x), logits(fp, x), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def w16_saved(tmp_path_factory):
    """A minmax W16A16 tiny model, its FP logits, saved."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, names, cfg = tiny_quant(w_bits=16, a_bits=16)
    x = images(8)
    fp = logits(model, x)
    calibrate(model, x, cfg)
    path = str(tmp_path_factory.mktemp("w16") / "quantized.ckpt")
    save_quantized_checkpoint(model, path, TINY)
    return model, x, fp, path


def test_16_bits_match_fp(w16_saved):
    model, x, fp, _ = w16_saved
    q = logits(model, x)
    assert rel_diff(q, fp) < 1e-3
    assert np.abs(q - fp).max() > 0  # quantized, not FP
    set_quant_mode(model, "fp")
    try:
        np.testing.assert_array_equal(logits(model, x), fp)
        with pytest.raises(ValueError, match="quant mode"):
            set_quant_mode(model, "int8")
    finally:
        set_quant_mode(model, "quantized")


# ----------------------------------------------------------------------------- quantized checkpoint

@pytest.fixture(scope="module")
def w8_saved(tmp_path_factory):
    """A minmax W8A8 tiny model (per-channel weights, unsigned softmax, head included), saved."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model, names, cfg = tiny_quant(weight_per_channel=True, softmax_unsigned=True, quantize_head=True)
    x = images(8)
    calibrate(model, x, cfg)
    path = str(tmp_path_factory.mktemp("w8") / "quantized.ckpt")
    save_quantized_checkpoint(model, path, TINY, extra_meta={"method": "minmax"})
    return model, names, path, x


def test_minmax_default_quantized_input_first_layer(w8_saved):
    model, _, _, x = w8_saved
    assert defaults()["calib_input"] == "quantized"
    np.testing.assert_allclose(dict(quant_cells(model))["patch_embed.proj"].get_scale("a"),
                               [np.abs(x).max() / 127], rtol=1e-6)
    assert all(getattr(c, f"{op}_on") for _, c in quant_cells(model) for op in c.operands)  # left quantized


def test_quantized_checkpoint_roundtrip(w8_saved):
    model, names, path, _ = w8_saved
    x = images(8, seed=2)
    ref = logits(model, x)
    loaded, meta = load_quantized_checkpoint(path)
    assert [n for n, _ in quant_cells(loaded)] == names
    assert np.abs(logits(loaded, x) - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())
    for n, s in scales(model).items():
        for op, v in s.items():
            np.testing.assert_array_equal(scales(loaded)[n][op], v)
    m2 = dict(quant_cells(loaded))["blocks.0.attn.matmul2"]
    assert not m2.a_q.signed and dict(quant_cells(loaded))["blocks.0.attn.qkv"].w_scale.shape == (96, 1)
    assert meta["model"] == TINY and meta["method"] == "minmax" and meta["num_classes"] == 10


def test_quantized_checkpoint_contents(w8_saved):
    model, names, path, _ = w8_saved
    raw = ms.load_checkpoint(path)
    meta, _ = read_quant_meta(path)
    assert meta == json.loads(raw["quant_meta"].asnumpy().tobytes().decode("utf-8"))  # UTF-8 JSON bytes
    assert meta["model"] == TINY and sorted(meta["layers"]) == sorted(names)
    cells = dict(quant_cells(model))
    for n in names:
        layer = meta["layers"][n]
        ops_ = ("a", "b") if "matmul" in n else ("w", "a")
        for op in ops_:
            assert layer[op]["bits"] == 8
        if "matmul" in n:
            assert f"{n}.weight_packed" not in raw
            continue
        packed = raw[f"{n}.weight_packed"]  # 8-bit codes packed: one byte each (src/quant/packing.py)
        assert packed.dtype == ms.uint8 and f"{n}.weight" not in raw
        codes = unpack_codes(packed.asnumpy(), 8, True, cells[n].weight.shape)
        np.testing.assert_array_equal(codes, quantize_np(cells[n].weight.asnumpy(), cells[n].get_scale("w"), 8))
    assert raw["blocks.0.norm1.gamma"].dtype == ms.float32 and raw["head.bias"].dtype == ms.float32


def test_quantized_checkpoint_16_bits(w16_saved):
    model, x, _, path = w16_saved
    raw = ms.load_checkpoint(path)
    meta = read_quant_meta(path)[0]
    fc1, shape = raw["blocks.1.mlp.fc1.weight_packed"], meta["packed_weights"]["blocks.1.mlp.fc1"]["shape"]
    assert fc1.dtype == ms.uint8 and fc1.shape == (2 * int(np.prod(shape)),)  # two bytes per 16-bit code
    assert raw["patch_embed.proj.weight_packed"].dtype == ms.uint8
    codes = unpack_codes(fc1.asnumpy(), 16, True, shape)
    assert np.abs(codes).max() == 32767  # the 16-bit grid is used
    assert meta["layers"]["blocks.1.mlp.fc1"]["w"]["bits"] == 16 and meta["layers"]["blocks.1.mlp.fc1"]["a"]["bits"] == 16
    assert meta["layers"]["blocks.0.attn.matmul1"]["b"]["bits"] == 16
    loaded, _ = load_quantized_checkpoint(path, TINY)
    ref = logits(model, x)
    assert np.abs(logits(loaded, x) - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())


def test_load_quantized_checkpoint_other_model_name(w8_saved, tmp_path):
    _, _, path, _ = w8_saved
    with pytest.raises(ValueError) as e:
        load_quantized_checkpoint(path, "deit_fmnist")
    assert TINY in str(e.value) and "deit_fmnist" in str(e.value)
    fp_path = str(tmp_path / "fp.ckpt")
    ms.save_checkpoint(tiny_fp(), fp_path)
    assert read_quant_meta(fp_path) is None
    with pytest.raises(ValueError, match="not a quantized checkpoint"):
        load_quantized_checkpoint(fp_path)


def test_graph_and_pynative_agree(w8_saved):
    _, _, path, _ = w8_saved
    x = images(8, seed=3)
    out = {}
    try:
        for mode in (ms.GRAPH_MODE, ms.PYNATIVE_MODE):
            ms.set_context(mode=mode)
            model, _ = load_quantized_checkpoint(path)  # a fresh instance per mode
            out[mode] = logits(model, x)
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    g, p = out[ms.GRAPH_MODE], out[ms.PYNATIVE_MODE]
    assert rel_diff(g, p) < 1e-4
    assert (g.argmax(1) == p.argmax(1)).all()


# ----------------------------------------------------------------------------- model size

def test_model_size_mb():
    d, hid, p, c, t, k, depth = 32, 128, 7, 1, 17, 10, 2
    patch_w, patch_b = d * c * p * p, d
    qkv_w, proj_w, fc1_w, fc2_w = 3 * d * d, d * d, hid * d, d * hid
    block_other = 2 * d + 3 * d + d + hid + d + 2 * d  # norm1, qkv.bias, proj.bias, fc1.bias, fc2.bias, norm2
    quantized_w = patch_w + depth * (qkv_w + proj_w + fc1_w + fc2_w)
    other = d + t * d + patch_b + depth * block_other + 2 * d + (k * d + k)  # cls, pos, patch bias, blocks, norm, head
    assert quantized_w == 26144 and other == 1834
    fp_mb = (quantized_w + other) * 4 / 1e6
    w8_mb = (quantized_w * 8 + other * 32) / 8 / 1e6
    assert model_size_mb(tiny_fp(), quantized=False) == pytest.approx(fp_mb, abs=1e-12)
    model, _, _ = tiny_quant()
    assert model_size_mb(model, quantized=False) == pytest.approx(fp_mb, abs=1e-12)  # scales not counted
    set_quant_mode(model, "quantized")
    assert model_size_mb(model) == pytest.approx(w8_mb, abs=1e-12) == pytest.approx(0.03348, abs=1e-12)
    model4, _, _ = tiny_quant(w_bits=4, quantize_head=True)
    set_quant_mode(model4, "quantized")
    assert model_size_mb(model4) == pytest.approx(((quantized_w + k * d) * 4 + (other - k * d) * 32) / 8 / 1e6,
                                                  abs=1e-12)


# ----------------------------------------------------------------------------- calibration methods

CALIB = dict(calib_input="fp", softmax_unsigned=True, search_candidates=15, search_rounds=2)  # 1.0 on the grid


@pytest.fixture(scope="module")
def calib_runs():
    """The same tiny model and images calibrated with each method (FP inputs, so that every
    method sees the same captured tensors); easyquant twice for determinism."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    x = images(8, seed=11)
    runs = {}
    for key, method, extra in (("minmax", "minmax", {}), ("percentile", "percentile", {"percentile": 99.0}),
                               ("easyquant", "easyquant", {"weight_per_channel": True}),
                               ("easyquant2", "easyquant", {"weight_per_channel": True})):
        model, names, cfg = tiny_quant(seed=5, method=method, **CALIB, **extra)
        report = calibrate(model, x, cfg)
        runs[key] = (model, scales(model), report)
    return x, runs


def test_minmax_intervals_are_max_over_captured_inputs(calib_runs):
    x, runs = calib_runs
    model, sc, _ = runs["minmax"]
    # the first layer's input is the images themselves
    np.testing.assert_allclose(sc["patch_embed.proj"]["a"], [np.abs(x).max() / 127], rtol=1e-6)
    # every other input: captured from the FP forward pass with hooks
    cells = dict(quant_cells(model))
    set_quant_mode(model, "fp")
    captured, handles = {}, []
    for n, cell in cells.items():
        def hook(c, inputs, output, _n=n):
            captured[_n] = tuple(t.asnumpy() for t in inputs)
        handles.append(cell.register_forward_hook(hook))
    try:
        model(Tensor(x))
    finally:
        for h in handles:
            h.remove()
    for n, cell in cells.items():
        inp = captured[n]
        if "matmul" in n:
            qmax_a = 255 if n.endswith("matmul2") else 127
            amax = inp[0].max() if n.endswith("matmul2") else np.abs(inp[0]).max()
            np.testing.assert_allclose(sc[n]["a"], [amax / qmax_a], rtol=1e-5, err_msg=n)
            np.testing.assert_allclose(sc[n]["b"], [np.abs(inp[1]).max() / 127], rtol=1e-5, err_msg=n)
        else:
            np.testing.assert_allclose(sc[n]["a"], [np.abs(inp[0]).max() / 127], rtol=1e-5, err_msg=n)
            np.testing.assert_allclose(sc[n]["w"], [np.abs(cell.weight.asnumpy()).max() / 127], rtol=1e-6,
                                       err_msg=n)


def test_percentile_not_above_minmax(calib_runs):
    _, runs = calib_runs
    mm, pc = runs["minmax"][1], runs["percentile"][1]
    smaller = 0
    for n in mm:
        for op in mm[n]:
            if op == "w":
                np.testing.assert_array_equal(pc[n]["w"], mm[n]["w"])  # weights keep the max interval
            else:
                assert pc[n][op][0] <= mm[n][op][0] * (1 + 1e-6), (n, op)
                smaller += pc[n][op][0] < mm[n][op][0]
    assert smaller > 10


def test_easyquant_objective_and_search_bounds(calib_runs):
    _, runs = calib_runs
    model, sc, report = runs["easyquant"]
    mm = runs["minmax"][1]
    alpha, beta = defaults()["search_alpha"], defaults()["search_beta"]
    cells = dict(quant_cells(model))
    moved = 0
    for n, cell in cells.items():
        hist = report[n]["objective"]
        assert len(hist) == 3 and report[n]["rounds"] == 2, n
        assert hist[-1] >= hist[0] - 1e-6, (n, hist)
        assert all(b >= a - 1e-6 for a, b in zip(hist, hist[1:])), (n, hist)
        for op in cell.operands:
            if op == "w":
                d0 = init_scale(cell.weight.asnumpy(), 8, per_channel=True)
                assert sc[n]["w"].shape == d0.shape == (cell.weight.shape[0],) + (1,) * (cell.weight.ndim - 1)
            else:
                d0 = mm[n][op]  # the max-based interval of the same (FP) captured input
            s = sc[n][op]
            assert np.all(s >= alpha * d0 * (1 - 1e-6)) and np.all(s <= beta * d0 * (1 + 1e-6)), (n, op)
            moved += not np.allclose(s, d0, rtol=1e-5)
    assert moved > 0


def test_calibration_is_deterministic(calib_runs):
    _, runs = calib_runs
    a, b = runs["easyquant"], runs["easyquant2"]
    for n in a[1]:
        for op in a[1][n]:
            np.testing.assert_array_equal(a[1][n][op], b[1][n][op])
        assert a[2][n]["objective"] == b[2][n]["objective"]


def test_unknown_method_in_calibrate_model():
    model, _, cfg = tiny_quant(method="foo")
    with pytest.raises(ValueError, match="foo"):
        calibrate(model, images(2), cfg)


# ----------------------------------------------------------------------------- search maths

def test_cosine_and_pearson_hand_computed():
    t = np.array([[1.0, 2.0, 3.0], [1.0, 0.0, 0.0]])
    o = np.array([[[2.0, 4.0, 6.0], [0.0, 1.0, 0.0]], [[3.0, 2.0, 1.0], [2.0, 0.0, 0.0]]])
    np.testing.assert_allclose(search.cosine(t, o), [[1.0, 0.0], [10 / 14, 1.0]], atol=1e-12)
    t2 = np.array([[1.0, 2.0, 3.0, 4.0]])
    o2 = np.array([[[1.0, 3.0, 2.0, 4.0]], [[4.0, 3.0, 2.0, 1.0]], [[11.0, 12.0, 13.0, 14.0]]])
    np.testing.assert_allclose(search.pearson(t2, o2), [[0.8], [-1.0], [1.0]], atol=1e-12)
    assert search.cosine(t2, np.zeros((1, 1, 4)))[0, 0] == 0.0  # no division by zero


def _brute_force(a, b, bias, target, transpose_b, which, cands, other, bits, a_signed, objective):
    """Mean objective per candidate by a plain loop (float64 similarities)."""
    res = []
    for c in cands:
        sa, sb = (c, other) if which == "a" else (other, c)
        ah = fake_quant_np(a, sa, bits, a_signed)
        bh = fake_quant_np(b, sb, bits, True)
        out = ah @ (np.swapaxes(bh, -1, -2) if transpose_b else bh)
        if bias is not None:
            out = out + bias
        vals = []
        for i in range(len(a)):
            tt, oo = target[i].ravel().astype(np.float64), out[i].ravel().astype(np.float64)
            if objective == "pearson":
                tt, oo = tt - tt.mean(), oo - oo.mean()
            vals.append(tt @ oo / (np.linalg.norm(tt) * np.linalg.norm(oo)))
        res.append(np.mean(vals))
    return np.array(res)


@pytest.mark.parametrize("kind,which,small_chunks", [
    ("dense", "a", False), ("dense", "b", False), ("dense_pc", "b", True), ("dense_pc", "a", False),
    ("matmul1", "a", False), ("matmul1", "b", True), ("matmul2", "a", True), ("matmul2", "b", False),
])
def test_score_candidates_equals_brute_force(kind, which, small_chunks, monkeypatch):
    rng = np.random.default_rng(21)
    bias, a_signed, bits = None, True, 4
    if kind.startswith("dense"):
        a = rng.standard_normal((6, 5, 8)).astype(np.float32)
        b = (rng.standard_normal((7, 8)) / 3).astype(np.float32)
        bias = rng.standard_normal(7).astype(np.float32)
        transpose_b, shared = True, True
    elif kind == "matmul1":
        a = rng.standard_normal((4, 2, 5, 3)).astype(np.float32)
        b = rng.standard_normal((4, 2, 5, 3)).astype(np.float32)
        transpose_b, shared = True, False
    else:
        z = np.exp(rng.standard_normal((4, 2, 5, 5)))
        a = (z / z.sum(-1, keepdims=True)).astype(np.float32)
        b = rng.standard_normal((4, 2, 5, 3)).astype(np.float32)
        transpose_b, shared, a_signed = False, False, False
    target = a @ (np.swapaxes(b, -1, -2) if transpose_b else b) + (0 if bias is None else bias)
    problem = search.LayerProblem(a, b, target, bias=bias, transpose_b=transpose_b, b_shared=shared)
    sa0 = init_scale(a, bits, a_signed)
    sb0 = init_scale(b, bits, True, per_channel=kind == "dense_pc")
    cands = search.candidate_grid(sa0 if which == "a" else sb0, 0.5, 1.2, 9)
    assert cands.shape == (9,) + (sa0 if which == "a" else sb0).shape
    np.testing.assert_allclose(cands[0], 0.5 * (sa0 if which == "a" else sb0), rtol=1e-6)
    np.testing.assert_allclose(cands[-1], 1.2 * (sa0 if which == "a" else sb0), rtol=1e-6)
    if small_chunks:  # several sample chunks and candidate chunks
        monkeypatch.setattr(search, "CHUNK_ELEMS", 200)
    a_hat = fake_quant_np(a, sa0, bits, a_signed)
    b_hat_right = fake_quant_np(problem.b_right, problem.right_scale(sb0), bits, True)
    for objective in ("cosine", "pearson"):
        got = search.score_candidates(problem, which, cands, a_hat, b_hat_right, bits,
                                      a_signed if which == "a" else True, objective,
                                      cand_chunk=4 if small_chunks else None)
        want = _brute_force(a, b, bias, target, transpose_b, which, cands, sb0 if which == "a" else sa0, bits,
                            a_signed, objective)
        assert got.shape == (9,) and got.dtype == np.float64
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
        assert np.ptp(got) > 1e-6  # the candidates are told apart
        # evaluate_pair is the same objective at the current intervals
        pair = search.evaluate_pair(problem, a_hat, b_hat_right, objective)
        assert pair == pytest.approx(_brute_force(a, b, bias, target, transpose_b, "a", [sa0], sb0, bits, a_signed,
                                                  objective)[0], abs=1e-6)


# ----------------------------------------------------------------------------- quant.py end to end

@pytest.fixture(scope="module")
def embedded_quant(tmp_path_factory):
    """quant.py W8A8 minmax on the embedded model (first N_EMB test images, 32 calibration images)."""
    out = tmp_path_factory.mktemp("quant_emb")
    rc = quant_script.cli(["--max-images", str(N_EMB), "--calib-num", "32", "--method", "minmax",
                           "--w-bits", "8", "--a-bits", "8", "--output", str(out)])
    assert rc == 0
    return out, read_json(out / "result.json")


def test_embedded_w8a8_close_to_fp(embedded_quant):
    out, res = embedded_quant
    assert res["model"] == "deit_fmnist" and res["num_images"] == N_EMB and res["calib_num"] == 32
    assert res["method"] == "minmax" and res["w_bits"] == 8 and res["a_bits"] == 8
    assert res["fp_top1"] > 50.0
    assert abs(res["top1"] - res["fp_top1"]) <= 1.0, (res["top1"], res["fp_top1"])
    assert res["model_size_mb"] < res["fp_model_size_mb"] / 3
    assert os.path.samefile(res["quantized_checkpoint"], out / "quantized.ckpt")
    assert set(res["layers"]) == {"patch_embed.proj"} | {f"blocks.{b}.{s}" for b in range(4) for s in BLOCK_LAYERS}
    assert res["layers"]["blocks.0.attn.qkv"]["w"]["bits"] == 8
    assert "calibration" in res["layers"]["blocks.0.attn.qkv"]
    assert sorted(os.listdir(out)) == ["config.yaml", "quantized.ckpt", "result.json", "run_manifest.json"]


def test_eval_of_saved_quantized_checkpoint_same_top1(embedded_quant, tmp_path):
    out, res = embedded_quant
    rc = eval_script.cli(["--ckpt", str(out / "quantized.ckpt"), "--max-images", str(N_EMB),
                          "--output", str(tmp_path)])
    assert rc == 0
    ev = read_json(tmp_path / "result.json")
    assert ev["model"] == "deit_fmnist" and ev["num_images"] == N_EMB
    assert ev["top1"] == res["top1"] and ev["top5"] == res["top5"]


def _assert_clean_failure(rc, capsys, out, *expect):
    assert rc == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:"), err
    for e in expect:
        assert e in err[0], (e, err[0])
    left = [os.path.basename(p) for p in glob.glob(os.path.join(str(out), "**", "*"), recursive=True)]
    left += [os.path.basename(p) for p in glob.glob(os.path.join(str(out), "**", ".*"), recursive=True)]
    assert "result.json" not in left and "quantized.ckpt" not in left, left
    assert not [f for f in left if "tmp" in f], left


@pytest.mark.parametrize("args,expect", [
    (["--w-bits", "1"], ["w_bits", "is 1;"]),
    (["--a-bits", "17"], ["a_bits", "is 17;"]),
    (["--method", "foo"], ["--method", "'foo'"]),
    (["--calib-num", "100000"], ["calib_num", "100000", "4096"]),
])
def test_quant_bad_values(args, expect, tmp_path, capsys):
    out = tmp_path / "out"
    _assert_clean_failure(quant_script.cli(args + ["--max-images", "10", "--output", str(out)]), capsys, out, *expect)


def test_quant_unknown_yaml_key(tmp_path, capsys):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model: deit_fmnist\nmethod: minmax\nw_bitz: 8\n")
    out = tmp_path / "out"
    _assert_clean_failure(quant_script.cli(["--config", str(cfg), "--output", str(out)]), capsys, out,
                          str(cfg), "unknown key 'w_bitz'")
    assert not out.exists()


def test_quantized_checkpoint_of_another_model(embedded_quant, tmp_path, capsys):
    qckpt = str(embedded_quant[0] / "quantized.ckpt")
    out = tmp_path / "out"
    for script in (quant_script, eval_script):
        rc = script.cli(["--model", "deit_tiny_patch16_224", "--ckpt", qckpt, "--max-images", "10",
                         "--output", str(out)])
        _assert_clean_failure(rc, capsys, out, "deit_fmnist", "deit_tiny_patch16_224", qckpt)
    # quant.py takes full-precision weights: its own output is not quantized again
    rc = quant_script.cli(["--ckpt", qckpt, "--max-images", "10", "--output", str(out)])
    _assert_clean_failure(rc, capsys, out, qckpt, "quantized checkpoint")
    assert not out.exists()


def test_run_embedded_suite_fast(tmp_path, monkeypatch):
    """The no-argument job, cut down to one method at W8A8 on 200 images."""
    monkeypatch.setattr(quant_script, "SUITE_BITS", (8,))
    monkeypatch.setattr(src.quant, "METHODS", {"minmax": src.quant.METHODS["minmax"]})
    monkeypatch.setattr(quant_script, "defaults", lambda: dict(defaults(), max_images=200))
    root = tmp_path / "suite"
    rows = quant_script.run_embedded_suite(str(root))
    assert [(r["method"], r["w_bits"], r["a_bits"], r["num_images"]) for r in rows] == [("minmax", 8, 8, 200)]
    summary = (root / "summary.md").read_text().splitlines()
    assert len(summary) == 3 and summary[2].startswith("| minmax | W8A8 |")
    fp = read_json(root / "fp_result.json")
    assert fp["top1"] == rows[0]["fp_top1"] and fp["num_images"] == 200
    assert (root / "minmax_w8a8" / "quantized.ckpt").is_file()


@pytest.mark.parametrize("tool", ["quant", "eval", "export"])
def test_help_prints_every_flag(tool, capsys):
    """--help exits 0 and prints the help of every flag (argparse formats each help text with
    %, so a stray '%' in a config key's help breaks --help for the whole tool)."""
    with pytest.raises(SystemExit) as exc:
        importlib.import_module(tool).cli(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    if tool == "quant":
        assert all(f"--{k.replace('_', '-')}" in out for k in quant_script.QUANT_KEYS)
