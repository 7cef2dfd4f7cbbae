"""eval.py end to end: result.json / config.yaml / predictions CSV of the embedded model, an
ImageNet-layout folder generated here (tiny model registered for the test), error handling,
the configs in configs/ and the scripts/run_{eval,quant}_*.sh wrappers.

Kept fast: at most a few hundred embedded images per run and 32x32 images for ImageNet.
"""
import csv
import glob
import importlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from PIL import Image

import mindspore as ms

from src.config import DEFAULTS, load_yaml, resolve
from src.data.imagenet import build_eval_transform
from src.engine import predict, softmax
from src.models import create_model, get_data_config, list_models
from src.models import registry
from src.models.vit import VisionTransformer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
eval_script = importlib.import_module("eval")
quant_script = importlib.import_module("quant")

TINY = "_test_eval_tiny_vit"
W0, W2, W999 = "n01440764", "n01484850", "n15075141"  # class indices 0, 2, 999
N_EMB = 300          # embedded images per run
BS_EMB = 128         # 300 = 128 + 128 + 44: the last batch is partial
RESULT_FIELDS = ("model", "checkpoint", "data", "num_images", "skipped_images", "top1", "top5",
                 "seconds", "images_per_second", "device_target", "mode")
CSV_HEADER = ["path", "label"] + [f"pred_{i}" for i in range(1, 6)] + [f"prob_{i}" for i in range(1, 6)]


# ----------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module", autouse=True)
def restore_mode():
    """eval.py sets MindSpore's global execution mode; give the other test files theirs back."""
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


def run_cli(*args):
    return eval_script.cli([str(a) for a in args])


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def error_lines(text):
    return [ln for ln in text.splitlines() if ln.startswith("error:")]


def check_prediction_rows(rows, num_classes):
    """Column types, distinct class indices, probabilities in [0, 1] sorted descending."""
    preds, probs = [], []
    for row in rows:
        assert len(row) == 12
        p = [int(v) for v in row[2:7]]
        q = [float(v) for v in row[7:12]]
        assert all(0 <= c < num_classes for c in p) and len(set(p)) == 5
        assert all(0.0 <= v <= 1.0 for v in q)
        assert all(a >= b for a, b in zip(q, q[1:])), row
        assert sum(q) <= 1.0 + 1e-4
        preds.append(p)
        probs.append(q)
    return np.asarray(preds), np.asarray(probs)


# ----------------------------------------------------------------------------- embedded data

@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory):
    """One pynative run on the first N_EMB embedded images, with predictions."""
    out = tmp_path_factory.mktemp("emb_pynative")
    pred = out / "pred.csv"
    rc = run_cli("--max-images", N_EMB, "--batch-size", BS_EMB, "--mode", "pynative", "--output", out / "run",
                 "--save-predictions", pred)
    assert rc == 0
    return out / "run", pred


@pytest.fixture(scope="module")
def embedded_reference():
    """Direct computation: logits of engine.predict on the embedded npz images, and the labels."""
    cfg = get_data_config("deit_fmnist")
    with np.load(os.path.join(REPO, "assets", "fmnist_test.npz")) as z:
        images, labels = z["images"][:N_EMB], z["labels"][:N_EMB].astype(np.int64)
    x = (images.astype(np.float32)[:, None] / 255.0 - np.float32(cfg["mean"][0])) / np.float32(cfg["std"][0])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = create_model("deit_fmnist", checkpoint=os.path.join(REPO, "assets", "deit_fmnist.ckpt"))
    return predict(model, x, BS_EMB), labels


def test_embedded_result_json(embedded_run):
    out, _ = embedded_run
    res = read_json(out / "result.json")
    for key in RESULT_FIELDS:
        assert key in res, key
    assert res["model"] == "deit_fmnist"
    assert os.path.samefile(res["checkpoint"], os.path.join(REPO, "assets", "deit_fmnist.ckpt"))
    assert res["data"] == "embedded:fmnist_test"
    assert res["num_images"] == N_EMB and res["skipped_images"] == 0
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0
    assert res["top1"] > 30.0  # the trained embedded model, far above chance (10%)
    assert res["seconds"] > 0 and res["images_per_second"] > 0
    assert res["device_target"] == "CPU" and res["mode"] == "pynative"
    assert res["predictions_file"].endswith("pred.csv")


