"""vtptq_plus (src/quant/vtptq_plus.py): the LayerNorm fold, the softmax and post-GELU grids,
the per-channel weight search, config validation, checkpoint round trip, and the pin of the
paper's method (vtptq) on the embedded model.

Tiny random ViT (width 32, depth 1) for the maths; the embedded model for end-to-end runs
(subsets of the test split, see each test)."""
import importlib
import json
import os

import numpy as np
import pytest
from test_vtptq import TINY_CFG, read_json, restore_mode, tiny_images, tiny_vit  # noqa: F401 (autouse fixture)

import mindspore as ms
from mindspore import Tensor

from src.config import ConfigError, defaults
from src.models.vit import VisionTransformer
from src.quant import (calibrate_model, model_size_mb, quant_cells, quantize_model, set_quant_mode, size_breakdown,
                       stored_size_mb)
from src.quant.convert import load_quantized_checkpoint, save_quantized_checkpoint
from src.quant.layers import QuantDense, QuantMatMul
from src.quant.quantizer import (fake_quant_asym_np, fake_quant_log_np, fake_quant_np, grid_levels, log_codes_np,
                                 zero_point)
from src.quant.search import LayerProblem, pearson
from src.quant.vtptq_plus import fold_layernorm, reparam_factors, resolve_switches, search_channels

quant_script = importlib.import_module("quant")
eval_script = importlib.import_module("eval")
ms.set_device("CPU")

def qcfg(**kw):
    cfg = defaults()
    cfg.update(kw)
    resolve_switches(cfg)
    return cfg


