"""Mixed-precision criteria: the paper's criterion pinned (module bits and Ω of a tiny model),
the refined criterion's parts (KL objective, cached layer states, moves) and its search on a
tiny model, the mp_criterion key, and quant.py's MP result fields and bits.png.

Tiny models (width 32) for the searches; one reduced embedded run of quant.py (~30 s).
"""
import io
import json
import os
import sys

import numpy as np
import pytest
from _helpers import randomize

from mindspore import Tensor

from src.config import defaults
from src.models.vit import VisionTransformer
from src.quant import calibrate_model, quant_cells, quantize_model, set_quant_mode
from src.quant import mixed_precision as mp
from src.quant import mp_refined
from test_vtptq import REPO, quant_script, restore_mode, tiny_images  # noqa: F401 (restore_mode: autouse fixture)
from test_vtptq import qcfg as base_qcfg

TINY2 = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)

# The paper's criterion on the 2-block tiny model (4MP, 10 candidates, 2 rounds, 8 images), as
# computed before mp_criterion existed: it must not move.
PAPER_TINY_BITS = {"blocks.0.attn": 3, "blocks.0.mlp": 5, "blocks.1.attn": 3, "blocks.1.mlp": 4}
PAPER_TINY_OMEGA = {"blocks.0.attn": [2411.019851734973, 240.55664728465163, 85.70943686647396, 27.37334204975682,
                                      8.934147948660584],
                    "blocks.0.mlp": [15731.950095363964, 1993.0610776194917, 694.4118687658026, 204.5923087713853,
                                     65.31756212907261],
                    "blocks.1.attn": [1687.8715090838198, 232.57552285613463, 61.51380986760816, 19.59150842257198,
                                      6.4484185914346215],
                    "blocks.1.mlp": [14942.836103082547, 2000.835721983327, 669.3999826691971, 207.09413973768798,
                                     61.02691960605449]}


def qcfg(**kw):
    return base_qcfg(**{"method": "vtptq", "w_bits": 4, "a_bits": 4, "mp_target": "4MP", "search_candidates": 10,
                        "max_rounds": 2, **kw})


def tiny2():
    return randomize(VisionTransformer(**TINY2), 0)


# ----------------------------------------------------------------------------- paper criterion
def test_paper_criterion_pinned_on_tiny_model():
    model = tiny2()
    cfg = qcfg()
    quantize_model(model, cfg)
    report = mp.search_bits(model, tiny_images(8), cfg, log=io.StringIO())
    assert report["criterion"] == "paper"
    assert report["modules"] == PAPER_TINY_BITS
    for name, want in PAPER_TINY_OMEGA.items():
        got = [report["omega"][name][str(b)] for b in (2, 3, 4, 5, 6)]
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_mp_criterion_key():
    assert defaults()["mp_criterion"] == "paper"
    for path in ("configs/deit_fmnist_vtptq_6MP.yaml", "configs/deit_fmnist_vtptq_4MP.yaml"):
        with open(os.path.join(REPO, path), encoding="utf-8") as f:
            assert "mp_criterion: paper" in f.read().split("\n")


def test_bad_mp_criterion_is_one_line_error(tmp_path, capsys):
    rc = quant_script.cli(["--method", "vtptq", "--mixed-precision", "--mp-criterion", "best",
                           "--output", str(tmp_path / "x")])
    assert rc == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "mp-criterion" in lines[0] and "best" in lines[0]
    assert not (tmp_path / "x").exists()


# ----------------------------------------------------------------------------- refined: parts
def test_kl_to_reference_hand_case():
    z = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    assert mp_refined.kl_to_reference(z, z) == pytest.approx(0.0, abs=1e-12)
    assert mp_refined.kl_to_reference(z, z + 7.0) == pytest.approx(0.0, abs=1e-12)  # shift invariant
    q = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    r = np.exp(q) / np.exp(q).sum(1, keepdims=True)
    want = np.mean((p * np.log(p / r)).sum(1))
    assert mp_refined.kl_to_reference(z, q) == pytest.approx(want, rel=1e-12)


