"""Calibration speed work must not move any result: vtptq's intervals and bias corrections on a
tiny random ViT (with the ranking loss over sampled pairs and over all pairs, bias correction
on, per-tensor and per-channel weights, default and tiny chunk sizes) equal, within the float
tolerance stated below (on every CPU), the ones pinned in calib_pin.json, which the code of
commit fdfbc73 (before the speed work) produced. And the all-pairs ranking loss equals the formulation of that commit
(vtptq.ranking_loss_reference) to 1e-12 on random data with ties.

Regenerate the pin (only from the code whose results are the reference):
    ROOT=/path/to/reference/checkout python tests/test_calib_pin.py --write
"""
import json
import os
import sys

import numpy as np

if __name__ == "__main__":  # pin generation: import src from the reference checkout
    sys.path.insert(0, os.environ.get("ROOT", os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))

from _helpers import randomize  # noqa: E402
import pytest  # noqa: E402

import mindspore as ms  # noqa: E402

from src.config import defaults  # noqa: E402
from src.models.vit import VisionTransformer  # noqa: E402
from src.quant import calibrate_model, quant_cells, quantize_model, search, vtptq  # noqa: E402

PIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "calib_pin.json")
TINY = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)

# name -> (config overrides, search.CHUNK_ELEMS, vtptq.ROW_CHUNK_ELEMS); None keeps the default
CONFIGS = {
    "w4a4_pairs8": (dict(w_bits=4, a_bits=4, ranking_pairs=8), None, None),
    "w4a4_all_pairs": (dict(w_bits=4, a_bits=4, ranking_pairs=0), None, None),
    "w6a6_all_pairs_small_chunks": (dict(w_bits=6, a_bits=6, ranking_pairs=0), 1 << 11, 1 << 10),
    "w5a5_pairs20_per_channel_small_chunks": (dict(w_bits=5, a_bits=5, ranking_pairs=20, weight_per_channel=True),
                                             1 << 12, 1 << 9),
}


def calibrated(name):
    """{layer: {operand: [interval], 'bias_corr': [...]}} and {layer: objective history}."""
    overrides, chunk, row_chunk = CONFIGS[name]
    cfg = defaults()
    cfg.update(method="vtptq", calib_num=12, search_candidates=40, **overrides)
    saved = search.CHUNK_ELEMS, vtptq.ROW_CHUNK_ELEMS
    search.CHUNK_ELEMS = chunk or saved[0]
    vtptq.ROW_CHUNK_ELEMS = row_chunk or saved[1]
    mode = ms.get_context("mode")
    try:
        model = randomize(VisionTransformer(**TINY), seed=3)
        quantize_model(model, cfg)
        x = np.random.default_rng(5).standard_normal((12, 1, 28, 28)).astype(np.float32)
        import io
        report = calibrate_model(model, x, cfg, log=io.StringIO())
    finally:
        search.CHUNK_ELEMS, vtptq.ROW_CHUNK_ELEMS = saved
        ms.set_context(mode=mode)
    scales = {}
    for layer, cell in quant_cells(model):
        d = {op: np.asarray(cell.get_scale(op), np.float32).ravel().tolist() for op in cell.operands}
        if cell.bias_corr is not None:
            d["bias_corr"] = np.asarray(cell.bias_corr, np.float32).ravel().tolist()
        scales[layer] = d
    history = {layer: [float(v) for v in info["objective"]] for layer, info in report.items() if "objective" in info}
    return scales, history


# The pin is of the method, not of one CPU's float kernels: numpy's OpenBLAS picks its sgemm
# by CPU (OPENBLAS_CORETYPE) and MindSpore's oneDNN by instruction set (DNNL_MAX_CPU_ISA), which
# moves the bias corrections and objectives in their last bits. So every interval and bias
# correction must match to RTOL relative to the largest magnitude of its array (a real change
# moves an interval by a whole candidate step, 1 % or more), and the objective of each round to
# OBJECTIVE_ATOL. The rounds of a layer stop when the objective stops improving; a round whose
# improvement is below OBJECTIVE_ATOL is decided by float noise (a repeated bias correction at the
# same intervals), so histories are compared up to their first such round.
# Measured against the pin (written on an AVX-512 CPU), under OPENBLAS_CORETYPE=Haswell,
# Sandybridge and Prescott with DNNL_MAX_CPU_ISA=AVX2, and Nehalem with SSE41: intervals
# identical, bias corrections within 5.0e-6 of their array's largest magnitude, objectives
# within 3.3e-8 (AVX2) and 5.1e-6 (SSE4.1: a 4-bit code at a tie flips in the first objective);
# bias corrections within 6.7e-6 under SSE4.1.
RTOL = 1e-5
OBJECTIVE_ATOL = 1e-5


def settled(history, tol=OBJECTIVE_ATOL):
    """history up to and including its first round that improves the best value by <= tol."""
    best = history[0]
    for i, value in enumerate(history[1:], 1):
        if value - best <= tol:
            return history[:i + 1]
        best = value
    return history