def test_embedded_config_yaml_reloads(embedded_run):
    out, pred = embedded_run
    path = str(out / "config.yaml")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    cfg = load_yaml(path)  # every key known, every value of the right type
    assert cfg == raw and set(cfg) == set(DEFAULTS)
    assert cfg["model"] == "deit_fmnist" and cfg["data"] == "embedded"
    assert cfg["max_images"] == N_EMB and cfg["batch_size"] == BS_EMB and cfg["mode"] == "pynative"
    assert cfg["output"] == str(out) and cfg["save_predictions"] == str(pred)
    # running again from the saved config resolves to the same values
    again = resolve(eval_script.build_parser().parse_args(["--config", path]))
    assert {k: again[k] for k in DEFAULTS} == cfg


def test_embedded_top1_matches_direct_computation(embedded_run, embedded_reference):
    out, _ = embedded_run
    res = read_json(out / "result.json")
    logits, labels = embedded_reference
    top1 = 100.0 * float((logits.argmax(axis=1) == labels).mean())
    top5 = 100.0 * float((np.argsort(-logits, axis=1)[:, :5] == labels[:, None]).any(axis=1).mean())
    assert res["top1"] == pytest.approx(top1, abs=1e-9)
    assert res["top5"] == pytest.approx(top5, abs=1e-9)


def test_embedded_predictions_csv(embedded_run, embedded_reference):
    _, pred = embedded_run
    header, rows = read_csv(pred)
    assert header == CSV_HEADER
    assert [r[0] for r in rows] == [f"test/{i}" for i in range(N_EMB)]  # dataset order
    logits, labels = embedded_reference
    assert [int(r[1]) for r in rows] == labels.tolist()
    preds, probs = check_prediction_rows(rows, 10)
    assert (preds[:, 0] == logits.argmax(axis=1)).all()
    p = softmax(logits.astype(np.float64))
    assert np.abs(probs - np.take_along_axis(p, preds, axis=1)).max() < 1e-5


def test_graph_and_pynative_agree(embedded_run, tmp_path):
    py = read_json(embedded_run[0] / "result.json")
    rc = run_cli("--max-images", N_EMB, "--batch-size", BS_EMB, "--mode", "graph", "--output", tmp_path)
    assert rc == 0
    gr = read_json(tmp_path / "result.json")
    assert gr["mode"] == "graph" and gr["num_images"] == N_EMB
    assert gr["top1"] == py["top1"] and gr["top5"] == py["top5"]


def test_no_arguments_mean_embedded_model_and_data():
    from src.data.build import build_eval_dataset
    from src.engine import resolve_checkpoint
    cfg = resolve(eval_script.build_parser().parse_args([]))
    assert cfg["model"] == "deit_fmnist" and cfg["data"] == "embedded" and cfg["max_images"] is None
    assert os.path.samefile(resolve_checkpoint(cfg), os.path.join(REPO, "assets", "deit_fmnist.ckpt"))
    ds = build_eval_dataset(cfg, get_data_config(cfg["model"]))
    assert len(ds) == 10000


def test_default_output_folder_is_outputs_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run_cli("--name", "my_run", "--max-images", 20, "--mode", "pynative") == 0
    assert read_json(tmp_path / "outputs" / "my_run" / "result.json")["num_images"] == 20
    assert load_yaml(str(tmp_path / "outputs" / "my_run" / "config.yaml"))["name"] == "my_run"


# ----------------------------------------------------------------------------- ImageNet layout

@pytest.fixture(scope="module")
def tiny_model():
    """A tiny 1000-class ViT on 32x32 ImageNet-preprocessed images, registered as TINY."""

    def _test_eval_tiny_vit(**kw):
        return VisionTransformer(**{**dict(img_size=32, patch_size=8, in_chans=3, num_classes=1000,
                                           embed_dim=32, depth=1, num_heads=2), **kw})

    registry.register_model(registry._deit_cfg(32))(_test_eval_tiny_vit)
    yield TINY
    registry._MODELS.pop(TINY, None)
    registry._DATA_CFGS.pop(TINY, None)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_model, tmp_path_factory):
    ms.set_seed(123)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.ckpt"
    ms.save_checkpoint(create_model(tiny_model), str(path))
    return path


IMAGENET_FILES = {W0: ["ILSVRC2012_val_00000003.JPEG", "ILSVRC2012_val_00000010.JPEG", "a.png"],
                  W2: ["ILSVRC2012_val_00000001.JPEG", "ILSVRC2012_val_00000007.JPEG"],
                  W999: ["ILSVRC2012_val_00000002.JPEG", "ILSVRC2012_val_00000005.JPEG"]}
EXPECTED_PATHS = [f"val/{w}/{n}" for w in (W0, W2, W999) for n in sorted(IMAGENET_FILES[w])]
EXPECTED_LABELS = [0, 0, 0, 2, 2, 999, 999]


