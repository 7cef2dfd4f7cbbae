"""Integer ONNX export (src.export.onnx) against the fake-quantized MindSpore model.

Two comparisons: the graph run by onnxruntime without optimizations (float QDQ semantics) and
with ORT_ENABLE_ALL (integer kernels: exact int32 sums where MindSpore sums floats). Both
differ from MindSpore by float rounding, which can move a value across a rounding boundary
and flip a code that the following layers then carry; hence top-1 agreement plus a bound on
the median and the largest logit difference rather than equality, except where the grid is
coarse (4 bits, no code sits near a tie on these inputs). A tiny ViT with random weights
keeps it fast; the embedded model checks W8A8 on real test images.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from _helpers import randomize  # noqa: E402
from src.config import defaults  # noqa: E402
from src.data.fmnist import load_embedded, normalize  # noqa: E402
from src.engine import build_model, predict  # noqa: E402
from src.export.onnx import (OnnxModel, check_integer_products, export_onnx, onnx_metadata,  # noqa: E402
                             onnx_model_name)
from src.export.ort_run import qemu, run_on_cpu  # noqa: E402
from src.models import create_model, get_data_config  # noqa: E402
from src.models.registry import default_checkpoint  # noqa: E402
from src.models.vit import VisionTransformer  # noqa: E402
from src.quant import calibrate_model, quant_cells, quantize_model, set_quant_mode  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ms.set_device("CPU")
TINY_CFG = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
INTEGER_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul"}


@pytest.fixture(scope="module", autouse=True)
def restore_mode():
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    yield
    ms.set_context(mode=mode)


def images(n=32, seed=1, c=1, size=28):
    return np.random.default_rng(seed).standard_normal((n, c, size, size)).astype(np.float32)


def quantized_tiny(seed=0, calibrate=True, **qkw):
    """Tiny ViT, random weights, quantized (minmax on 32 random images) and in quantized mode."""
    model = randomize(VisionTransformer(**TINY_CFG), seed)
    model.model_name = "tiny_vit"
    cfg = defaults()
    cfg.update(method="minmax", w_bits=8, a_bits=8, calib_num=32)
    cfg.update(qkw)
    quantize_model(model, cfg)
    if calibrate:
        calibrate_model(model, images(32, seed=7), cfg, log=open(os.devnull, "w"))
    set_quant_mode(model, "quantized")
    model.set_train(False)
    return model


def ms_logits(model, x):
    return predict(model, x, len(x))


def ort_logits(path, x, optimize=True):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                     else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def compare(got, ref, min_agree=0.99, max_rel=0.1):
    """Top-1 agreement, median and largest |difference| relative to the logits' scale."""
    diff = np.abs(got - ref).max(axis=1)
    scale = np.abs(ref).max()
    agree = float((got.argmax(1) == ref.argmax(1)).mean())
    msg = f"agreement {agree:.4f}, max |diff| {diff.max():.3g}, median {np.median(diff):.3g}, logit scale {scale:.3g}"
    print(msg)
    assert agree >= min_agree, msg
    assert np.median(diff) <= 1e-4 * scale, msg
    assert diff.max() <= max_rel * scale, msg
    return diff.max()


def optimized_ops(path, tmp_path):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    opts.log_severity_level = 3  # no warning about serializing an optimized model
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node]


