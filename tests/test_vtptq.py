"""The paper's method (vtptq): Pearson / cosine objectives, the ranking-aware loss and its pair
sampling, bias correction, the alternating search's early stop, the mixed-precision knapsack
(against brute force), size units, the nuclear norm, calibration determinism, and quant.py end
to end on the embedded model (W8A8 and 4MP mixed precision).

Kept fast: numpy-only unit tests on tiny arrays, a tiny random ViT (width 32, depth 1) for the
MindSpore paths, and two small embedded runs (~15 s each on 2 CPU cores).
"""
import importlib
import io
import itertools
import json
import math
import os
import sys

import numpy as np
from _helpers import randomize
import pytest

import mindspore as ms

from src.config import defaults
from src.models.vit import VisionTransformer
from src.quant import calibrate_model, layer_report, quant_cells, quantize_model
from src.quant import mixed_precision as mp
from src.quant import search, vtptq
from src.quant.layers import QuantDense
from src.quant.quantizer import fake_quant_np
from src.quant.search import LayerProblem, cosine, pearson
from src.quant.vtptq import VTPTQ, bias_correction, ranking_loss, sample_pairs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
quant_script = importlib.import_module("quant")

# quant.py calls mindspore.set_device('CPU'), which MindSpore refuses once a kernel has run
# unless it was called before: call it now (at collection), so that this file also runs alone.
ms.set_device("CPU")

TINY_CFG = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)