@pytest.fixture(scope="module")
def imagenet_root(tmp_path_factory):
    """ROOT/val/<wnid>/* with 7 images of three classes (a subset: labels 0, 2 and 999)."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    for wnid, names in IMAGENET_FILES.items():
        d = root / "val" / wnid
        d.mkdir(parents=True)
        for name in names:
            h, w = (int(v) for v in rng.integers(30, 60, 2))
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            img.save(d / name, format="PNG" if name.endswith(".png") else "JPEG", quality=90)
    (root / "val" / "README.txt").write_text("not an image folder\n")
    return root


@pytest.fixture
def corrupt_root(imagenet_root, tmp_path):
    root = tmp_path / "imagenet_bad"
    shutil.copytree(imagenet_root, root)
    (root / "val" / W2 / "ILSVRC2012_val_00000004.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated, not a JPEG")
    return root


def test_imagenet_folder_eval(tiny_model, tiny_ckpt, imagenet_root, tmp_path):
    pred = tmp_path / "pred.csv"
    rc = run_cli("--model", tiny_model, "--ckpt", tiny_ckpt, "--data", imagenet_root, "--batch-size", 3,
                 "--mode", "graph", "--output", tmp_path / "run", "--save-predictions", pred)
    assert rc == 0
    res = read_json(tmp_path / "run" / "result.json")
    # 7 images in batches of 3: the partial last batch (1 image) is counted
    assert res["num_images"] == 7 and res["skipped_images"] == 0
    assert res["model"] == tiny_model and res["checkpoint"] == str(tiny_ckpt)
    assert res["data"] == os.path.join(str(imagenet_root), "val") and res["mode"] == "graph"

    header, rows = read_csv(pred)
    assert header == CSV_HEADER
    assert [r[0] for r in rows] == EXPECTED_PATHS  # relative to the data root, in dataset order
    assert [int(r[1]) for r in rows] == EXPECTED_LABELS
    preds, _ = check_prediction_rows(rows, 1000)

    # the same images and weights evaluated directly
    cfg = get_data_config(tiny_model)
    t = build_eval_transform(cfg["input_size"], cfg["mean"], cfg["std"], cfg["crop_pct"], cfg["interpolation"])
    x = np.stack([t(Image.open(os.path.join(imagenet_root, p))) for p in EXPECTED_PATHS])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    logits = predict(create_model(tiny_model, checkpoint=str(tiny_ckpt)), x, 3)
    assert (preds[:, 0] == logits.argmax(axis=1)).all()
    labels = np.asarray(EXPECTED_LABELS)
    assert res["top1"] == pytest.approx(100.0 * (logits.argmax(axis=1) == labels).mean())


def test_imagenet_max_images_and_random_weights_warning(tiny_model, imagenet_root, tmp_path, capsys):
    rc = run_cli("--model", tiny_model, "--data", imagenet_root, "--batch-size", 2, "--max-images", 4,
                 "--mode", "pynative", "--output", tmp_path / "out", "--save-predictions", tmp_path / "p.csv")
    assert rc == 0
    assert "random weights" in capsys.readouterr().err
    res = read_json(tmp_path / "out" / "result.json")
    assert res["num_images"] == 4 and res["checkpoint"] is None
    assert [r[0] for r in read_csv(tmp_path / "p.csv")[1]] == EXPECTED_PATHS[:4]


def test_corrupt_image_fails_naming_the_file(tiny_model, corrupt_root, tmp_path, capsys):
    rc = run_cli("--model", tiny_model, "--data", corrupt_root, "--batch-size", 3, "--mode", "pynative",
                 "--output", tmp_path / "out")
    assert rc == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "ILSVRC2012_val_00000004.JPEG" in err[0], err
    assert not (tmp_path / "out").exists()


def test_corrupt_image_skipped_and_counted(tiny_model, corrupt_root, tmp_path, capsys):
    pred = tmp_path / "pred.csv"
    rc = run_cli("--model", tiny_model, "--data", corrupt_root, "--batch-size", 3, "--mode", "pynative",
                 "--skip-bad-images", "--output", tmp_path / "out", "--save-predictions", pred)
    assert rc == 0
    assert "ILSVRC2012_val_00000004.JPEG" in capsys.readouterr().err  # the warning names it
    res = read_json(tmp_path / "out" / "result.json")
    assert res["skipped_images"] == 1 and res["num_images"] == 7
    assert [r[0] for r in read_csv(pred)[1]] == EXPECTED_PATHS


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("text,expect", [
    ("model: deit_fmnist\nbogus_key: 3\n", "unknown key 'bogus_key'"),
    ("batch_size: big\n", "key 'batch_size' expects int"),
    ("mode: fast\n", "key 'mode' is 'fast'"),
    ("model: [deit_fmnist\n", "not valid YAML"),
    ("- model\n- deit_fmnist\n", "flat mapping"),
])
def test_bad_config_file(text, expect, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    assert run_cli("--config", path, "--output", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0] and expect in err[0], err
    assert not (tmp_path / "out").exists()


def test_missing_config_file(tmp_path, capsys):
    assert run_cli("--config", tmp_path / "nope.yaml") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "nope.yaml" in err[0] and "not found" in err[0]


@pytest.mark.parametrize("args", [["--mode", "fast"], ["--device-target", "TPU"], ["--batch-size", "big"],
                                  ["--no-such-flag"]])
def test_bad_flags_exit_2(args, capsys):
    assert eval_script.cli(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error:"), err  # one line, no usage text


@pytest.mark.parametrize("args,expect", [
    (["--batch-size", "0"], "key 'batch_size' is 0; expected a value from 1 to 65536"),
    (["--max-images", "-5"], "key 'max_images' is -5; expected a value >= 1"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--model", "deit_tiny_patch16_224", "--data", "{missing}"], "no such directory"),
])
def test_bad_values_exit_2(args, expect, tmp_path, capsys):
    args = [a.format(missing=tmp_path / "missing") for a in args]
    assert run_cli(*args, "--output", tmp_path / "out") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and expect in err[0], err


def test_model_and_data_mismatch(tiny_model, imagenet_root, tmp_path, capsys):
    assert run_cli("--model", "deit_fmnist", "--data", imagenet_root, "--output", tmp_path / "out") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and "deit_fmnist" in err[0] and "ImageNet" in err[0], err
    assert run_cli("--model", tiny_model, "--data", "embedded", "--output", tmp_path / "out") == 2
    err = error_lines(capsys.readouterr().err)
    assert len(err) == 1 and tiny_model in err[0] and "--data" in err[0], err
    assert not (tmp_path / "result.json").exists()


def test_cli_subprocess_one_error_line(tmp_path):
    cfg = tmp_path / "typo.yaml"
    cfg.write_text("model: deit_fmnist\nbatchsize: 10\n")
    env = dict(os.environ, GLOG_v="3")
    env.pop("VTPTQ_DEBUG", None)
    r = subprocess.run([sys.executable, "eval.py", "--config", str(cfg), "--output", str(tmp_path / "o")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "typo.yaml" in lines[0] and "batchsize" in lines[0]
    assert "Traceback" not in r.stderr + r.stdout


# ----------------------------------------------------------------------------- configs/

CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))


QUANT_CONFIGS = ([f"deit_fmnist_{m}_w{b}a{b}.yaml" for m in ("minmax", "percentile", "easyquant") for b in (8, 4)]
                 + [f"deit_{s}_{m}_w{b}a{b}.yaml" for s in ("small", "base") for m in ("percentile", "easyquant")
                    for b in (8, 6)]
                 + [f"deit_{s}_vtptq_{t}.yaml" for s in ("small", "base") for t in ("w6a6", "w8a8", "6MP", "8MP")]
                 + [f"vit_{s}_384_vtptq_{t}.yaml" for s in ("base", "large") for t in ("6MP", "8MP")]
                 + ["deit_base_vtptq_4MP.yaml"]
                 + [f"vit_base_384_ablation_{r}.yaml" for r in ("similarity", "ranking", "biascorr", "both", "mp_only")])


def test_every_paper_row_has_a_config():
    import csv
    with open(os.path.join(REPO, "scripts", "paper_results.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    names = {os.path.splitext(os.path.basename(p))[0] for p in CONFIGS}
    assert rows and all(r["config"] in names and float(r["paper_top1"]) > 0 for r in rows)


def test_expected_configs_exist():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"deit_fmnist_fp.yaml", "deit_tiny_fp.yaml", "deit_small_fp.yaml", "deit_base_fp.yaml",
            "vit_base_384_fp.yaml", "vit_large_384_fp.yaml"} <= names
    assert set(QUANT_CONFIGS) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_files_load(path):
    cfg = load_yaml(path)
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("#")  # what it does and how to run it
    assert f"configs/{os.path.basename(path)}" in text
    assert cfg.get("model") in list_models() and cfg.get("name")
    if get_data_config(cfg["model"])["dataset"] == "imagenet":
        # no placeholder default: the data root and the weights must be given
        assert "data" not in cfg and "ckpt" not in cfg
        assert "--data" in text and "--ckpt" in text
    assert cfg["name"] == os.path.splitext(os.path.basename(path))[0]
    script = quant_script if "method" in cfg else eval_script
    resolved = resolve(script.build_parser().parse_args(["--config", path]))
    assert resolved["model"] == cfg["model"]
    if "method" in cfg:  # a quant.py config: the name says the method and the bit widths / MP target
        if "ablation" not in cfg["name"]:
            tag = cfg["mp_target"] if cfg.get("mixed_precision") else f"w{cfg['w_bits']}a{cfg['a_bits']}"
            assert f"_{cfg['method']}_{tag}" in cfg["name"]
        assert f"configs/{os.path.basename(path)}" in text and "quant.py" in text
        assert resolved["calib_num"] == cfg["calib_num"]


# ----------------------------------------------------------------------------- scripts/

BASH = shutil.which("bash")


def run_script(name, *args, **env):
    return subprocess.run([BASH, os.path.join(REPO, "scripts", name), *[str(a) for a in args]],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **env))


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("script,device", [("run_eval_cpu.sh", "CPU"), ("run_eval_gpu.sh", "GPU"),
                                           ("run_eval_ascend.sh", "Ascend")])
def test_run_script_usage(script, device, tmp_path):
    r = run_script(script)
    assert r.returncode != 0 and "usage:" in r.stderr and device in r.stderr
    r = run_script(script, tmp_path / "missing.yaml")
    assert r.returncode != 0 and "usage:" in r.stderr and "missing.yaml" in r.stderr
    cfg = os.path.join(REPO, "configs", "deit_fmnist_fp.yaml")
    r = run_script(script, cfg, tmp_path / "no_data_root")
    assert r.returncode != 0 and "no_data_root" in r.stderr
    r = run_script(script, cfg, "embedded", tmp_path / "no.ckpt")
    assert r.returncode != 0 and "no.ckpt" in r.stderr


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_run_script_cpu_end_to_end(tmp_path):
    logs = tmp_path / "logs"
    r = run_script("run_eval_cpu.sh", os.path.join(REPO, "configs", "deit_fmnist_fp.yaml"), "embedded",
                   "--max-images", 20, "--mode", "pynative", "--output", tmp_path / "out",
                   EVAL_LOG_DIR=str(logs), GLOG_v="3")
    assert r.returncode == 0, r.stdout + r.stderr
    res = read_json(tmp_path / "out" / "result.json")
    assert res["num_images"] == 20 and res["device_target"] == "CPU"
    log = glob.glob(str(logs / "eval_deit_fmnist_fp_*.log"))
    assert len(log) == 1
    with open(log[0], encoding="utf-8") as f:
        assert "top-1" in f.read()


@pytest.mark.skipif(BASH is None, reason="needs bash")
@pytest.mark.parametrize("script,device", [("run_quant_cpu.sh", "CPU"), ("run_quant_gpu.sh", "GPU"),
                                           ("run_quant_ascend.sh", "Ascend")])
def test_run_quant_script_usage(script, device, tmp_path):
    r = run_script(script)
    assert r.returncode != 0 and "usage:" in r.stderr and device in r.stderr and "quant.py" in r.stderr
    r = run_script(script, tmp_path / "missing.yaml")
    assert r.returncode != 0 and "usage:" in r.stderr and "missing.yaml" in r.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.skipif(BASH is None, reason="needs bash")
def test_run_quant_script_cpu_end_to_end(tmp_path):
    logs = tmp_path / "logs"
    r = run_script("run_quant_cpu.sh", os.path.join(REPO, "configs", "deit_fmnist_minmax_w8a8.yaml"), "embedded",
                   "--max-images", 20, "--calib-num", 4, "--mode", "pynative", "--output", tmp_path / "out",
                   QUANT_LOG_DIR=str(logs), GLOG_v="3")
    assert r.returncode == 0, r.stdout + r.stderr
    res = read_json(tmp_path / "out" / "result.json")
    assert res["num_images"] == 20 and res["device_target"] == "CPU"
    assert res["method"] == "minmax" and res["w_bits"] == 8 and res["calib_num"] == 4
    log = glob.glob(str(logs / "quant_deit_fmnist_minmax_w8a8_*.log"))
    assert len(log) == 1
    with open(log[0], encoding="utf-8") as f:
        assert "quant.py" in f.read()