def initializers(path):
    return {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


# ----------------------------------------------------------------------------- agreement

def test_embedded_w8a8_matches_fake_quant(tmp_path):
    name = "deit_fmnist"
    dc = get_data_config(name)
    test_images, _ = load_embedded("test")
    x = normalize(test_images[:400], dc["mean"], dc["std"])
    model = create_model(name, checkpoint=default_checkpoint(name))
    cfg = defaults()
    cfg.update(method="minmax", w_bits=8, a_bits=8)
    quantize_model(model, cfg)
    calibrate_model(model, normalize(load_embedded("calib")[0][:32], dc["mean"], dc["std"]), cfg,
                    log=open(os.devnull, "w"))
    set_quant_mode(model, "quantized")
    ref = ms_logits(model, x)
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    compare(ort_logits(path, x, optimize=False), ref)
    compare(OnnxModel(path)(x).asnumpy(), ref)
    ops = optimized_ops(path, tmp_path)
    n_quant = len(quant_cells(model))
    assert sum(op in INTEGER_OPS for op in ops) == n_quant  # every quantized product runs in integers
    assert ops.count("MatMul") == 1 and "DequantizeLinear" not in ops  # the float head only


def test_tiny_w8a8_graph_and_metadata(tmp_path):
    model = quantized_tiny()
    x = images(64, seed=2)
    ref = ms_logits(model, x)
    path = tmp_path / "tiny.onnx"
    export_onnx(model, path)
    compare(ort_logits(path, x, optimize=False), ref)
    compare(ort_logits(path, x), ref)
    meta = onnx_metadata(path)
    assert meta["model_name"] == "tiny_vit" and meta["num_classes"] == "10" and meta["input_shape"] == "[1, 28, 28]"
    bits = __import__("json").loads(meta["layer_bits"])
    assert set(bits) == {n for n, _ in quant_cells(model)}
    assert bits["blocks.0.attn.matmul2"]["a"] == {"bits": 8, "signed": True}
    assert onnx_model_name(path) == "tiny_vit"
    inits = initializers(path)
    w = inits["blocks.0.mlp.fc1.weight_int"]
    # 8-bit weights with 8-bit activations: uint8 codes + 128 (a uint8 x int8 pair sum could
    # leave int16), (in, out) for MatMul
    assert w.dtype == np.uint8 and w.shape == (32, 128) and inits["blocks.0.mlp.fc1.w_zero_point"] == 128
    assert inits["blocks.0.mlp.fc1.w_scale"].shape == ()
    products = __import__("json").loads(meta["integer_products"])
    assert len(products) == len(quant_cells(model)) and {p["kernel"] for p in products.values()} == {"u8u8"}


def test_per_channel_head_and_float_patch_embed(tmp_path):
    model = quantized_tiny(weight_per_channel=True, quantize_head=True, quantize_patch_embed=False)
    x = images(64, seed=3)
    ref = ms_logits(model, x)
    path = tmp_path / "pc.onnx"
    export_onnx(model, path, model_name="other_name")
    compare(ort_logits(path, x, optimize=False), ref)
    compare(ort_logits(path, x), ref)
    proto = onnx.load(str(path))
    dq = [n for n in proto.graph.node if n.name == "blocks.0.attn.qkv/DequantizeLinear"][0]
    assert [(a.name, a.i) for a in dq.attribute] == [("axis", 1)]
    inits = initializers(path)
    assert inits["blocks.0.attn.qkv.w_scale"].shape == (96,) and "head.weight_int" in inits
    assert "patch_embed.proj.weight_int" not in inits and "patch_embed.proj.weight" in inits
    ops = optimized_ops(path, tmp_path)
    assert sum(op in INTEGER_OPS for op in ops) == len(quant_cells(model))  # the head too
    assert ops.count("MatMul") == 1 and "DequantizeLinear" not in ops  # the float patch embedding only
    assert onnx_model_name(path) == "other_name"


def test_4bit_clip_exact_graph(tmp_path):
    model = quantized_tiny(w_bits=4, a_bits=4, softmax_unsigned=True)
    x = images(32, seed=4)
    ref = ms_logits(model, x)
    path = tmp_path / "w4a4.onnx"
    export_onnx(model, path)
    # unoptimized QDQ graph: the same codes as the fake quantization, float sums
    np.testing.assert_allclose(ort_logits(path, x, optimize=False), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    # integer kernels: exact sums, so a few values land on the other side of a rounding boundary and a
    # 4-bit code flip moves the following layers by a whole (coarse) step
    compare(ort_logits(path, x), ref, min_agree=0.9, max_rel=0.5)
    inits = initializers(path)
    w = inits["blocks.1.mlp.fc2.weight_int"]
    assert w.dtype == np.int8 and w.min() >= -8 and w.max() <= 7  # 2·15·8 fits int16: uint8 x int8
    nodes = {n.name: n for n in onnx.load(str(path)).graph.node}
    assert "blocks.0.mlp.fc1.a/Clip" in nodes
    assert inits["blocks.0.attn.matmul2.a.zero_point"] == np.uint8(0)  # unsigned softmax output
    assert inits["blocks.0.attn.matmul1.a.zero_point"] == np.uint8(8)  # signed 4-bit codes from 0: 0..15
    assert inits["blocks.0.attn.matmul1.b.zero_point"] == np.uint8(8)  # K: uint8 too
    products = __import__("json").loads(onnx_metadata(path)["integer_products"])
    assert products["blocks.0.mlp.fc2/MatMul"]["kernel"] == "u8s8"
    assert products["blocks.0.mlp.fc2/MatMul"]["left"] == ["uint8", 0, 15]
    assert products["blocks.0.attn.matmul1/MatMul"]["kernel"] == "u8u8"


def test_wider_than_8_bits_uses_int16(tmp_path):
    model = quantized_tiny()
    cell = dict(quant_cells(model))["blocks.0.mlp.fc1"]
    cell.set_bits("w", 10)
    cell.set_bits("a", 10)
    cell.set_scale("w", cell.get_scale("w") / 4)
    cell.set_scale("a", cell.get_scale("a") / 4)
    x = images(32, seed=5)
    ref = ms_logits(model, x)
    path = tmp_path / "mp.onnx"
    export_onnx(model, path)
    inits = initializers(path)
    assert inits["blocks.0.mlp.fc1.weight_int"].dtype == np.int16
    assert inits["blocks.0.mlp.fc1.a.zero_point"].dtype == np.int16
    compare(ort_logits(path, x, optimize=False), ref)
    compare(ort_logits(path, x), ref)


def test_float_graph_matches_fp_model(tmp_path):
    model = quantized_tiny()
    x = images(16, seed=6)
    set_quant_mode(model, "fp")
    ref = ms_logits(model, x)
    path = tmp_path / "fp.onnx"
    export_onnx(model, path, quantized=False)
    np.testing.assert_allclose(ort_logits(path, x), ref, rtol=0, atol=1e-4 * np.abs(ref).max())
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in onnx.load(str(path)).graph.node)
    fp = randomize(VisionTransformer(**TINY_CFG), 1)  # an unquantized model exports as float too
    export_onnx(fp, path, quantized=False)
    np.testing.assert_allclose(ort_logits(path, x), ms_logits(fp, x), rtol=0, atol=1e-4)


def test_batch_dimension(tmp_path):
    model = quantized_tiny()
    path = tmp_path / "dyn.onnx"
    export_onnx(model, path)
    om = OnnxModel(path, num_threads=1)
    assert om(images(3)).shape == (3, 10) and om(Tensor(images(5))).shape == (5, 10)
    fixed = tmp_path / "fixed.onnx"
    export_onnx(model, fixed, batch_size=4)
    om = OnnxModel(fixed)
    x = images(4)
    np.testing.assert_allclose(om(x).asnumpy(), OnnxModel(path)(x).asnumpy(), rtol=0, atol=1e-6)
    # static shapes must not let onnxruntime turn the products into float Gemms (MatMulAddFusion)
    assert sum(op in INTEGER_OPS for op in optimized_ops(fixed, tmp_path)) == len(quant_cells(model))
    with pytest.raises(ValueError, match=r"input of shape \(3, 1, 28, 28\).*\(4, 1, 28, 28\)"):
        om(images(3))
    with pytest.raises(ValueError, match="batch_size"):
        export_onnx(model, fixed, batch_size=0)


def test_engine_build_model_and_predict(tmp_path):
    model = quantized_tiny()
    path = str(tmp_path / "eng.onnx")
    export_onnx(model, path)
    om = build_model({"ckpt": path, "model": "deit_fmnist"})
    assert isinstance(om, OnnxModel) and om.model_name == "tiny_vit" and om.num_classes == 10
    assert om.set_train(False) is om
    x = images(10)
    out = predict(om, x, 4)  # zero-padded last batch, as engine.evaluate does
    assert out.shape == (10, 10)
    np.testing.assert_allclose(out, OnnxModel(path)(x).asnumpy(), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- integer kernels on every CPU
# onnxruntime's uint8 x int8 kernel on x86 without VNNI (AVX2; AVX-512 without VNNI) adds two
# adjacent products with vpmaddubsw, saturating at int16; u8u8 widens to 16 bits and is exact,
# and so are VNNI and ARM64 dot products. The export must never rely on a saturating pair.

def u8s8_saturating(a, b):
    """a uint8 (M, K) @ b int8 (K, N) as vpmaddubsw + vpmaddwd compute it: products of adjacent
    k pairs summed with int16 saturation, then the pairs summed in int32."""
    a, b = a.astype(np.int64), b.astype(np.int64)
    if a.shape[1] % 2:
        a, b = np.pad(a, ((0, 0), (0, 1))), np.pad(b, ((0, 1), (0, 0)))
    pairs = a[:, 0::2, None] * b[None, 0::2, :] + a[:, 1::2, None] * b[None, 1::2, :]
    return np.clip(pairs, -32768, 32767).sum(axis=1)


def test_u8s8_emulation_saturates_like_the_kernel():
    a = np.full((1, 4), 255, np.uint8)
    b = np.full((4, 1), 127, np.int8)
    assert u8s8_saturating(a, b)[0, 0] == 2 * 32767 != 4 * 255 * 127
    a = np.array([[3, 200, 7]], np.uint8)
    b = np.array([[-5], [100], [-128]], np.int8)
    assert u8s8_saturating(a, b)[0, 0] == 3 * -5 + 200 * 100 + 7 * -128  # no pair leaves int16


def stored_codes(path, x, names):
    """The stored values of the QuantizeLinear outputs `names` of the unoptimized graph."""
    proto = onnx.load(str(path))
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"input": x})))