@pytest.fixture(scope="module", autouse=True)
def restore_mode():
    """quant.py sets MindSpore's global mode; give the other test files theirs back.

    GRAPH mode is set before this file's first kernel runs: in a process whose first kernels ran
    in MindSpore's default PYNATIVE mode, the later PYNATIVE calibration passes ran about twice
    as slow here (MindSpore 2.x on CPU), which doubled this file's runtime."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    yield
    ms.set_context(mode=mode)


def qcfg(**kw):
    cfg = defaults()
    cfg.update(kw)
    return cfg


def tiny_vit(seed=0):
    """The tiny ViT with seeded random weights of a useful scale (set from numpy, so two calls
    with the same seed give the same weights whatever MindSpore's own RNG state)."""
    return randomize(VisionTransformer(**TINY_CFG), seed)


def tiny_images(n=8, seed=1):
    return np.random.default_rng(seed).standard_normal((n, 1, 28, 28)).astype(np.float32)


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ----------------------------------------------------------------------------- objectives

def test_pearson_hand_computed():
    t = np.array([[1.0, 2.0, 3.0]])
    assert pearson(t, np.array([[2.0, 4.0, 6.0]]))[0] == pytest.approx(1.0, abs=1e-12)
    assert pearson(t, np.array([[3.0, 2.0, 1.0]]))[0] == pytest.approx(-1.0, abs=1e-12)
    # centred target [-1, 0, 1], centred out [-1, 1, 0]: dot 1, norms √2·√2 = 2 -> 0.5
    assert pearson(t, np.array([[1.0, 3.0, 2.0]]))[0] == pytest.approx(0.5, abs=1e-12)
    # centred target [-1.5, -0.5, 0.5, 1.5], out [0, 0, 1, 0] centred [-.25, -.25, .75, -.25]:
    # dot 0.375+0.125+0.375-0.375 = 0.5; |t| = √5, |o| = √0.75 -> 0.5 / √3.75
    got = pearson(np.array([[1.0, 2.0, 3.0, 4.0]]), np.array([[0.0, 0.0, 1.0, 0.0]]))[0]
    assert got == pytest.approx(0.5 / math.sqrt(3.75), abs=1e-12)
    # a constant output has no correlation (guarded denominator, not NaN)
    assert pearson(t, np.array([[5.0, 5.0, 5.0]]))[0] == 0.0


def test_cosine_hand_computed():
    t = np.array([[1.0, 2.0, 3.0]])
    assert cosine(t, np.array([[2.0, 4.0, 6.0]]))[0] == pytest.approx(1.0, abs=1e-12)
    # dot 1+6+6 = 13, norms √14·√14 = 14
    assert cosine(t, np.array([[1.0, 3.0, 2.0]]))[0] == pytest.approx(13 / 14, abs=1e-12)
    assert cosine(np.array([[1.0, 0.0]]), np.array([[1.0, 1.0]]))[0] == pytest.approx(1 / math.sqrt(2), abs=1e-12)
    assert cosine(np.array([[1.0, 0.0]]), np.array([[-2.0, 0.0]]))[0] == pytest.approx(-1.0, abs=1e-12)
    # cosine is not shift invariant, unlike Pearson
    assert cosine(t, t + 10)[0] < 1 - 1e-3


def test_pearson_invariances_and_shapes():
    rng = np.random.default_rng(0)
    target = rng.standard_normal((5, 12))
    out = target + 0.3 * rng.standard_normal((5, 12))
    base = pearson(target, out)
    assert base.shape == (5,)
    np.testing.assert_allclose(pearson(target, out + 7.5), base, atol=1e-12)
    np.testing.assert_allclose(pearson(target, 3.2 * out), base, atol=1e-12)
    np.testing.assert_allclose(pearson(target, 0.5 * out - 2.0), base, atol=1e-12)
    np.testing.assert_allclose(pearson(target, -out), -base, atol=1e-12)
    # a leading candidate axis: (c, n, M) -> (c, n), each candidate as if alone
    stack = np.stack([out, out + 1, 2 * target])
    got = pearson(target, stack)
    assert got.shape == (3, 5)
    np.testing.assert_allclose(got[0], base, atol=1e-12)
    np.testing.assert_allclose(got[1], base, atol=1e-12)
    np.testing.assert_allclose(got[2], 1.0, atol=1e-12)
    # per sample, against numpy's corrcoef
    for i in range(5):
        assert base[i] == pytest.approx(np.corrcoef(target[i], out[i])[0, 1], abs=1e-12)


# ----------------------------------------------------------------------------- ranking loss

def test_ranking_loss_hand_computed_with_tie():
    a = np.array([[3.0, 1.0, 1.0, 2.0]])       # FP scores, one row (n=1, T=4); a1 == a2 is a tie
    q = np.array([[1.6, 1.5, 1.3, 1.8]])       # quantized scores
    # pairs i<j, hinge = max(0, θ - (q_i - q_j)·sign(a_i - a_j)), θ = 0.2:
    # (0,1): sign +1, q diff  0.1 -> 0.2 - 0.1 = 0.1
    # (0,2): sign +1, q diff  0.3 -> max(0, -0.1) = 0
    # (0,3): sign +1, q diff -0.2 -> 0.2 + 0.2 = 0.4   (order violated)
    # (1,2): sign  0 (tie)        -> 0.2 = θ
    # (1,3): sign -1, q diff -0.3 -> max(0, 0.2 - 0.3) = 0
    # (2,3): sign -1, q diff -0.5 -> max(0, 0.2 - 0.5) = 0
    # mean over the 6 pairs: 0.7 / 6
    expect = 0.7 / 6
    got = ranking_loss(a, q, theta=0.2)
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expect, abs=1e-12)
    # with a candidate axis (c=1, n=1, T)
    got_c = ranking_loss(a, q[None], theta=0.2)
    assert got_c.shape == (1, 1)
    assert got_c[0, 0] == pytest.approx(expect, abs=1e-12)
    # a different margin: θ = 0.5 -> (0,1) 0.4, (0,2) 0.2, (0,3) 0.7, (1,2) 0.5, (1,3) 0.2, (2,3) 0
    assert ranking_loss(a, q, theta=0.5)[0] == pytest.approx(2.0 / 6, abs=1e-12)


def test_ranking_loss_all_ties_is_theta():
    a = np.zeros((1, 5))
    q = np.random.default_rng(0).standard_normal((1, 5))
    assert ranking_loss(a, q, theta=0.2)[0] == pytest.approx(0.2, abs=1e-12)


