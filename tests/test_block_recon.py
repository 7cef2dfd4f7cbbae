"""Block-wise reconstruction (src/quant/block_recon.py, vtptq_plus's block_recon_iters): the
numpy block gives the MindSpore block's output, its backward pass the finite differences of
its forward, and reconstruction lowers the block's error with weights on their grids.

Tiny random ViT (width 32, depth 1), calibrated by vtptq_plus at W4A4 with every grid kind the
block can hold (log√2 softmax, asymmetric post-GELU grid, per-channel weights)."""
import numpy as np
import pytest
from test_vtptq import restore_mode, tiny_images, tiny_vit  # noqa: F401 (autouse fixture)

import mindspore as ms

from src.config import ConfigError, defaults
from src.quant import calibrate_model, quantize_model
from src.quant.block_recon import DENSE, BlockModel, reconstruct_block, soft_weight
from src.quant.calibrate import run_stage
from src.quant.vtptq_plus import resolve_switches


def qcfg(**kw):
    cfg = defaults()
    cfg.update(kw)
    resolve_switches(cfg)
    return cfg


def _calibrated(**kw):
    model = tiny_vit(seed=5)
    model.model_name = "tiny_vit"
    cfg = qcfg(method="vtptq_plus", w_bits=4, a_bits=4, search_candidates=10, max_rounds=2,
               softmax_quantizer="logsqrt2", **kw)
    quantize_model(model, cfg)
    report = calibrate_model(model, tiny_images(32, seed=7), cfg, log=None)
    return model, report


def _block_io(model, n=16):
    """(block input through the quantized embedding, the quantized block's MindSpore output)."""
    prev = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        x = run_stage(model.embed, tiny_images(n, seed=11), n)[0]
        return x, run_stage(model.blocks[0], x, n)[0]
    finally:
        ms.set_context(mode=prev)


@pytest.fixture(scope="module")
def calibrated():
    return _calibrated()


def _weights(model_np):
    return dict(model_np.fixed, **{k: soft_weight(model_np.cells[k]).nearest_weight() for k in model_np.learned})


def test_numpy_block_is_the_mindspore_block(calibrated):
    model, _ = calibrated
    blk = model.blocks[0]
    assert blk.mlp.fc2.a_q.kind == "asym" and blk.attn.matmul2.a_q.kind == "logsqrt2" and blk.attn.qkv.per_channel
    x, expect = _block_io(model)
    bm = BlockModel(blk)
    assert sorted(bm.learned) == sorted(DENSE) and all(q.on for q in bm.act.values())
    got, _ = bm.forward(x, _weights(bm))
    err = np.abs(got - expect)
    # the same operations in float32; a value on a rounding boundary of a 4-bit grid may round the
    # other way after a last-bit difference of a product, so allow a few such elements
    assert np.mean(err > 1e-4 * np.abs(expect).max()) < 0.002, err.max()
    assert np.median(err) < 1e-6 * np.abs(expect).max()


def test_block_backward_is_the_gradient_of_forward(calibrated):
    model, _ = calibrated
    bm = BlockModel(model.blocks[0])
    for q in list(bm.act.values()) + list(bm.m1) + list(bm.m2):
        q.on = False  # no quantizer: the forward is smooth, so finite differences apply
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 17, 32))
    w = {k: v.astype(np.float64) for k, v in _weights(bm).items()}
    r = rng.standard_normal((3, 17, 32))
    out, cache = bm.forward(x, w, grads=True)
    grads = bm.backward(r, w, cache)
    eps = 1e-3
    for k in DENSE:
        d = rng.standard_normal(w[k].shape)
        plus, _ = bm.forward(x, dict(w, **{k: w[k] + eps * d}))
        minus, _ = bm.forward(x, dict(w, **{k: w[k] - eps * d}))
        numeric = float(((plus - minus) * r).sum() / (2 * eps))
        analytic = float((grads[k] * d).sum())
        assert grads[k].shape == w[k].shape
        assert abs(numeric - analytic) <= 2e-3 * abs(numeric) + 1e-4, (k, numeric, analytic)


def test_reconstruction_lowers_the_block_error_with_weights_on_their_grids():
    model, _ = _calibrated()
    blk = model.blocks[0]
    x, _ = _block_io(model)
    prev = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        cells = [blk.attn.qkv, blk.attn.proj, blk.mlp.fc1, blk.mlp.fc2, blk.attn.matmul1, blk.attn.matmul2]
        for c in cells:
            c.set_quant(weight=False, act=False)
        target = run_stage(blk, x, len(x))[0]
        for c in cells:
            c.set_quant(weight=True, act=True)
        before = BlockModel(blk)
        err_nearest = float(np.square(before.forward(x, _weights(before))[0] - target).sum())
        info = reconstruct_block(blk, x, target, iters=60, holdout=0, qdrop=0)
        assert info["kept"] and 0 < info["mse_ratio"] < 1
        assert any(v > 0 for v in info["changed_from_nearest"].values())
        for name in DENSE:
            cell = dict(qkv=blk.attn.qkv, proj=blk.attn.proj, fc1=blk.mlp.fc1, fc2=blk.mlp.fc2)[name.split(".")[1]]
            scale = np.broadcast_to(cell.get_scale("w").reshape(-1, 1), (cell.weight_q.shape[0], 1))
            codes = np.round(cell.weight_q / scale)
            assert np.allclose(codes * scale, cell.weight_q, rtol=1e-6, atol=0)
            assert codes.min() >= cell.w_q.qmin and codes.max() <= cell.w_q.qmax
            # each code is the floor or the ceiling of the FP weight's position on the grid (clipped)
            ratio = cell._fp_weight / scale
            assert np.all((codes == np.floor(ratio)) | (codes == np.floor(ratio) + 1)
                          | (codes == np.clip(np.round(ratio), cell.w_q.qmin, cell.w_q.qmax)))
        out = run_stage(blk, x, len(x))[0]  # MindSpore, with the learned weights set on the cells
        assert float(np.square(out - target).sum()) == pytest.approx(info["mse_ratio"] * err_nearest, rel=0.02)
    finally:
        ms.set_context(mode=prev)


def test_block_recon_is_a_switch_of_vtptq_plus_only():
    # off by default in both methods (val chose it, docs/results.md); vtptq_plus takes a value
    assert [qcfg(method="vtptq_plus", w_bits=b, a_bits=b)["block_recon_iters"] for b in (8, 4, 3)] == [0, 0, 0]
    assert qcfg(method="vtptq_plus", w_bits=3, a_bits=3, block_recon_iters=300)["block_recon_iters"] == 300
    assert qcfg(method="vtptq", w_bits=3, a_bits=3)["block_recon_iters"] == 0
    with pytest.raises(ConfigError, match="block_recon_iters"):
        qcfg(method="vtptq", block_recon_iters=10)


def test_calibration_reports_block_reconstruction():
    model, report = _calibrated(block_recon_iters=20)
    info = report["blocks.0.mlp.fc2"]["block_reconstruction"]
    assert info["iters"] == 20 and info["mse_ratio"] > 0 and "seconds" in info
    assert info["held_out_images"] == 8 and info["qdrop"] == 0.5  # the defaults: 1/4 of 32 images held out
    assert report["blocks.0.attn.qkv"]["block_reconstruction"] is info
    if info["kept"]:
        assert model.blocks[0].mlp.fc2.weight_q is not None