@pytest.mark.parametrize("bits", [(8, 8), (4, 4), (4, 8), (8, 4), (6, 6)])
def test_no_saturating_pair_on_the_exported_codes(tmp_path, bits):
    """On the codes of real inputs, every product the export writes as uint8 x int8 gives the
    exact int32 sums under the non-VNNI arithmetic; the earlier encoding (int8 activations,
    which onnxruntime shifts by 128, times 8-bit int8 weights) did not."""
    w_bits, a_bits = bits
    model = quantized_tiny(w_bits=w_bits, a_bits=a_bits)
    x = images(16, seed=9)
    path = tmp_path / "m.onnx"
    export_onnx(model, path)
    products = json.loads(onnx_metadata(path)["integer_products"])
    inits = initializers(path)
    layers = [n for n, c in quant_cells(model) if "matmul" not in n]
    codes = stored_codes(path, x, [f"{n}.a/QuantizeLinear" for n in layers])
    checked = saturated_before = 0
    for name in layers:
        a = codes[f"{name}.a/QuantizeLinear"]
        a = a.reshape(-1, a.shape[-1])
        w = inits[f"{name}.weight_int"]
        if products[f"{name}/MatMul"]["kernel"] == "u8s8":
            assert w.dtype == np.int8
            np.testing.assert_array_equal(u8s8_saturating(a, w), a.astype(np.int64) @ w.astype(np.int64))
            checked += 1
        if w_bits == a_bits == 8:  # the earlier encoding of the same codes
            zp = int(inits[f"{name}.a.zero_point"])
            old_a = (a.astype(np.int64) - zp + 128).astype(np.uint8)  # signed code + 128
            old_w = (w.astype(np.int64) - int(inits[f"{name}.w_zero_point"])).astype(np.int8)
            exact = old_a.astype(np.int64) @ old_w.astype(np.int64)
            saturated_before += int(np.any(u8s8_saturating(old_a, old_w) != exact))
    assert checked == (0 if w_bits == a_bits == 8 else len(layers))  # 2·255·127 > 32767; the others fit
    if w_bits == a_bits == 8:
        assert saturated_before > 0


