"""Every benchmark script of bench/ runs, with its smallest settings, so that a refactor of src/
cannot break one silently. Each runs in this process (MindSpore imported once) on the embedded
model or a tiny input; what a script starts in other processes runs for real where it is cheap
(eval.py in eval_memory, the profiled children of profile_ops) and is stood in for where it is
not (calib_scaling's msrun launch, covered by tests/test_distributed.py). The numbers are not
checked, only that each script gets to its end and reports what it should."""
import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

import mindspore as ms

import src.api  # noqa: F401  (imported at collection, as the other test files import src: the default
#                 log stream of calibrate_model is then pytest's session stream, not one test's capture)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
SCRIPTS = sorted(f[:-3] for f in os.listdir(BENCH) if f.endswith(".py"))


def load(name):
    """bench/NAME.py as a fresh module (its top level runs: imports and constants)."""
    spec = importlib.util.spec_from_file_location(f"_smoke_{name}", os.path.join(BENCH, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def keep_global_state(monkeypatch):
    """Benchmarks set MindSpore's mode and extend sys.path: both are restored afterwards."""
    mode = ms.get_context("mode")
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    ms.set_context(mode=mode)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A W8A8 minmax checkpoint of the embedded model (random weights), as eval_memory makes it."""
    path = str(tmp_path_factory.mktemp("ckpt") / "quantized.ckpt")
    load("eval_memory").make_checkpoint("deit_fmnist", path, calib_num=4)
    return path


def test_bench_fp(capsys):
    load("bench_fp").main(["--model", "deit_fmnist", "--batch-size", "2", "--iters", "1"])
    assert "graph / pynative" in capsys.readouterr().out


def test_bench_quant(tmp_path):
    out = tmp_path / "q.json"
    result = load("bench_quant").main(["--models", "deit_fmnist", "--methods", "minmax", "--batch-size", "4",
                                       "--iters", "1", "--warmup", "0", "--repeats", "1", "--calib-num", "4",
                                       "--json", str(out)])
    assert result["speed"][0]["quant_layers"] > 0 and result["calibration"][0]["method"] == "minmax"
    assert json.loads(out.read_text())["speed"][0]["model"] == "deit_fmnist"


def test_bench_int8(tmp_path):
    pytest.importorskip("onnxruntime")
    result = load("bench_int8").main(["--model", "deit_fmnist", "--batch-size", "2", "--iters", "1", "--repeats", "1",
                                      "--calib-num", "2", "--keep-dir", str(tmp_path)])
    assert result["integer_products"] > 0 and "ms_fake_quant_images_per_second" in result


def test_calib_memory(capsys):
    load("calib_memory").main(["--model", "deit_fmnist", "--calib-num", "4"])
    assert "embedding + block 0" in capsys.readouterr().out


def test_calib_speed(tmp_path, capsys):
    save = str(tmp_path / "s.npz")
    calib_speed = load("calib_speed")
    args = ["--model", "deit_fmnist", "--method", "minmax", "--stages", "1", "--calib-num", "4"]
    assert calib_speed.main(args + ["--save", save]) == 0
    assert calib_speed.main(args + ["--compare", save, "--json", str(tmp_path / "t.json")]) == 0  # bit-identical
    assert "bit-identical" in capsys.readouterr().out
    run = json.load(open(tmp_path / "t.json"))["runs"][0]
    assert run["model"] == "deit_fmnist" and run["stages"] == 1 and run["wall_seconds"] > 0
    assert run["cpu_seconds"] > 0 and run["peak_rss_gb"] > 0.1


def test_calib_scaling(tmp_path, monkeypatch, capsys):
    calib_scaling = load("calib_scaling")
    assert calib_scaling.interval_rel_diff({"layers": {"a": {"w": {"scale": [2.0]}}}},
                                           {"layers": {"a": {"w": {"scale": [1.0]}}}}) == 0.5

    def launch(workers, quant_args, out, log_dir):  # msrun itself: tests/test_distributed.py
        assert quant_args[:2] == ["--method", "vtptq"] and "--max-images" in quant_args
        layers = {"head": {"w": {"scale": 0.5}}}
        res = {"calib_seconds": 2.0, "top1": 80.0, "layers": layers, "calib_shards": workers,
               "calib_images_per_rank": [4 // workers] * workers, "calibration_rank_max_diff": 0.0,
               "calib_seconds_per_rank": [2.0 / workers] * workers}
        return res, 1.0
    monkeypatch.setattr(calib_scaling, "launch", launch)
    assert calib_scaling.main(["--calib-num", "4", "--max-images", "8", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["speedup"] == 2.0 and summary["same_top1"]


def test_embedded_table(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "table"
    load("embedded_table").main(["--variants", "minmax", "--bits", "8", "--no-mp", "--calib-num", "4",
                                 "--max-images", "20", "--output", str(out)])
    assert "minmax" in (out / "summary.md").read_text() and (out / "accuracy_size.png").is_file()


def test_embedded_table_resume(tmp_path, monkeypatch):
    """--resume keeps the runs of summary.json and calibrates only the missing draws."""
    table = load("embedded_table")
    out = tmp_path / "table"
    common = ["--variants", "minmax", "--bits", "8", "--no-mp", "--calib-num", "4", "--max-images", "20",
              "--splits", "val,test", "--output", str(out)]
    table.main([*common, "--seeds", "0"])
    calls = []
    real = table.quant.main
    monkeypatch.setattr(table.quant, "main", lambda cfg: calls.append(cfg["calib_seed"]) or real(cfg))
    table.main([*common, "--seeds", "0-1", "--resume"])
    assert calls == [1]
    runs = json.loads((out / "summary.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0, 1] and all("test" in r and "val" in r for r in runs)
    with pytest.raises(SystemExit, match="splits"):
        table.main([*common[:-4], "--splits", "val", "--output", str(out), "--seeds", "0-1", "--resume"])


def test_embedded_table_bit_pairs(tmp_path, monkeypatch):
    """--bit-pairs runs exactly the named widths; a malformed list or one given with --pairs
    stops before any calibration."""
    table = load("embedded_table")
    assert table.parse_bit_pairs("W2A4,w4a3") == [(2, 4), (4, 3)]
    seen = []
    monkeypatch.setattr(table, "run_table", lambda out, variants, bits, seeds, splits, over, pairs=None, resume=False:
                        seen.append((pairs, [v for v, _ in variants])))
    monkeypatch.setattr(table, "plot", lambda out: None)
    table.main(["--bit-pairs", "W2A4,W4A3", "--variants", "vtptq_plus,plus_with_block_recon", "--output", str(tmp_path)])
    assert seen == [([(2, 4), (4, 3)], ["vtptq_plus", "plus_with_block_recon"])]
    for bad in (["--bit-pairs", "W1A4"], ["--bit-pairs", "W4"], ["--bit-pairs", "W2A4", "--pairs"]):
        with pytest.raises(SystemExit):
            table.main(bad + ["--output", str(tmp_path)])
    assert len(seen) == 1


def test_eval_memory(tmp_path, capsys):
    images = tmp_path / "jpegs"
    images.mkdir()
    for i in range(2):
        Image.new("RGB", (40, 32), (i * 90, 20, 200)).save(images / f"n01440764_{i}.JPEG")
    result = load("eval_memory").main(["--images", str(images), "--model", "deit_tiny_patch16_224",
                                       "--batch-size", "2", "--json", str(tmp_path / "m.json")])
    assert result["images"] == 2 and result["fp_peak_rss_mb"] > 0


def test_onnx_agreement(tiny_ckpt):
    pytest.importorskip("onnxruntime")
    out = load("onnx_agreement").main(["--ckpt", tiny_ckpt, "--max-images", "20", "--batch-size", "10"])
    assert out["images"] == 20 and 0 <= out["agreement"] <= 1


def test_profile_ops(capsys):
    result = load("profile_ops").main(["--model", "deit_fmnist", "--batch-size", "1"])
    assert result["fp"]["ops"] and result["quantized"]["ops"]


def test_ranking_cost(capsys):
    load("ranking_cost").main(["--pairs", "4", "--candidates", "2", "--heads", "1", "--tokens", "8",
                               "--repeats", "1", "--kernels"])
    out = capsys.readouterr().out
    assert "all pairs / sampled" in out
    assert "DIFFERENT" not in out and ("same bits" in out or "compiled" not in out)


def test_every_bench_script_is_covered():
    """Last in this file: a new bench script needs a test here."""
    tests = {name[len("test_"):] for name in globals() if name.startswith("test_")}
    assert sorted(set(SCRIPTS) - tests) == []