def test_ranking_loss_zero_when_order_kept_and_swap_positive():
    rng = np.random.default_rng(3)
    a = rng.permutation(8).astype(np.float64)[None] * 0.37 - 1.0    # distinct FP scores, shuffled order
    ranks = np.argsort(np.argsort(a[0]))
    q = (0.25 * ranks + 5.0)[None]                                   # same order, every gap >= 0.25 > θ
    assert ranking_loss(a, q, theta=0.2)[0] == 0.0
    assert ranking_loss(a, 2.0 * a, theta=0.2)[0] == 0.0            # gaps 0.74 >= θ
    # swap the entries of the largest and smallest FP score: those pairs now violate the order
    hi, lo = int(np.argmax(a[0])), int(np.argmin(a[0]))
    q_swapped = q.copy()
    q_swapped[0, [hi, lo]] = q_swapped[0, [lo, hi]]
    assert ranking_loss(a, q_swapped, theta=0.2)[0] > 0.0
    # the order kept but gaps below θ: a positive loss too
    assert ranking_loss(a, 0.1 * q, theta=0.2)[0] > 0.0


def _ranking_loss_loops(a, q, theta, pairs):
    """Brute force for one candidate: a, q (n, H, T, T) -> (n,)."""
    n, h, t, _ = a.shape
    out = np.zeros(n)
    for s in range(n):
        total = 0.0
        for hh in range(h):
            for k in range(t):
                for i, j in zip(*pairs):
                    total += max(0.0, theta - (q[s, hh, k, i] - q[s, hh, k, j]) * np.sign(a[s, hh, k, i] - a[s, hh, k, j]))
        out[s] = total / (h * t * len(pairs[0]))
    return out


@pytest.mark.parametrize("num_pairs", [0, 7])
def test_ranking_loss_candidate_axis_equals_loop(num_pairs, monkeypatch):
    rng = np.random.default_rng(1)
    n, h, t, c = 3, 2, 5, 4
    a = rng.standard_normal((n, h, t, t))
    q = a[None] + 0.3 * rng.standard_normal((c, n, h, t, t))
    pairs = sample_pairs(t, num_pairs, seed=0)
    got = ranking_loss(a, q, theta=0.2, pairs=pairs if num_pairs else None)
    assert got.shape == (c, n)
    for k in range(c):
        np.testing.assert_allclose(got[k], ranking_loss(a, q[k], theta=0.2, pairs=pairs), atol=1e-12)
        np.testing.assert_allclose(got[k], _ranking_loss_loops(a, q[k], 0.2, pairs), atol=1e-12)
    # row chunking (one row at a time) does not change the result
    monkeypatch.setattr(vtptq, "ROW_CHUNK_ELEMS", 1)
    np.testing.assert_allclose(ranking_loss(a, q, theta=0.2, pairs=pairs), got, atol=1e-12)


def test_sample_pairs():
    t = 6
    all_i, all_j = np.triu_indices(t, k=1)
    assert len(all_i) == 15
    for num in (0, 15, 16, 100):
        i, j = sample_pairs(t, num)
        np.testing.assert_array_equal(i, all_i)
        np.testing.assert_array_equal(j, all_j)
    i, j = sample_pairs(t, 5, seed=0)
    assert len(i) == len(j) == 5
    assert np.all(i < j)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert len(pairs) == 5 and pairs <= set(zip(all_i.tolist(), all_j.tolist()))
    i2, j2 = sample_pairs(t, 5, seed=0)   # fixed: the same sample every call
    np.testing.assert_array_equal(i, i2)
    np.testing.assert_array_equal(j, j2)
    others = [set(zip(*(x.tolist() for x in sample_pairs(t, 5, seed=s)))) for s in range(1, 6)]
    assert any(o != pairs for o in others)  # the seed matters


# ----------------------------------------------------------------------------- bias correction