def _qdq_matmul_graph(left_dtype, right_codes, right_dtype, right_zp):
    """x -> QuantizeLinear(scale 0.1, zero point 0, left_dtype) -> DequantizeLinear, times
    DequantizeLinear(right codes, scale 0.01): a one-product graph."""
    from onnx import TensorProto, helper, numpy_helper
    k, n = right_codes.shape
    inits = [numpy_helper.from_array((right_codes + right_zp).astype(right_dtype), "w"),
             numpy_helper.from_array(np.float32(0.01), "ws"), numpy_helper.from_array(np.array(right_zp, right_dtype), "wz"),
             numpy_helper.from_array(np.float32(0.1), "xs"), numpy_helper.from_array(np.array(0, left_dtype), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"]),
             helper.make_node("MatMul", ["xd", "wd"], ["y"], name="product")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, n])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    return proto


def test_check_integer_products_refuses_a_saturating_encoding():
    codes = np.full((64, 8), 127, np.int64)
    with pytest.raises(ValueError, match=r"product: uint8 x int8 .*can reach \(-?\d+, 64770\).*int16"):
        check_integer_products(_qdq_matmul_graph(np.int8, codes, np.int8, 0))  # int8 left: shifted to 0..255
    with pytest.raises(ValueError, match="saturates"):
        check_integer_products(_qdq_matmul_graph(np.uint8, codes, np.int8, 0))
    assert check_integer_products(_qdq_matmul_graph(np.uint8, codes, np.uint8, 128))["product"]["kernel"] == "u8u8"
    small = check_integer_products(_qdq_matmul_graph(np.uint8, np.full((64, 8), 64, np.int64), np.int8, 0))
    assert small["product"] == {"left": ["uint8", 0, 255], "right": ["int8", 64, 64], "kernel": "u8s8",
                                "pair_sum": [0, 32640]}