def assert_pinned(got, want, what):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, what
    np.testing.assert_allclose(got, want, rtol=0, atol=RTOL * np.abs(want).max(), err_msg=what)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_intervals_and_bias_corrections_match_pin(name):
    with open(PIN, encoding="utf-8") as f:
        pin = json.load(f)[name]
    scales, history = calibrated(name)
    assert scales.keys() == pin["scales"].keys()
    for layer, ops in pin["scales"].items():
        assert scales[layer].keys() == ops.keys(), layer
        for op, values in ops.items():
            assert_pinned(scales[layer][op], values, f"{name} {layer} {op}")
    assert any("bias_corr" in ops for ops in pin["scales"].values())  # bias correction was exercised
    assert history.keys() == pin["objective"].keys()
    for layer, values in pin["objective"].items():
        got, want = settled(history[layer]), settled(values)
        assert len(got) == len(want), f"{name} {layer}: rounds {history[layer]} against the pin's {values}"
        np.testing.assert_allclose(got, want, rtol=0, atol=OBJECTIVE_ATOL, err_msg=f"{name} {layer}")


def test_pin_comparison_sees_a_one_step_change():
    """A change of 1 % in an interval (less than a candidate step) or of 1e-3 of the largest bias correction fails."""
    with open(PIN, encoding="utf-8") as f:
        ops = json.load(f)["w4a4_pairs8"]["scales"]["blocks.0.attn.proj"]
    a = np.asarray(ops["a"])
    with pytest.raises(AssertionError):
        assert_pinned(a * 1.01, a, "interval")
    corr = np.asarray(ops["bias_corr"])
    with pytest.raises(AssertionError):
        assert_pinned(corr + np.eye(1, len(corr))[0] * 1e-3 * np.abs(corr).max(), corr, "bias")
    assert_pinned(corr * (1 + 1e-7), corr, "bias")
    assert settled([0.5, 0.6, 0.6 + 1e-12, 0.7]) == [0.5, 0.6, 0.6 + 1e-12]
    assert settled([0.5, 0.6]) == [0.5, 0.6]


@pytest.mark.parametrize("t,heads,cands,n,tie_kind", [(17, 2, 5, 3, "columns"), (30, 1, 4, 2, "rows"),
                                                     (9, 3, 2, 1, "all"), (64, 2, 3, 1, "none"), (2, 1, 1, 1, "none")])
def test_all_pairs_ranking_loss_equals_reference(t, heads, cands, n, tie_kind):
    """ranking_loss over all pairs (sorted columns, pairs at each offset) equals the formulation of
    commit fdfbc73 (ranking_loss_reference: every ordered pair, a sign pass) to 1e-12, and
    ranking_loss_all_pairs (the search's loss with ranking_pairs: 0) equals that commit's
    sampled-pairs path given every pair, to 1e-12; with ties in the FP scores (hinge θ) and in
    the quantized ones, and over several row blocks."""
    rng = np.random.default_rng(t)
    fp = rng.standard_normal((n, heads, t, t)).astype(np.float32)
    if tie_kind == "columns":
        fp[..., 3] = fp[..., 7]
        fp[0, 0, 0, :] = 1.0
    elif tie_kind == "rows":
        fp = np.round(fp * 2) / 2  # many ties in every row
    elif tie_kind == "all":
        fp[:] = 0.5
    q = (fp[None] + 0.3 * rng.standard_normal((cands,) + fp.shape)).astype(np.float32)
    q[..., 1] = q[..., 0]
    if t == 2:  # float64 scores: the hinges in float64
        fp, q = fp.astype(np.float64), q.astype(np.float64) + 1e-9
    saved = vtptq.PAIR_BLOCK_ELEMS
    try:
        for block in (saved, 3 * t):  # one block, or a few rows per block
            vtptq.PAIR_BLOCK_ELEMS = block
            for theta in (0.2, 0.05, 1.0):
                ref = vtptq.ranking_loss_reference(fp, q, theta=theta)
                new = vtptq.ranking_loss(fp, q, theta=theta)
                assert new.shape == ref.shape == (cands, n)
                np.testing.assert_allclose(new, ref, rtol=0, atol=1e-12)
                # what the search uses with ranking_pairs: 0, against the sampled-pairs path given
                # every pair (what it used before): the same hinges, summed in another order
                pairs_path = vtptq.ranking_loss(fp, q, theta=theta, pairs=vtptq.sample_pairs(t, 0))
                all_pairs = vtptq.ranking_loss_all_pairs(fp, q, theta=theta)
                np.testing.assert_allclose(all_pairs, pairs_path, rtol=0, atol=1e-12)
                if fp.dtype == np.float32 and theta != 1.0:  # float32(θ) != θ: the reference differs
                    assert np.abs(pairs_path - ref).max() > 1e-12
    finally:
        vtptq.PAIR_BLOCK_ELEMS = saved


def write_pin():
    out = {}
    for name in sorted(CONFIGS):
        scales, history = calibrated(name)
        out[name] = {"scales": scales, "objective": history}
        print(name, "done", flush=True)
    with open(PIN, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=0, sort_keys=True)
        f.write("\n")


if __name__ == "__main__" and "--write" in sys.argv:
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    write_pin()