def _dense_problem(seed=0, n=6, t=5, k=8, o=4, offset=None, x_mean=0.0):
    rng = np.random.default_rng(seed)
    x = (x_mean + rng.standard_normal((n, t, k))).astype(np.float32)
    w = (rng.standard_normal((o, k)) / math.sqrt(k)).astype(np.float32)
    b = (0.1 * rng.standard_normal(o)).astype(np.float32)
    target = (x @ w.T + b).astype(np.float32)
    bias = b if offset is None else (b + offset).astype(np.float32)
    return LayerProblem(x, w, target, bias=bias.copy()), x, w, b


@pytest.mark.parametrize("chunked", [False, True])
def test_bias_correction_removes_planted_offset(chunked, monkeypatch):
    offset = np.array([0.5, -1.25, 0.0, 2.0], np.float32)
    problem, x, w, b = _dense_problem(offset=offset)
    if chunked:  # two samples per chunk: the accumulation over chunks
        monkeypatch.setattr(search, "CHUNK_ELEMS", 2 * problem.out_elems)
        assert len(list(problem.sample_chunks(1))) == 3
    corr = bias_correction(problem, x, problem.b_right)   # operands unquantized: the error is the offset
    assert corr.shape == (4,) and corr.dtype == np.float32
    np.testing.assert_allclose(corr, offset, atol=1e-5)
    problem.bias = problem.bias - corr
    err = (problem.forward(x, problem.b_right) - problem.target).reshape(-1, 4).mean(axis=0)
    np.testing.assert_allclose(err, 0.0, atol=1e-5)
    # with both operands quantized: the returned value is E[Ô - O] per channel, and subtracting it
    # leaves no mean error per channel
    problem.bias = (b + offset).astype(np.float32)
    a_hat = fake_quant_np(x, np.float32(np.abs(x).max() / 7), 4)
    b_hat = fake_quant_np(problem.b_right, np.float32(np.abs(w).max() / 7), 4)
    expect = (problem.forward(a_hat, b_hat) - problem.target).reshape(-1, 4).mean(axis=0)
    corr = bias_correction(problem, a_hat, b_hat)
    np.testing.assert_allclose(corr, expect, atol=1e-5)
    problem.bias = problem.bias - corr
    err = (problem.forward(a_hat, b_hat) - problem.target).reshape(-1, 4).mean(axis=0)
    np.testing.assert_allclose(err, 0.0, atol=1e-5)


def _run_vtptq(problem, **kw):
    cfg = qcfg(**{"method": "vtptq", "search_candidates": 20, **kw})
    cell = QuantDense(problem.a.shape[-1], problem.b.shape[0], w_bits=cfg["w_bits"], a_bits=cfg["a_bits"])
    sa, sb, info = VTPTQ(cfg).calibrate(cell, problem)
    return sa, sb, info, cell


def _mean_channel_error(problem, sa, sb, cell):
    a_hat = fake_quant_np(problem.a, sa, cell.a_q.bits, cell.a_q.signed)
    b_hat = fake_quant_np(problem.b_right, problem.right_scale(sb), cell.w_q.bits, cell.w_q.signed)
    out = problem.forward(a_hat, b_hat)
    return (out - problem.target).reshape(-1, out.shape[-1]).mean(axis=0)


def test_vtptq_bias_correction_end_to_end():
    offset = np.array([0.3, -0.4, 0.2, -0.3], np.float32)
    runs = {}
    for on in (True, False):
        problem, x, w, b = _dense_problem(seed=2, n=16, t=9, offset=offset)
        sa, sb, info, cell = _run_vtptq(problem, w_bits=4, a_bits=4, max_rounds=6, bias_correction=on)
        runs[on] = (problem.bias.copy(), np.abs(_mean_channel_error(problem, sa, sb, cell)), info)
    bias_on, err_on, info_on = runs[True]
    bias_off, err_off, _ = runs[False]
    np.testing.assert_array_equal(bias_off, b + offset)   # untouched without correction
    assert np.abs(bias_on - bias_off).max() > 0.05          # the correction changed the bias
    assert info_on["rounds"] >= 2                            # a corrected round was kept
    assert err_on.mean() < 0.5 * err_off.mean()
    assert err_on.max() < err_off.max()