needs_qemu = pytest.mark.skipif(qemu() is None, reason="qemu-x86_64 (package qemu-user) on x86-64 emulates an AVX2 CPU")


@needs_qemu
def test_avx2_cpu_gives_the_same_integer_results(tmp_path):
    """onnxruntime on an emulated AVX2 CPU without VNNI (qemu -cpu Haswell) gives the logits it
    gives on this CPU, for a W8A8 (uint8 x uint8) and a W4A4 (uint8 x int8) export; the control,
    a graph relying on a saturating pair, comes out wrong there (so the emulated CPU is one
    whose kernel saturates)."""
    for name, kw, tol in (("w8a8", {}, {}), ("w4a4", dict(w_bits=4, a_bits=4, softmax_unsigned=True),
                                                 dict(min_agree=0.9, max_rel=0.5))):  # see test_4bit_clip_exact_graph
        model = quantized_tiny(**kw)
        x = images(32, seed=11)
        path = tmp_path / f"{name}.onnx"
        export_onnx(model, path)
        native = run_on_cpu(path, x)
        emulated = run_on_cpu(path, x, cpu="Haswell", timeout=300)
        np.testing.assert_array_equal(emulated, native)
        compare(emulated, ms_logits(model, x), **tol)
    control = tmp_path / "control.onnx"
    onnx.save(_qdq_matmul_graph(np.int8, np.full((64, 8), 127, np.int64), np.int8, 0), str(control))
    x = np.full((2, 4, 64), 12.7, np.float32)  # code 127 (shifted to 255) times 127, 64 times
    want = 127 * 127 * 64 * np.float32(0.1 * 0.01)
    np.testing.assert_allclose(run_on_cpu(control, x), want, rtol=1e-5)  # exact with VNNI (this CPU)
    if not np.allclose(run_on_cpu(control, x), want, rtol=1e-5):
        pytest.skip("this CPU saturates too")
    assert not np.allclose(run_on_cpu(control, x, cpu="Haswell", timeout=300), want, rtol=1e-5)


# ----------------------------------------------------------------------------- errors

def _assert_no_file(tmp_path, keep=()):
    assert sorted(os.listdir(tmp_path)) == sorted(keep)


def test_fp_model_is_an_error(tmp_path):
    model = randomize(VisionTransformer(**TINY_CFG), 0)
    with pytest.raises(ValueError, match="not quantized: run quant.py first"):
        export_onnx(model, tmp_path / "x.onnx")
    _assert_no_file(tmp_path)


def test_uncalibrated_is_an_error_and_leaves_no_file(tmp_path):
    model = quantized_tiny(calibrate=False)
    target = tmp_path / "x.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ValueError, match=r"patch_embed.proj: .*1.0 \(not calibrated\)") as err:
        export_onnx(model, target)
    assert "\n" not in str(err.value)
    assert target.read_bytes() == b"previous"  # untouched, and no temporary file left
    _assert_no_file(tmp_path, keep=["x.onnx"])


def test_quantizers_off_is_an_error(tmp_path):
    model = quantized_tiny()
    set_quant_mode(model, "fp")
    with pytest.raises(ValueError, match="quantizer 'w' is off"):
        export_onnx(model, tmp_path / "x.onnx")
    _assert_no_file(tmp_path)


def test_loader_errors(tmp_path, monkeypatch):
    missing = tmp_path / "missing.onnx"
    with pytest.raises(ValueError, match="missing.onnx: no such file; expected an ONNX model"):
        OnnxModel(missing)
    with pytest.raises(ValueError, match="no such file"):
        onnx_model_name(missing)
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \x00\x01")
    with pytest.raises(ValueError, match="bad.onnx: not a readable ONNX model") as err:
        OnnxModel(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="bad.onnx: not a readable ONNX model"):
        onnx_model_name(bad)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ImportError, match="pip install onnxruntime"):
        OnnxModel(bad)


def test_import_does_not_load_onnx():
    code = "import sys; import src.export.onnx; print('onnx' in sys.modules, 'onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