def _logits(model, x):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        return model(Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- grids
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("kind", ["log2", "logsqrt2"])
def test_log_grid_levels_and_codes(bits, kind):
    rng = np.random.default_rng(bits)
    x = np.concatenate([rng.dirichlet(np.ones(17), size=200).ravel(), [0.0, 1.0, 1e-12]]).astype(np.float32)
    xh = fake_quant_log_np(x, np.float32(1.0), bits, kind)
    assert len(np.unique(xh)) <= 2 ** bits == grid_levels(bits, kind)
    # the grid: 0 and Δ·2^(-e·k), e = 0 .. 2^b - 2
    k = 1.0 if kind == "log2" else 0.5
    levels = set(np.float32(2.0 ** (-k * np.arange(2 ** bits - 1))).tolist()) | {0.0}
    assert set(xh.tolist()) <= levels
    codes = log_codes_np(x, np.float32(1.0), bits, kind)
    assert codes.min() >= 0 and codes.max() <= 2 ** bits - 1
    back = np.where(codes == 2 ** bits - 1, 0, np.float32(2.0) ** (-k * codes)).astype(np.float32)
    np.testing.assert_array_equal(back, xh)
    assert xh[-3] == 0.0 and xh[-2] == 1.0  # 0 -> the zero code, Δ -> the top level


# ----------------------------------------------------------------------------- levels the Cells produce
def _run_cell(cell, *args):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        return cell(*[Tensor(np.ascontiguousarray(a, np.float32)) for a in args]).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def _sweep(scale, bits):
    """A dense sweep of both signs over 3x the widest grid of `bits` at `scale`, plus a
    geometric one down to 2^-24 of the scale (the small levels of a log grid)."""
    top = 3.0 * 2 ** bits * scale
    geo = np.geomspace(scale * 2.0 ** -24, top, 4001)
    return np.concatenate([np.linspace(-top, top, 60001), geo, -geo, [0.0]]).astype(np.float32)


def activation_levels(cell, op):
    """Distinct values the quantizer of activation operand `op` ('a' or 'b') of a quantized Cell
    produces on a dense sweep, measured through the Cell's own forward pass: a dense layer gets
    every input channel equal to the swept value (one output channel then takes one value per
    level), a matmul gets the other operand equal to one code of its grid."""
    q = getattr(cell, f"{op}_q")
    scale = float(np.max(cell.get_scale(op)))
    x = _sweep(scale, q.bits)
    if isinstance(cell, QuantMatMul):
        other = "b" if op == "a" else "a"
        unit = np.full((1, 1, 1, 1), float(np.max(cell.get_scale(other))), np.float32)  # a code of its grid
        col = x.reshape(1, 1, -1, 1)
        out = _run_cell(cell, col, unit) if op == "a" else _run_cell(cell, unit, col if cell.transpose_b else
                                                                     x.reshape(1, 1, 1, -1))
        return len(np.unique(out))
    if isinstance(cell, QuantDense):
        y = _run_cell(cell, np.repeat(x[:, None], cell.in_channels, axis=1))
    else:  # the patch embedding: every pixel of one patch equal to the swept value
        k = cell.kernel_size[0]
        y = _run_cell(cell, np.broadcast_to(x[:, None, None, None], (len(x), cell.in_channels, k, k)))
        y = y.reshape(len(x), -1)
    col = np.argmax(np.abs(y[-1] - y[0]))  # the output channel that varies most
    return len(np.unique(y[:, col]))


def weight_levels(cell):
    """Distinct values of each output channel's weight as the Cell applies it: the Cell's output
    for one-hot inputs with its activation quantizer off is weight + bias, one row per input
    position. (out channels,) counts."""
    cell.set_quant(act=False)
    try:
        if isinstance(cell, QuantDense):
            y = _run_cell(cell, np.eye(cell.in_channels, dtype=np.float32))
        else:
            k, c = cell.kernel_size[0], cell.in_channels
            y = _run_cell(cell, np.eye(c * k * k, dtype=np.float32).reshape(-1, c, k, k)).reshape(c * k * k, -1)
    finally:
        cell.set_quant(act=True)
    return np.array([len(np.unique(y[:, o])) for o in range(y.shape[1])])


def test_level_probe_counts_what_a_cell_produces():
    """The probes can fail: they count 2^b levels of a b-bit Cell, and 16, not 8, for a Cell
    whose grid is one bit wider than the 3 bits a check would expect."""
    rng = np.random.default_rng(0)
    for bits in (3, 4):
        cell = QuantDense(8, 4, w_bits=bits, a_bits=bits)
        cell.weight.set_data(Tensor(rng.standard_normal((4, 8)).astype(np.float32)))
        cell.set_scale("a", 0.05)
        cell.set_scale("w", float(np.abs(cell.weight.asnumpy()).max()) / (2 ** (bits - 1) - 1) * 0.7)
        cell.set_quant(weight=True, act=True)
        assert activation_levels(cell, "a") == 2 ** bits
        assert weight_levels(cell).max() <= 2 ** bits
    assert activation_levels(cell, "a") == 16 != 8


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asym_grid_levels(bits):
    """The asymmetric post-GELU grid, as QuantDense(asym=True) applies it: exactly 2^b levels on
    a dense sweep, zero among them."""
    cell = QuantDense(4, 2, has_bias=False, w_bits=8, a_bits=bits, asym=True)
    cell.weight.set_data(Tensor(np.ones((2, 4), np.float32)))
    cell.set_scale("w", 1.0)
    scale = 0.8 * 1.17 / (2 ** bits - 1)
    cell.set_scale("a", scale)
    cell.set_zero_point(zero_point(-0.17, scale, bits))
    cell.set_quant(weight=True, act=True)
    assert activation_levels(cell, "a") == 2 ** bits == grid_levels(bits, "asym")
    assert _run_cell(cell, np.zeros((1, 4), np.float32))[0, 0] == 0.0  # zero is on the grid


def test_asym_zero_point_worked_by_hand():
    """Δ = 0.1, 3 bits, minimum -0.17: z = clip(round(1.7), 0, 7) = 2, so the grid is
    (0..7 - 2)·0.1 = -0.2 .. 0.5; -0.17 -> -0.2, 0 -> 0, 0.26 -> 0.3, 1.0 -> 0.5 (clipped)."""
    assert zero_point(-0.17, np.float32(0.1), 3) == 2
    assert zero_point(0.5, np.float32(0.1), 3) == 0  # a positive minimum: zero stays the lowest level
    assert zero_point(-5.0, np.float32(0.1), 3) == 7  # clipped to the grid
    cell = QuantDense(1, 1, has_bias=False, w_bits=8, a_bits=3, asym=True)
    cell.weight.set_data(Tensor(np.ones((1, 1), np.float32)))
    cell.set_scale("w", 1.0)
    cell.set_scale("a", 0.1)
    cell.set_zero_point(2)
    cell.set_quant(weight=True, act=True)
    got = _run_cell(cell, np.array([[-0.17], [0.0], [0.26], [1.0], [-1.0]], np.float32))[:, 0]
    np.testing.assert_allclose(got, [-0.2, 0.0, 0.3, 0.5, -0.2], rtol=0, atol=1e-7)


@pytest.mark.parametrize("kind", ["log2", "logsqrt2"])
def test_quant_matmul_log_grid_matches_numpy(kind):
    rng = np.random.default_rng(1)
    a = rng.dirichlet(np.ones(9), size=(2, 3, 9)).astype(np.float32)
    b = rng.standard_normal((2, 3, 9, 4)).astype(np.float32)
    cell = QuantMatMul(a_bits=4, b_bits=4)
    cell.set_bits("a", 4, signed=False, kind=kind)
    cell.set_scale("a", 0.9)
    cell.set_scale("b", 0.3)
    cell.set_quant(act=True)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        got = cell(Tensor(a), Tensor(b)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    want = np.matmul(fake_quant_log_np(a, np.float32(0.9), 4, kind), fake_quant_np(b, np.float32(0.3), 4, True))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_quant_dense_asym_matches_numpy():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 5, 8)) ** 2 - 0.1).astype(np.float32)
    cell = QuantDense(8, 3, w_bits=4, a_bits=3, asym=True)
    w = cell.weight.asnumpy()
    cell.set_scale("a", 0.4)
    cell.set_scale("w", 0.05)
    cell.set_zero_point(1.0)
    cell.set_quant(weight=True, act=True)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        got = cell(Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    want = fake_quant_asym_np(x, np.float32(0.4), np.float32(1.0), 3) @ fake_quant_np(w, np.float32(0.05), 4, True).T \
        + cell.bias.asnumpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert cell.quant_info()["a"]["kind"] == "asym" and cell.quant_info()["a"]["zero_point"] == 1.0


# ----------------------------------------------------------------------------- LayerNorm fold
@pytest.mark.parametrize("alpha,center", [(1.0, True), (0.5, False), (1.0, False)])
def test_folded_and_unfolded_fp_logits_agree(alpha, center):
    model = tiny_vit()
    x = tiny_images(6)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        model.set_train(False)
        ref = model(Tensor(x)).asnumpy()
        blk = model.blocks[0]
        rng = np.random.default_rng(3)
        for norm, dense in ((blk.norm1, blk.attn.qkv), (blk.norm2, blk.mlp.fc1)):
            act = rng.standard_normal((50, 32)) * np.exp(rng.normal(size=32) * 1.5)  # strongly varying channels
            shift, ratio = reparam_factors(act.astype(np.float32), alpha, center)
            assert ratio.max() / ratio.min() > (2 if alpha else 0)
            fold_layernorm(norm, dense, shift, ratio)
        got = model(Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_attention_fold_keeps_fp_logits():
    """Q·s, K/s and V/t with attn.proj's columns times t leave the FP logits unchanged."""
    from src.quant.vtptq_plus import fold_attention
    model = tiny_vit(seed=3)
    x = tiny_images(6)
    ref = _logits(model, x)
    rng = np.random.default_rng(5)
    attn = model.blocks[0].attn
    shape = (attn.num_heads, 1, attn.head_dim)
    fold_attention(attn, np.exp(rng.normal(size=shape)).astype(np.float32),
                   np.exp(rng.normal(size=shape)).astype(np.float32))
    got = _logits(model, x)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_calibration_fold_keeps_fp_logits_and_saves_them(tmp_path):
    """With ln_reparam the FP function of the calibrated model (quantizers off) is the FP
    model's, and the folded LayerNorm / weights are what the checkpoint holds."""
    model, x = tiny_vit(), tiny_images(8)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ref = model(Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    cfg = qcfg(method="vtptq_plus", w_bits=4, a_bits=4, search_candidates=10, max_rounds=2,
               softmax_quantizer="uniform", gelu_asymmetric=False, weight_channel_search=False, attn_reparam=True)
    gamma0 = model.blocks[0].norm1.gamma.asnumpy().copy()
    quantize_model(model, cfg)
    calibrate_model(model, x, cfg, log=None)
    assert not np.allclose(model.blocks[0].norm1.gamma.asnumpy(), gamma0)  # folded
    set_quant_mode(model, "fp")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        got = model(Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ----------------------------------------------------------------------------- per-channel search
def test_search_channels_never_worse_and_matches_brute_force_objective():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 5, 12)).astype(np.float32)
    w = (rng.standard_normal((7, 12)) * np.exp(rng.normal(size=(7, 1)))).astype(np.float32)
    bias = rng.standard_normal(7).astype(np.float32)
    target = x @ w.T + bias
    problem = LayerProblem(x, w, target, bias=bias)
    current = np.full((7, 1), np.abs(w).max() / 3, np.float32)  # a poor shared interval
    new, before, after = search_channels(problem, x, current, 3, np.linspace(0.5, 1.2, 15))
    assert after >= before

    def objective(scales):
        out = x @ fake_quant_np(w, scales, 3, True).T + bias
        return float(pearson(target.reshape(6, -1), out.reshape(1, 6, -1)).mean())
    assert before == pytest.approx(objective(current), abs=1e-6)
    assert after == pytest.approx(objective(new), abs=1e-6)
    assert after > before + 1e-3


# ----------------------------------------------------------------------------- config
def test_resolve_switches_defaults():
    plus, paper = qcfg(method="vtptq_plus"), qcfg(method="vtptq")
    assert plus["recon_iters"] == 0 and paper["recon_iters"] == 0
    assert [plus[k] for k in ("ln_reparam", "softmax_quantizer", "gelu_asymmetric", "weight_channel_search")] == \
        [True, "auto", True, True] and plus["weight_per_channel"] is True
    assert [paper[k] for k in ("ln_reparam", "softmax_quantizer", "gelu_asymmetric", "weight_channel_search")] == \
        [False, "uniform", False, False] and paper["weight_per_channel"] is False
    with pytest.raises(ConfigError, match="quantize_matmul2"):
        qcfg(method="vtptq_plus", quantize_matmul2=False)
    assert qcfg(method="vtptq_plus", quantize_matmul2=False, softmax_quantizer="uniform")["ln_reparam"] is True


@pytest.mark.parametrize("args,expect", [
    (["--method", "vtptq_plus", "--no-quantize-matmul2"], ["softmax_quantizer", "quantize_matmul2"]),
    (["--method", "vtptq_plus", "--softmax-quantizer", "log2", "--no-quantize-matmul2"], ["'log2'"]),
    (["--method", "vtptq", "--ln-reparam"], ["ln_reparam", "vtptq_plus"]),
    (["--method", "easyquant", "--gelu-asymmetric"], ["gelu_asymmetric", "'easyquant'"]),
    (["--method", "vtptq_plus", "--no-weight-per-channel"], ["weight_channel_search", "weight_per_channel"]),
    (["--method", "vtptq_plus", "--softmax-quantizer", "log3"], ["--softmax-quantizer", "'log3'"]),
    (["--method", "vtptq_plus", "--mixed-precision"], ["mp_criterion", "'paper'", "'vtptq_plus'", "'refined'"]),
    (["--method", "vtptq_plus", "--mixed-precision", "--mp-criterion", "paper"], ["mp_criterion", "'refined'"]),
    (["--method", "easyquant", "--mixed-precision", "--mp-criterion", "refined"], ["mixed_precision", "'easyquant'"]),
])
def test_impossible_combinations_exit_2(args, expect, tmp_path, capsys):
    out = tmp_path / "out"
    rc = quant_script.cli(args + ["--max-images", "10", "--output", str(out)])
    assert rc == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith("error:"), err
    for e in expect:
        assert e in err[0], (e, err[0])
    assert not (out / "result.json").exists()


# ----------------------------------------------------------------------------- sizes
def test_size_breakdown_counts_every_stored_value():
    """size_breakdown on a tiny vtptq_plus model, against a count by hand: packed weight codes,
    float32 parameters, one interval per tensor (one per output channel of a per-channel weight),
    a zero point per asymmetric grid, a byte per quantized operand."""
    model = tiny_vit()
    quantize_model(model, qcfg(method="vtptq_plus", w_bits=3, a_bits=4))
    set_quant_mode(model, "quantized")
    cells = dict(quant_cells(model))
    params = {n: int(np.prod(p.shape)) for n, p in model.parameters_and_names()}
    weights = {f"{n}.weight": c.w_q.bits for n, c in cells.items() if "w" in c.operands}
    want = {"quantized_weights": sum(-(-params[n] * b // 8) for n, b in weights.items()),
            "intervals": 0, "zero_points": 0, "grid_descriptors": 0}
    for name, cell in cells.items():
        for op in cell.operands:
            want["intervals"] += 4 * params[f"{name}.{op}_scale"]
            want["grid_descriptors"] += 1
        if getattr(cell, "asym", False):
            want["zero_points"] += 4
    assert any(params[f"{n}.w_scale"] > 1 for n, c in cells.items() if "w" in c.operands)  # per-channel weights
    want["fp_parameters"] = 4 * sum(v for n, v in params.items() if n not in weights and not n.endswith(
        ("w_scale", "a_scale", "b_scale", "a_zero_point")))
    got = size_breakdown(model)
    assert got == want
    assert stored_size_mb(model) == sum(want.values()) / 1e6
    assert model_size_mb(model) * 1e6 <= want["quantized_weights"] + want["fp_parameters"] < model_size_mb(model) * 1e6 + len(weights)


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def plus_run(tmp_path_factory):
    """vtptq_plus W3A3 on the embedded model, first 500 test images, 20 candidates (speed)."""
    out = tmp_path_factory.mktemp("plus")
    rc = quant_script.cli(["--method", "vtptq_plus", "--w-bits", "3", "--a-bits", "3", "--max-images", "500",
                           "--search-candidates", "20", "--output", str(out)])
    assert rc == 0
    return out, read_json(out / "result.json")


def test_plus_result_records_switches_and_size(plus_run):
    out, res = plus_run
    for key, value in (("ln_reparam", True), ("softmax_quantizer", "auto"), ("gelu_asymmetric", True),
                       ("weight_channel_search", True), ("weight_per_channel", True)):
        assert res[key] == value
        assert f"{key}: {str(value).lower() if isinstance(value, bool) else value}" in (out / "config.yaml").read_text()
    assert res["calib_num"] == 32
    # model_size_mb equals vtptq's at the same bits
    from src.models import create_model
    paper = create_model("deit_fmnist")
    quantize_model(paper, qcfg(method="vtptq", w_bits=3, a_bits=3))
    set_quant_mode(paper, "quantized")
    assert res["model_size_mb"] == model_size_mb(paper)
    # stored_size_mb counts what model_size_mb leaves out: per-channel intervals, zero points, grid kinds
    sizes, paper_sizes = res["size_breakdown"], size_breakdown(paper)
    assert res["stored_size_mb"] == sum(sizes.values()) / 1e6 > res["model_size_mb"]
    assert sizes["quantized_weights"] == paper_sizes["quantized_weights"]
    assert sizes["fp_parameters"] == paper_sizes["fp_parameters"]  # folded LayerNorms replace the FP ones
    fc2 = [n for n in res["layers"] if n.endswith("mlp.fc2")]
    assert sizes["zero_points"] == 4 * len(fc2) and paper_sizes["zero_points"] == 0
    assert sizes["intervals"] > paper_sizes["intervals"] == 4 * paper_sizes["grid_descriptors"]
    kinds = {n: d["a"].get("kind", "uniform") for n, d in res["layers"].items()}
    assert all(kinds[n] == "asym" for n in kinds if n.endswith("fc2"))
    assert all(kinds[n] in ("uniform", "log2", "logsqrt2") for n in kinds if n.endswith("matmul2"))
    assert res["top1"] > 70.0


def test_plus_every_grid_has_at_most_2b_levels(plus_run):
    """Every quantized Cell of the saved W3A3 model, run on dense sweeps: each activation
    quantizer (uniform, asymmetric post-GELU, log2 / log√2 softmax) produces exactly 2^3 = 8
    levels, and each output channel's weight takes at most 8 values."""
    out, res = plus_run
    model, meta = load_quantized_checkpoint(str(out / "quantized.ckpt"))
    set_quant_mode(model, "quantized")
    kinds = set()
    for name, cell in quant_cells(model):
        for op in cell.operands:
            if op == "w":
                counts = weight_levels(cell)
                assert counts.max() <= 8 and counts.max() >= 6, (name, counts.max())
                continue
            q = getattr(cell, f"{op}_q")
            kinds.add(q.kind)
            assert activation_levels(cell, op) == grid_levels(q.bits, q.kind, q.signed) <= 8, (name, op, q.kind)
    assert {"asym", "uniform"} <= kinds and kinds & {"log2", "logsqrt2"}, kinds


def test_eval_reproduces_plus_checkpoint(plus_run, tmp_path):
    out, res = plus_run
    rc = eval_script.cli(["--ckpt", str(out / "quantized.ckpt"), "--max-images", "500", "--output", str(tmp_path)])
    assert rc == 0
    ev = read_json(tmp_path / "result.json")
    assert ev["top1"] == res["top1"] and ev["top5"] == res["top5"]


def test_plus_checkpoint_roundtrip_same_logits(tmp_path):
    """Everything vtptq_plus learns (folded LayerNorm, per-channel intervals, grid kinds, zero
    points, corrected biases) is in quantized.ckpt: the reloaded model gives the same logits."""
    model, x = tiny_vit(), tiny_images(8)
    cfg = qcfg(method="vtptq_plus", w_bits=4, a_bits=4, search_candidates=10, max_rounds=2,
               softmax_quantizer="logsqrt2")
    quantize_model(model, cfg)
    calibrate_model(model, x, cfg, log=None)
    path = str(tmp_path / "q.ckpt")
    save_quantized_checkpoint(model, path, "tiny")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        ref = model(Tensor(x)).asnumpy()
        from src.models import registry
        registry._MODELS["tiny"] = lambda **kw: VisionTransformer(**{**TINY_CFG, **kw})
        try:
            loaded, meta = load_quantized_checkpoint(path)
        finally:
            registry._MODELS.pop("tiny", None)
        got = loaded(Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert meta["layers"]["blocks.0.attn.matmul2"]["a"]["kind"] == "logsqrt2"
    assert meta["layers"]["blocks.0.mlp.fc2"]["a"]["kind"] == "asym"
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_plus_with_every_switch_off_is_vtptq():
    """vtptq_plus with all its switches off calibrates exactly as vtptq."""
    scales = []
    for method, extra in (("vtptq", {}), ("vtptq_plus", dict(ln_reparam=False, softmax_quantizer="uniform",
                                                             gelu_asymmetric=False, weight_channel_search=False,
                                                             recon_iters=0, attn_reparam=False))):
        model = tiny_vit()
        cfg = qcfg(method=method, w_bits=4, a_bits=4, search_candidates=10, max_rounds=3, **extra)
        quantize_model(model, cfg)
        calibrate_model(model, tiny_images(8), cfg, log=None)
        scales.append({n: [c.get_scale(op).tolist() for op in c.operands] for n, c in quant_cells(model)})
    assert scales[0] == scales[1]


# Intervals of `python quant.py --method vtptq --w-bits 4 --a-bits 4` (embedded model, 32
# calibration images, seed 0; top-1 87.38 on all 10,000 test images), from the run before
# vtptq_plus was added (outputs/v44/result.json of that run), operand order a, then w or b.
VTPTQ_W4A4_PIN = "vtptq_w4a4_pin.json"


def test_vtptq_w4a4_pinned(tmp_path):
    """vtptq stays bit-identical: its W4A4 intervals on the embedded model (full calibration,
    100 candidates) equal the pinned ones, and the top-1 on the first 2,000 test images equals
    the pinned run's (the full 10,000-image evaluation is left out for time; the intervals fix
    the model, and 87.38 on all images follows from them)."""
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), VTPTQ_W4A4_PIN), encoding="utf-8") as f:
        pin = json.load(f)
    out = tmp_path / "v44"
    rc = quant_script.cli(["--method", "vtptq", "--w-bits", "4", "--a-bits", "4", "--max-images", "2000",
                           "--output", str(out)])
    assert rc == 0
    res = read_json(out / "result.json")
    got = {n: {op: d[op]["scale"] for op in ("a", "b", "w") if op in d} for n, d in res["layers"].items()}
    assert got.keys() == pin["scales"].keys()
    for name, ops in pin["scales"].items():
        for op, value in ops.items():
            np.testing.assert_allclose(got[name][op], value, rtol=1e-6, err_msg=f"{name}.{op}")
    assert res["top1"] == pin["top1_first_2000"]
    assert res["model_size_mb"] == pin["model_size_mb"]


# ----------------------------------------------------------------------------- export
INTEGER_OPS = {"MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul"}


@pytest.fixture(scope="module")
def tiny_plus():
    """Tiny ViT (depth 1) quantized by vtptq_plus at W4A4 (log√2 softmax, 10 candidates)."""
    model = tiny_vit(seed=5)
    model.model_name = "tiny_vit"
    cfg = qcfg(method="vtptq_plus", w_bits=4, a_bits=4, search_candidates=10, max_rounds=2,
               softmax_quantizer="logsqrt2", recon_iters=50)
    quantize_model(model, cfg)
    calibrate_model(model, tiny_images(32, seed=7), cfg, log=None)
    set_quant_mode(model, "quantized")
    model.set_train(False)
    return model


def test_onnx_export_of_plus(tiny_plus, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    from src.export.onnx import export_onnx
    x = tiny_images(32, seed=9)
    ref = _logits(tiny_plus, x)
    path = tmp_path / "plus.onnx"
    export_onnx(tiny_plus, path)
    scale = np.abs(ref).max()
    for level in (ort.GraphOptimizationLevel.ORT_DISABLE_ALL, ort.GraphOptimizationLevel.ORT_ENABLE_ALL):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = level
        if level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL:
            opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
        got = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
        diff = np.abs(got - ref).max(axis=1)
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.9
        assert np.median(diff) <= 0.05 * scale
    ops = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    # every quantized product but attn·V (log√2 softmax: float ops) runs as an integer kernel
    assert sum(op in INTEGER_OPS for op in ops) == len(quant_cells(tiny_plus)) - 1
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}
    fc2 = dict(quant_cells(tiny_plus))["blocks.0.mlp.fc2"]
    assert inits["blocks.0.mlp.fc2.a.zero_point"].dtype == np.uint8
    assert int(inits["blocks.0.mlp.fc2.a.zero_point"]) == int(fc2.a_zero_point.asnumpy()[0])


def test_mindir_export_of_plus(tiny_plus, tmp_path):
    from mindspore import nn
    from src.export.mindir import export_mindir
    x = tiny_images(4, seed=11)
    ref = _logits(tiny_plus, x)
    path = str(tmp_path / "plus.mindir")
    export_mindir(tiny_plus, path, 4)
    got = nn.GraphCell(ms.load(path))(Tensor(x)).asnumpy()
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