# ----------------------------------------------------------------------------- early stop

def _check_history(info, max_rounds):
    hist = info["objective"]
    assert info["rounds"] == len(hist) - 1
    assert 1 <= info["rounds"] <= max_rounds
    assert len(hist) <= max_rounds + 1
    # every kept round improved strictly on the one before; a stop is a round that did not
    assert all(b > a for a, b in zip(hist[:-2], hist[1:-1]))
    if info["rounds"] < max_rounds:  # stopped early: the last round did not improve
        assert hist[-1] <= max(hist[:-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vtptq_stops_when_objective_stops_improving(seed):
    problem, *_ = _dense_problem(seed=seed, n=8, t=7, k=16, o=8)
    _, _, info, _ = _run_vtptq(problem, w_bits=4, a_bits=4, max_rounds=20)
    _check_history(info, 20)
    assert info["rounds"] < 20


def test_vtptq_single_candidate_stops_at_once():
    # one candidate (α = β = 1: the max-based interval): nothing can improve after the first
    # round (a round identical to the one before it is no improvement), whatever max_rounds
    problem, *_ = _dense_problem(seed=4, n=8, t=7, k=16, o=8)
    problem.bias = None
    _, _, info, _ = _run_vtptq(problem, w_bits=4, a_bits=4, max_rounds=20, search_alpha=1.0, search_beta=1.0,
                               search_candidates=1)
    _check_history(info, 20)
    assert info["rounds"] <= 2


def test_vtptq_max_rounds_caps_history():
    problem, *_ = _dense_problem(seed=5, n=8, t=7, k=16, o=8)
    _, _, info, _ = _run_vtptq(problem, w_bits=3, a_bits=3, max_rounds=1)
    assert len(info["objective"]) == 2 and info["rounds"] == 1


# ----------------------------------------------------------------------------- knapsack, size units

def _brute_force(costs, omegas, capacity):
    best = None
    for picks in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[m][k] for m, k in enumerate(picks))
        if cost > capacity:
            continue
        om = sum(omegas[m][k] for m, k in enumerate(picks))
        if best is None or om < best:
            best = om
    return best


@pytest.mark.parametrize("seed", range(12))
def test_knapsack_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    m, k = int(rng.integers(2, 6)), int(rng.integers(2, 4))
    costs = rng.integers(0, 9, (m, k))
    omegas = rng.random((m, k))
    capacity = int(rng.integers(0, costs.sum(axis=0).max() + 2))
    expect = _brute_force(costs.tolist(), omegas.tolist(), capacity)
    picks = mp.knapsack(costs, omegas, capacity)
    if expect is None:
        assert picks is None
        return
    assert picks is not None and len(picks) == m
    assert sum(costs[i][p] for i, p in enumerate(picks)) <= capacity
    assert sum(omegas[i][p] for i, p in enumerate(picks)) == pytest.approx(expect, abs=1e-12)


def test_knapsack_bit_widths_case():
    # 4 modules, bits (2, 4, 6), Ω falling with bits; budget = every module at 4 bits
    params = [3, 1, 2, 2]
    bits = (2, 4, 6)
    costs = [[p * b for b in bits] for p in params]
    omegas = [[9.0, 3.0, 1.0], [50.0, 10.0, 0.5], [4.0, 2.0, 1.5], [8.0, 2.0, 0.2]]
    capacity = sum(params) * 4
    picks = mp.knapsack(costs, omegas, capacity)
    assert sum(costs[i][p] for i, p in enumerate(picks)) <= capacity
    assert sum(omegas[i][p] for i, p in enumerate(picks)) == pytest.approx(_brute_force(costs, omegas, capacity))
    assert mp.knapsack(costs, omegas, 10**6) == [2, 2, 2, 2]      # everything fits: the widest
    assert mp.knapsack(costs, omegas, sum(params) * 2) == [0, 0, 0, 0]  # only the narrowest fits


def test_knapsack_none_when_nothing_fits():
    assert mp.knapsack([[5, 6], [3, 4]], [[1.0, 0.5], [1.0, 0.5]], 7) is None
    assert mp.knapsack([[5, 6]], [[1.0, 0.5]], 4) is None
    assert mp.knapsack([[5, 6]], [[1.0, 0.5]], 5) == [0]


def test_size_units_exact():
    params, bits = [6, 9, 12], (2, 3, 4, 5, 6)
    costs, capacity = mp.size_units(params, bits, 4)        # gcd 3
    assert costs == [[2 * b for b in bits], [3 * b for b in bits], [4 * b for b in bits]]
    assert capacity == (2 + 3 + 4) * 4
    # the uniform nominal assignment fits exactly
    assert sum(c[bits.index(4)] for c in costs) == capacity


def test_size_units_coarsened_never_exceeds_budget():
    params = [1_000_003, 2_000_017, 1_500_011, 999_983]       # gcd 1: far more than MAX_DP_UNITS units
    bits, nominal = (2, 3, 4, 5, 6), 4
    costs, capacity = mp.size_units(params, bits, nominal)
    assert capacity <= mp.MAX_DP_UNITS
    budget = sum(params) * nominal
    fits = 0
    for picks in itertools.product(range(len(bits)), repeat=len(params)):
        if sum(costs[m][k] for m, k in enumerate(picks)) <= capacity:
            fits += 1
            assert sum(p * bits[k] for p, k in zip(params, picks)) <= budget
    assert fits > 1
    rng = np.random.default_rng(0)
    for _ in range(5):
        omegas = rng.random((len(params), len(bits)))
        picks = mp.knapsack(costs, omegas, capacity)
        assert picks is not None
        assert sum(p * bits[k] for p, k in zip(params, picks)) <= budget


# ----------------------------------------------------------------------------- nuclear norm

def test_nuclear_norm():
    d = np.diag([3.0, -2.0, 0.5])
    np.testing.assert_allclose(mp.nuclear_norm(d[None]), [5.5])
    rng = np.random.default_rng(0)
    y = rng.standard_normal((3, 2, 4, 5))                    # (n, heads, R, C): summed over heads
    expect = [sum(np.linalg.svd(y[i, h], compute_uv=False).sum() for h in range(2)) for i in range(3)]
    np.testing.assert_allclose(mp.nuclear_norm(y), expect, rtol=1e-10)
    y2 = rng.standard_normal((2, 6, 3))
    np.testing.assert_allclose(mp.nuclear_norm(y2), [np.linalg.norm(m, "nuc") for m in y2], rtol=1e-10)


# ----------------------------------------------------------------------------- MindSpore paths

def _quantized_tiny(**kw):
    model = tiny_vit(0)
    cfg = qcfg(**{"method": "vtptq", "w_bits": 4, "a_bits": 4, "search_candidates": 20, "max_rounds": 3, **kw})
    quantize_model(model, cfg)
    return model, cfg


def test_vtptq_calibration_is_deterministic():
    x = tiny_images(8)
    reports, biases, infos = [], [], []
    for _ in range(2):
        model, cfg = _quantized_tiny()
        infos.append(calibrate_model(model, x, cfg, log=io.StringIO()))
        reports.append(layer_report(model))
        biases.append({n: c.bias.asnumpy().copy() for n, c in quant_cells(model) if getattr(c, "has_bias", False)})
    assert reports[0] == reports[1]
    for n in biases[0]:
        np.testing.assert_array_equal(biases[0][n], biases[1][n])
    assert {n: i["objective"] for n, i in infos[0].items()} == {n: i["objective"] for n, i in infos[1].items()}
    for n, info in infos[0].items():
        _check_history(info, 3)


def test_search_bits_leaves_fp_biases_and_omega_falls_with_bits():
    model, cfg = _quantized_tiny(mp_target="4MP", search_candidates=10, max_rounds=2)
    before = {n: c.bias.asnumpy().copy() for n, c in quant_cells(model) if getattr(c, "has_bias", False)}
    report = mp.search_bits(model, tiny_images(8), cfg, log=io.StringIO())
    # the search's bias corrections must not leak into the FP network it measures against
    for n, c in quant_cells(model):
        if n in before:
            np.testing.assert_array_equal(c.bias.asnumpy(), before[n])
    assert set(report["modules"]) == {"blocks.0.attn", "blocks.0.mlp"}
    for name, om in report["omega"].items():
        assert om["6"] < om["4"] < om["2"]
    assert all(b in (2, 3, 4, 5, 6) for b in report["modules"].values())
    p = report["params"]
    assert sum(p[n] * b for n, b in report["modules"].items()) <= 4 * sum(p.values())


# ----------------------------------------------------------------------------- quant.py end to end

def test_embedded_mixed_precision_4mp(tmp_path):
    # small on purpose (~15 s): 8 calibration images, 10 candidates, 2 rounds, 200 images
    out = tmp_path / "mp"
    cfg = qcfg(method="vtptq", mixed_precision=True, mp_target="4MP", calib_num=8, search_candidates=10,
               max_rounds=2, max_images=200, output=str(out))
    res = quant_script.main(cfg)
    saved = read_json(out / "result.json")
    assert saved["model_size_mb"] == pytest.approx(res["model_size_mb"])
    assert saved["mp_target"] == "4MP"
    assert saved["model_size_mb"] <= saved["mp_target_mb"] + 1e-9
    mods = saved["mixed_precision"]["modules"]
    assert set(mods) == {f"blocks.{i}.{k}" for i in range(4) for k in ("attn", "mlp")}
    assert all(b in (2, 3, 4, 5, 6) for b in mods.values())
    for name, bits in mods.items():
        block, kind = name.rsplit(".", 1)
        for suffix in mp.MODULE_LAYERS[kind]:
            layer = saved["layers"][f"{block}.{suffix}"]
            for op, d in layer.items():
                if isinstance(d, dict) and "bits" in d:
                    assert d["bits"] == bits, (name, suffix, op)
    # layers outside the modules keep the nominal width
    for op in ("w", "a"):
        assert saved["layers"]["patch_embed.proj"][op]["bits"] == 4
    assert saved["w_bits"] == saved["a_bits"] == 4
    assert 0 <= saved["top1"] <= 100


def test_mp_min_bits_drops_low_candidates(tmp_path, capsys):
    assert mp.candidate_bits(qcfg(mp_target="4MP")) == (4, (2, 3, 4, 5, 6))
    assert mp.candidate_bits(qcfg(mp_target="4MP", mp_min_bits=3)) == (4, (3, 4, 5, 6))
    assert mp.candidate_bits(qcfg(mp_target="8MP", mp_min_bits=8)) == (8, (8, 9, 10))
    with pytest.raises(ValueError, match="no candidate width at or below"):
        mp.candidate_bits(qcfg(mp_target="4MP", mp_min_bits=5))
    rc = quant_script.cli(["--method", "vtptq", "--mixed-precision", "--mp-target", "4MP", "--mp-min-bits", "5",
                           "--output", str(tmp_path / "x")])
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mp_min_bits is 5" in lines[0]
    assert not (tmp_path / "x" / "result.json").exists()


def test_mixed_precision_needs_vtptq(tmp_path, capsys):
    rc = quant_script.cli(["--method", "easyquant", "--mixed-precision", "--output", str(tmp_path / "x")])
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "mixed_precision" in lines[0]


def test_embedded_vtptq_w8a8_close_to_fp(tmp_path):
    # 25 candidates instead of 100 for speed (W8A8 is insensitive to the grid's density)
    cfg = qcfg(method="vtptq", w_bits=8, a_bits=8, calib_num=32, max_images=1000, search_candidates=25,
               output=str(tmp_path / "w8a8"))
    res = quant_script.main(cfg)
    assert res["num_images"] == 1000
    assert abs(res["top1"] - res["fp_top1"]) <= 1.0
    assert read_json(tmp_path / "w8a8" / "result.json")["method"] == "vtptq"