def test_candidate_moves_are_swaps_within_size():
    costs = [[2, 3, 4], [2, 3, 4], [4, 6, 8]]  # two small modules, one twice their size; widths 2,3,4
    current = (1, 1, 1)
    capacity = 3 + 3 + 6
    moves = mp_refined.candidate_moves(current, (2, 3, 4), costs, capacity)
    assert moves and len(set(moves)) == len(moves)
    for mv in moves:
        d = np.array(mv) - np.array(current)
        assert (d > 0).any() and (d < 0).any() and 2 <= (d != 0).sum() <= 3
        assert sum(costs[m][k] for m, k in enumerate(mv)) <= capacity
    assert (2, 0, 1) in moves and (0, 0, 2) in moves  # equal-size swaps
    assert (2, 2, 0) in moves  # two small up, the big one down
    assert (2, 1, 2) not in moves  # no move without a module going down


def test_cached_state_reproduces_the_calibrated_model():
    x = tiny_images(8)
    cfg = qcfg(w_bits=3, a_bits=3)
    calibrated = tiny2()
    quantize_model(calibrated, cfg)
    calibrate_model(calibrated, x, cfg, log=None)
    states = mp_refined.layer_states(calibrated)
    other = tiny2()
    quantize_model(other, qcfg(w_bits=6, a_bits=6))
    for name, cell in quant_cells(other):
        mp_refined.apply_state(cell, states[name])
    set_quant_mode(other, "quantized")
    with mp_refined.pynative():
        a = calibrated(Tensor(x)).asnumpy()
        b = other(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(a, b)
    assert mp_refined.layer_states(other).keys() == states.keys()
    assert all(c.w_q.bits == 3 for _, c in quant_cells(other) if "w" in c.operands)


def plus_qcfg(**kw):
    from src.quant.vtptq_plus import resolve_switches
    cfg = qcfg(method="vtptq_plus", mp_criterion="refined", **kw)
    resolve_switches(cfg)
    return cfg


def test_cached_state_reproduces_a_vtptq_plus_model():
    """vtptq_plus changes more than intervals: LayerNorm folds (norm1/norm2 and the weights and
    biases of qkv / fc1), grid kinds, zero points, per-channel weight intervals. A model
    quantized at 6 bits that takes the cached states of a 3-bit calibration computes the
    calibrated model's logits exactly."""
    x = tiny_images(8)
    cfg = plus_qcfg(w_bits=3, a_bits=3)
    calibrated = tiny2()
    quantize_model(calibrated, cfg)
    report = calibrate_model(calibrated, x, cfg, log=None)
    assert any(r.get("reparam", {}).get("alpha") for r in report.values())  # a fold happened
    kinds = {c.a_q.kind for n, c in quant_cells(calibrated) if n.endswith("matmul2") or n.endswith("fc2")}
    assert "asym" in kinds
    states = mp_refined.layer_states(calibrated)
    other = tiny2()
    quantize_model(other, plus_qcfg(w_bits=6, a_bits=6))
    for name, cell in quant_cells(other):
        mp_refined.apply_state(cell, states[name], mp_refined.input_norm(other, name))
    set_quant_mode(other, "quantized")
    with mp_refined.pynative():
        a = calibrated(Tensor(x)).asnumpy()
        b = other(Tensor(x)).asnumpy()
    np.testing.assert_array_equal(a, b)
    for (_, c1), (_, c2) in zip(quant_cells(calibrated), quant_cells(other)):
        assert c1.a_q.kind == c2.a_q.kind


def test_refined_search_with_vtptq_plus_respects_size(tmp_path):
    """vtptq_plus 4MP, refined, through quant.py on the 2-block tiny model is not possible (quant.py
    builds registered models), so: the search on the tiny model, then the chosen widths
    recalibrated, within the uniform 4-bit size."""
    from src.quant import model_size_mb
    cfg = plus_qcfg(w_bits=4, a_bits=4)
    report = mp_refined.refined_search(tiny2, tiny_images(8), cfg, log=io.StringIO())
    assert set(report["modules"]) == set(PAPER_TINY_BITS)
    obj = report["objective"]
    assert obj["final"] <= min(obj["uniform"], obj["initial"])
    uniform = tiny2()
    quantize_model(uniform, cfg)
    set_quant_mode(uniform, "quantized")
    model = tiny2()
    quantize_model(model, cfg, mp.layer_bits_from_modules(uniform, report["modules"]))
    calibrate_model(model, tiny_images(8), cfg, log=None)
    assert model_size_mb(model) <= model_size_mb(uniform) + 1e-12
    for name, bits in report["modules"].items():
        block, kind = name.rsplit(".", 1)
        for suffix in mp.MODULE_LAYERS[kind]:
            cell = dict(quant_cells(model))[f"{block}.{suffix}"]
            assert all(getattr(cell, f"{op}_q").bits == bits for op in cell.operands)


def test_refined_search_on_tiny_model(monkeypatch):
    cfg = qcfg()
    report = mp_refined.refined_search(tiny2, tiny_images(8), cfg, log=io.StringIO())
    assert report["criterion"] == "refined"
    assert set(report["modules"]) == set(PAPER_TINY_BITS)
    p = report["params"]
    assert sum(p[n] * b for n, b in report["modules"].items()) <= 4 * sum(p.values())
    obj = report["objective"]
    assert obj["final"] <= min(obj["uniform"], obj["initial"])  # only improving moves are kept
    assert len(report["history"]) == report["swaps_accepted"] + 1
    assert report["ended_on_uniform"] == all(b == 4 for b in report["modules"].values())
    for name, om in report["omega"].items():
        assert om["4"] == 0.0 and om["2"] > 0  # Ω is the change of L from the uniform nominal model
    # deterministic, and the same when block inputs are evicted from the reuse cache at once
    monkeypatch.setattr(mp_refined, "MAX_CACHED_INPUTS", 1)
    again = mp_refined.refined_search(tiny2, tiny_images(8), cfg, log=io.StringIO())
    assert again["modules"] == report["modules"] and again["objective"] == obj


# ----------------------------------------------------------------------------- quant.py end to end
def test_quant_refined_result_fields_and_bits_png(tmp_path):
    # reduced on purpose: 8 calibration images, 10 candidates, 2 rounds, 200 images
    out = tmp_path / "mp"
    cfg = defaults()
    cfg.update(method="vtptq", mixed_precision=True, mp_target="6MP", mp_criterion="refined", calib_num=8,
               search_candidates=10, max_rounds=2, max_images=200, output=str(out), calib_batch_size=256)
    quant_script.main(cfg)
    with open(out / "result.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["mp_criterion"] == "refined"
    assert saved["model_size_mb"] <= saved["mp_target_mb"] + 1e-9
    assert isinstance(saved["mp_swaps_accepted"], int) and saved["mp_swaps_accepted"] >= 0
    assert saved["mp_accept_z"] == 0.0
    assert set(saved["mp_bits"]) == {f"blocks.{i}.{k}" for i in range(4) for k in ("attn", "mlp")}
    for name, bits in saved["mp_bits"].items():
        block, kind = name.rsplit(".", 1)
        for suffix in mp.MODULE_LAYERS[kind]:
            for op, d in saved["layers"][f"{block}.{suffix}"].items():
                if isinstance(d, dict) and "bits" in d:
                    assert d["bits"] == bits
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    png = out / "bits.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in os.listdir(out) if p.startswith(".")]  # no temporary left behind


def test_plots_skipped_once_without_matplotlib(tmp_path, monkeypatch, capsys):
    from src import plots
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(plots, "_warned", [])
    report = {"modules": {"a": 4}, "sensitivity": {"a": 1.0}, "nominal_bits": 4, "candidates": [2, 4, 6]}
    assert plots.plot_bits(report, str(tmp_path / "bits.png")) is None
    assert plots.plot_accuracy_size([], str(tmp_path / "acc.png")) is None
    err = capsys.readouterr().err
    assert err.count("plots are skipped") == 1
    assert not (tmp_path / "bits.png").exists()


def test_quant_vtptq_plus_refined_checkpoint_reevaluates(tmp_path):
    # reduced on purpose: 8 calibration images, 10 candidates, 2 rounds, 200 images
    import importlib
    eval_script = importlib.import_module("eval")
    out = tmp_path / "plus_mp"
    rc = quant_script.cli(["--method", "vtptq_plus", "--mixed-precision", "--mp-target", "4MP", "--mp-criterion",
                           "refined", "--calib-num", "8", "--search-candidates", "10", "--max-rounds", "2",
                           "--max-images", "200", "--calib-batch-size", "256", "--output", str(out)])
    assert rc == 0
    with open(out / "result.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["method"] == "vtptq_plus" and saved["mp_criterion"] == "refined"
    assert saved["model_size_mb"] <= saved["mp_target_mb"] + 1e-9
    assert saved["ln_reparam"] is True and saved["gelu_asymmetric"] is True
    rc = eval_script.cli(["--ckpt", str(out / "quantized.ckpt"), "--max-images", "200", "--output",
                          str(tmp_path / "ev")])
    assert rc == 0
    with open(tmp_path / "ev" / "result.json", encoding="utf-8") as f:
        ev = json.load(f)
    assert ev["top1"] == saved["top1"] and ev["top5"] == saved["top5"]


def test_cache_keeps_one_copy_of_unchanged_weights():
    """vtptq changes no parameter: every width's cached state shares the first width's arrays;
    vtptq_plus's folded layers (qkv / fc1 and their LayerNorms; attn.proj with attn_reparam, its
    default) keep their own where they differ."""
    x = tiny_images(8)
    cache = mp_refined.calibrate_widths(tiny2, x, qcfg(), (3, 4), log=io.StringIO())
    fp = [n for n, st in cache[3].items() if st["fp"] is not None]
    assert fp and all(cache[4][n]["fp"] is cache[3][n]["fp"] for n in fp)
    for attn_reparam, shared in ((True, ("fc2",)), (False, ("proj", "fc2"))):
        plus = mp_refined.calibrate_widths(tiny2, x, plus_qcfg(attn_reparam=attn_reparam), (3, 4), log=io.StringIO())
        for n, st in plus[4].items():
            if st["fp"] is not None and st["fp"] is not plus[3][n]["fp"]:
                assert not all(np.array_equal(u, v) for u, v in zip(st["fp"], plus[3][n]["fp"]) if u is not None)
        assert all(plus[4][n]["fp"] is plus[3][n]["fp"] for n in plus[4] if n.endswith(shared))


def test_accept_z_is_a_paired_test_over_the_images():
    """mp_accept_z: a move whose mean per-image gain passes the 1% rule is kept with z = 0 and
    refused when asked for z standard errors that the noisy per-image gains do not reach;
    a gain that is the same on every image passes any z."""
    class Fixed(mp_refined.EndToEnd):
        def __init__(self, per_image, z):  # noqa: super() needs a model; only better()'s state is set
            self.per_image = {k: np.asarray(v, np.float64) for k, v in per_image.items()}
            self.values = {k: float(np.mean(v)) for k, v in per_image.items()}
            self.z = z

        def __call__(self, assignment):
            return self.values[tuple(assignment)]

    old, new = (4, 4), (3, 5)
    noisy = {old: [1.0, 1.0, 1.0, 1.0], new: [0.2, 1.6, 0.3, 1.5]}  # mean gain 0.1 (10% of L), SE 0.35
    assert Fixed(noisy, 0.0).better(new, old)
    assert not Fixed(noisy, 1.0).better(new, old)
    steady = {old: [1.0, 1.0, 1.0, 1.0], new: [0.9, 0.9, 0.9, 0.9]}
    assert Fixed(steady, 5.0).better(new, old)
    tiny = {old: [1.0, 1.0, 1.0, 1.0], new: [0.995] * 4}  # 0.5%: below REFINED_MIN_GAIN
    assert not Fixed(tiny, 0.0).better(new, old)
    # the key reaches the search: quant.py's config accepts it, and an EndToEnd takes it
    from src.config import check_value
    assert check_value("mp_accept_z", 1, "test") == 1.0
    with pytest.raises(Exception, match="mp_accept_z"):
        check_value("mp_accept_z", -1.0, "test")
