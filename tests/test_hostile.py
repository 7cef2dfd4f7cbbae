"""Hostile input and faults: every class of bad input or fault gives one line, a non-zero exit,
no traceback, no temporary left behind and no file lost or mixed between runs.

Categories (issue #11): output folders, temporary files, file-system errors, memory attacks
through images, validation before work, checkpoint metadata, YAML, devices, usage errors,
failures known in advance, Ctrl-C. Kept fast: the embedded model on a few images or a tiny
registered ViT; the file-system faults use a small tmpfs (skipped where it cannot be mounted).
"""
import contextlib
import importlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import yaml
from PIL import Image
from _helpers import randomize, registered_vit

import mindspore as ms
from mindspore import Tensor

from src import run_folder, utils
from src.config import ConfigError, defaults, load_yaml
from src.data.imagenet import MAX_RESIZED_PIXELS, ImageSizeError, build_eval_transform
from src.models import create_model
from src.quant import calibrate_model, quantize_model, save_quantized_checkpoint
from src.quant.convert import META_KEY
from src.run_folder import RunOutput
from src.utils import atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
eval_script = importlib.import_module("eval")
quant_script = importlib.import_module("quant")
export_script = importlib.import_module("export")

TINY = "_test_hostile_tiny_vit"
TINY_CFG = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=1, num_heads=2)
QUICK = ["--max-images", "20", "--batch-size", "20", "--calib-num", "4", "--calib-batch-size", "4"]
W0 = "n01440764"


@pytest.fixture(scope="module", autouse=True)
def restore_mode():
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


@pytest.fixture(scope="module")
def tiny():
    with registered_vit(TINY, TINY_CFG):
        yield TINY


def one_error_line(capsys):
    """stderr of the last call: exactly one line, 'error: ...' (progress lines aside); returns it."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines()
             if ln.strip() and not ln.startswith(("FP eval", "eval", "warning:", "calibrating", " "))]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def leftovers(folder):
    """Names under `folder` (recursively) that look like temporaries."""
    found = []
    for root, dirs, files in os.walk(folder):
        found += [os.path.join(root, n) for n in dirs + files if "tmp" in n]
    return found


def read_yaml(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


@contextlib.contextmanager
def tmpfs(path, size="64k", read_only=False):
    """A small tmpfs at `path` (skips the test where mounting is not allowed)."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if read_only else "")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode(errors='replace').strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], capture_output=True)


def tiny_quantized_ckpt(path, tiny_name):
    model = randomize(create_model(tiny_name), 0)
    cfg = dict(defaults(), w_bits=8, a_bits=8)
    quantize_model(model, cfg)
    calibrate_model(model, np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32), cfg,
                    log=io.StringIO())
    save_quantized_checkpoint(model, str(path), tiny_name)
    return path


def rewrite_meta(src, dst, meta_bytes):
    """Copy of a quantized checkpoint with its quant_meta entry replaced by `meta_bytes`."""
    params = ms.load_checkpoint(str(src))
    entries = [{"name": k, "data": Tensor(v.asnumpy())} for k, v in params.items() if k != META_KEY]
    entries.append({"name": META_KEY, "data": Tensor(np.frombuffer(meta_bytes, np.uint8))})
    ms.save_checkpoint(entries, str(dst))
    return dst


# ----------------------------------------------------------------------------- 1. output folders

def test_failed_rerun_leaves_folder_and_keeps_checkpoint(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert quant_script.cli([*QUICK, "--w-bits", "8", "--a-bits", "8", "--output", str(out)]) == 0
    before = {n: (out / n).read_bytes() for n in os.listdir(out)}
    assert set(before) == {"config.yaml", "quantized.ckpt", "result.json", run_folder.RUN_MANIFEST}
    capsys.readouterr()
    (tmp_path / "run.failed").mkdir()  # a folder of the user's where the failed run would go: kept
    (tmp_path / "run.failed" / "notes.txt").write_text("mine")

    import src.sharded as dist
    real = dist.evaluate_sharded

    def failing(model, dataset, *a, desc="eval", **kw):
        if desc == "quantized eval":
            raise ValueError("planted failure after the checkpoint")
        return real(model, dataset, *a, desc=desc, **kw)
    monkeypatch.setattr(dist, "evaluate_sharded", failing)
    assert quant_script.cli([*QUICK, "--w-bits", "4", "--a-bits", "4", "--output", str(out)]) == 2
    line = one_error_line(capsys)
    failed = tmp_path / "run.failed.2"
    assert "planted failure" in line and str(failed) in line and "quantized.ckpt" in line
    assert os.listdir(tmp_path / "run.failed") == ["notes.txt"]
    # the folder still describes the first run, byte for byte; the failed run's checkpoint is kept aside
    assert {n: (out / n).read_bytes() for n in os.listdir(out)} == before
    assert read_yaml(out / "config.yaml")["w_bits"] == 8
    assert (failed / "quantized.ckpt").is_file() and read_yaml(failed / "config.yaml")["w_bits"] == 4
    assert not leftovers(tmp_path)


def test_rerun_replaces_the_whole_folder(tmp_path):
    out = tmp_path / "run"
    assert eval_script.cli(["--max-images", "10", "--output", str(out), "--save-predictions",
                            str(out / "p.csv")]) == 0
    manifest = json.loads((out / run_folder.RUN_MANIFEST).read_text())
    assert manifest["marker"] == run_folder.RUN_MARKER and sorted(manifest["files"]) == ["config.yaml", "p.csv", "result.json"]
    (out / "quantized.onnx").write_bytes(b"an export of the run")
    run_folder.record_in_run_folder(str(out / "quantized.onnx"))  # as export.py does for its default output
    assert eval_script.cli(["--max-images", "12", "--output", str(out), "--save-predictions",
                            str(out / "p.csv")]) == 0
    assert sorted(os.listdir(out)) == ["config.yaml", "p.csv", "result.json", run_folder.RUN_MANIFEST]
    assert json.loads((out / "result.json").read_text())["num_images"] == 12
    assert len((out / "p.csv").read_text().splitlines()) == 13
    assert not leftovers(tmp_path)


def _tree(folder):
    """{relative path: bytes (None for a folder), links as ('link', target)} of everything under `folder`."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            if os.path.islink(p):
                out[rel] = ("link", os.readlink(p))
            elif os.path.isdir(p):
                out[rel] = None
            else:
                with open(p, "rb") as f:
                    out[rel] = f.read()
    return out


def _earlier_run(out):
    assert eval_script.cli(["--max-images", "5", "--output", str(out)]) == 0


RUN_CASES = ("file added to a run", "folder added to a run", "file of a run changed", "forged manifest",
             "manifest lists a link")


@pytest.mark.parametrize("case, words", [
    ("thesis", "holds 'thesis.tex', which is not a file of an earlier run"),
    ("config named like ours", "holds 'src', which is not a file of an earlier run"),  # issue #21: all deleted
    ("non-JSON result", "holds 'precious.txt', which is not a file of an earlier run"),
    ("legacy config only", "holds no run_manifest.json and no config.yaml or result.json of an earlier run"),
    ("file added to a run", "holds 'thesis.tex', which is not a file of the earlier run (not in its run_manifest"),
    ("folder added to a run", "holds 'src', which is not a file of the earlier run"),
    ("file of a run changed", "holds 'config.yaml', changed since the earlier run wrote it"),
    ("forged manifest", "run_manifest.json is not a manifest of this project's runs"),
    ("manifest lists a link", "holds 'result.json', which is not a file of the earlier run"),
])
def test_folder_of_other_files_is_never_replaced(tmp_path, capsys, case, words):
    out = tmp_path / "d"
    if case in RUN_CASES:
        _earlier_run(out)
        capsys.readouterr()
    else:
        out.mkdir()
    if case in ("thesis", "file added to a run"):
        (out / "thesis.tex").write_text("precious")
    elif case == "config named like ours":
        (out / "config.yaml").write_text("app: x\n")
        (out / "thesis.tex").write_text("precious")
        (out / "src").mkdir()
        (out / "src" / "main.c").write_text("int main;")
    elif case == "non-JSON result":
        (out / "result.json").write_text("not json")
        (out / "precious.txt").write_text("precious")
    elif case == "legacy config only":
        (out / "config.yaml").write_text("app: x\n")
    elif case == "folder added to a run":
        (out / "src").mkdir()
    elif case == "file of a run changed":
        with open(out / "config.yaml", "a") as f:
            f.write("# my notes\n")
    elif case == "forged manifest":
        (out / run_folder.RUN_MANIFEST).write_text(json.dumps({"marker": "x", "files": {"thesis.tex": {}}}))
        (out / "thesis.tex").write_text("precious")
    elif case == "manifest lists a link":
        (tmp_path / "victim").write_bytes((out / "result.json").read_bytes())
        os.remove(out / "result.json")
        os.symlink(tmp_path / "victim", out / "result.json")
    before = _tree(out)
    assert eval_script.cli(["--max-images", "5", "--output", str(out)]) == 2
    line = one_error_line(capsys)
    assert words in line and "nothing was replaced" in line, line
    assert _tree(out) == before and not leftovers(tmp_path)


def test_export_into_a_run_folder_joins_its_manifest(tiny, tmp_path):
    out = tmp_path / "run"
    with RunOutput(out) as run:
        tiny_quantized_ckpt(run.path("quantized.ckpt"), tiny)
    assert export_script.cli(["--ckpt", str(out / "quantized.ckpt"), "--format", "onnx"]) == 0  # default: beside it
    assert "quantized.onnx" in json.loads((out / run_folder.RUN_MANIFEST).read_text())["files"]
    with RunOutput(out) as run:  # the next run replaces the export with the rest
        atomic_write_text(run.path("config.yaml"), "model: x\n")
    assert sorted(os.listdir(out)) == ["config.yaml", run_folder.RUN_MANIFEST] and not leftovers(tmp_path)


def test_foreign_file_added_during_the_run_is_kept(tmp_path):
    """DIR is checked again just before the swap: a file put there while the run ran stays,
    and the run is kept in DIR.failed/."""
    out = tmp_path / "run"
    with RunOutput(out) as run:
        atomic_write_text(run.path("config.yaml"), "model: x\n")
    with pytest.raises(utils.UserError, match="holds 'late.txt'") as e:
        with RunOutput(out) as run:
            utils.atomic_write_json(run.path("result.json"), {"model": "x"})
            (out / "late.txt").write_text("written while the run ran")
    assert "kept in" in str(e.value.__notes__)
    assert sorted(os.listdir(out)) == ["config.yaml", "late.txt", run_folder.RUN_MANIFEST]
    assert sorted(os.listdir(tmp_path / "run.failed")) == ["result.json", run_folder.RUN_MANIFEST]
    assert sorted(os.listdir(tmp_path)) == ["run", "run.failed"]


def test_folder_of_an_earlier_run_without_manifest_is_replaced(tmp_path):
    """A run folder written before the manifest existed: only files of the known names, with a
    config.yaml of config keys (or a result.json of a result)."""
    out = tmp_path / "old"
    _earlier_run(out)
    os.remove(out / run_folder.RUN_MANIFEST)
    (out / "quantized.onnx").write_bytes(b"an export")
    assert eval_script.cli(["--max-images", "6", "--output", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["config.yaml", "result.json", run_folder.RUN_MANIFEST]
    assert json.loads((out / "result.json").read_text())["num_images"] == 6


def test_output_inside_the_data_root_is_refused(tmp_path, thin_jpeg_root, rgb_vit, capsys):
    args = ["--model", rgb_vit, "--data", str(thin_jpeg_root), "--skip-bad-images"]
    for flags in (["--output", str(thin_jpeg_root / "val" / "out")],
                  ["--output", str(thin_jpeg_root)],
                  ["--output", str(tmp_path / "o"), "--save-predictions", str(thin_jpeg_root / "val" / "x" / "p.csv")]):
        assert eval_script.cli([*args, *flags]) == 2
        assert "inside the data root" in one_error_line(capsys)
    assert quant_script.cli([*args, "--output", str(thin_jpeg_root / "val" / "out")]) == 2
    assert "inside the data root" in one_error_line(capsys)
    assert sorted(os.listdir(thin_jpeg_root / "val")) == [W0] and not (tmp_path / "o").exists()


def test_output_holding_the_checkpoint_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = tiny_quantized_ckpt(out / "quantized.ckpt", tiny)
    before = _tree(out)
    assert eval_script.cli(["--ckpt", str(ckpt), "--output", str(out)]) == 2
    assert "holds the --ckpt" in one_error_line(capsys)
    assert _tree(out) == before


def _staging(parent, base, suffix, pid, age=60):
    d = parent / f".{base}.{suffix}.tmp"
    d.mkdir()
    (d / "config.yaml").write_text("model: x\n")
    (d / ".vtptq_staging").write_text(f"project=vtptq pid={pid} host={socket.gethostname()}\n")
    os.utime(d, (time.time() - age, time.time() - age))
    return d


def test_stale_staging_folders_are_removed_at_the_next_run(tmp_path, capsys):
    import fcntl
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = _staging(tmp_path, "run", "abcdefgh", dead.pid)
    live = _staging(tmp_path, "run", "livelive", os.getpid())  # a run in progress: locked, its process alive
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    other = tmp_path / ".run.12345678.tmp"  # no marker: not a staging folder of this project
    other.mkdir()
    (other / "keep.txt").write_text("x")
    os.utime(other, (time.time() - 60, time.time() - 60))
    young = _staging(tmp_path, "run", "youngone", dead.pid, age=-60)  # newer than the run: left alone
    try:
        assert eval_script.cli(["--max-images", "5", "--output", str(tmp_path / "run")]) == 0
    finally:
        os.close(fd)
    assert f"removed {stale}" in capsys.readouterr().err
    assert not stale.exists() and live.exists() and other.exists() and young.exists()


def test_staging_folder_of_a_killed_run_is_removed(tmp_path):
    """SIGKILL during the work (no `finally` runs): the run's reaper removes its staging folder."""
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "quant.py", "--calib-num", "8", "--output", str(out)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1"))
    try:
        for line in p.stdout:
            if line.startswith("deit_fmnist_minmax_w8a8:"):
                break
        assert [n for n in os.listdir(tmp_path) if n.startswith(".run.")]  # the run's staging folder
        p.send_signal(signal.SIGKILL)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    deadline = time.time() + 20
    while os.listdir(tmp_path) and time.time() < deadline:
        time.sleep(0.1)
    assert os.listdir(tmp_path) == [] and "error" not in err  # single process: removed without a word


def test_run_output_of_a_non_writing_rank_creates_nothing(tmp_path):
    with RunOutput(tmp_path / "x", enabled=False) as out:
        assert out.path("result.json") == str(tmp_path / "x" / "result.json")
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 2. temporary files

def test_planted_links_are_never_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    folder = tmp_path / "out"
    folder.mkdir()
    # a link at the old predictable temporary name and one at the destination itself
    os.symlink(victim, folder / f".config.yaml.tmp{os.getpid()}")
    os.symlink(victim, folder / "result.json")
    atomic_write_text(str(folder / "config.yaml"), "a: 1\n")
    utils.atomic_write_json(str(folder / "result.json"), {"b": 2})
    utils.save_checkpoint_atomic([{"name": "w", "data": Tensor(np.ones(2, np.float32))}], str(folder / "m.ckpt"))
    assert victim.read_text() == "keep me"
    assert not os.path.islink(folder / "result.json") and json.loads((folder / "result.json").read_text()) == {"b": 2}
    assert sorted(os.listdir(folder)) == [f".config.yaml.tmp{os.getpid()}", "config.yaml", "m.ckpt", "result.json"]


def test_temporary_names_are_unpredictable_and_private(tmp_path, monkeypatch):
    seen = []
    real = os.replace

    def spy(a, b):
        seen.append((os.path.basename(a), os.stat(a).st_mode & 0o777))
        return real(a, b)
    monkeypatch.setattr(os, "replace", spy)
    for _ in range(2):
        atomic_write_text(str(tmp_path / "f.txt"), "x")
    names = [n for n, _ in seen]
    assert names[0] != names[1] and all(n.startswith(".f.txt.") for n in names)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o666 & ~umask  # ordinary once in place


# ----------------------------------------------------------------------------- 3. file-system errors

def test_output_path_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    assert eval_script.cli(["--max-images", "5", "--output", str(f)]) == 2
    assert "exists and is not a folder" in one_error_line(capsys)
    assert f.read_text() == "x"


def test_read_only_file_system(tmp_path, capsys):
    with tmpfs(tmp_path / "ro", read_only=True) as ro:
        assert eval_script.cli(["--max-images", "5", "--output", str(ro / "out")]) == 1
        line = one_error_line(capsys)
        assert str(ro / "out") in line and "Read-only file system" in line
        assert eval_script.cli(["--max-images", "5", "--output", str(tmp_path / "o"),
                                "--save-predictions", str(ro / "p.csv")]) == 2
        assert "not writable" in one_error_line(capsys)
        assert os.listdir(ro) == []
    assert not (tmp_path / "o").exists()


def test_full_disk_names_the_file_and_leaves_nothing(tmp_path, capsys):
    with tmpfs(tmp_path / "full", size="16k") as full:
        rc = quant_script.cli([*QUICK, "--output", str(full / "out")])
        assert rc == 1
        line = one_error_line(capsys)
        assert str(full / "out" / "quantized.ckpt") in line and "No space left on device" in line
        assert os.listdir(full) == []


@pytest.mark.parametrize("fmt", ["onnx", "mindir"])
def test_export_to_a_full_disk_names_the_file(tiny, tmp_path, capsys, fmt):
    ckpt = tiny_quantized_ckpt(tmp_path / "q.ckpt", tiny)
    with tmpfs(tmp_path / "full", size="8k") as full:
        assert export_script.cli(["--ckpt", str(ckpt), "--format", fmt, "--output", str(full / f"m.{fmt}")]) == 1
        line = one_error_line(capsys)
        assert f"{full / f'm.{fmt}'}: No space left on device" in line
        assert os.listdir(full) == []


def test_predictions_destination_checked_before_work(tmp_path, capsys):
    assert eval_script.cli(["--output", str(tmp_path / "o"), "--save-predictions", str(tmp_path)]) == 2
    assert "is a folder" in one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_failed_predictions_keep_the_result(tmp_path, capsys, monkeypatch):
    import errno
    import src.engine as engine

    def full_disk(path, predictions):
        raise OSError(errno.ENOSPC, "No space left on device", path)
    monkeypatch.setattr(engine, "write_predictions_csv", full_disk)
    out = tmp_path / "run"
    assert eval_script.cli(["--max-images", "10", "--output", str(out), "--save-predictions",
                            str(tmp_path / "p.csv")]) == 1
    line = one_error_line(capsys)
    assert str(tmp_path / "p.csv") in line and "result.json" in line and "run.failed" in line
    assert json.loads((tmp_path / "run.failed" / "result.json").read_text())["num_images"] == 10
    assert not out.exists() and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- 4. memory attacks

def test_resize_of_extreme_image_is_bounded():
    t = build_eval_transform((3, 224, 224), (0.5,) * 3, (0.5,) * 3)
    with pytest.raises(ImageSizeError, match="over the bound"):
        t(Image.new("RGB", (30000, 1)))
    assert 2 * 256 * 256 < MAX_RESIZED_PIXELS  # ordinary images pass
    assert t(Image.new("RGB", (500, 375))).shape == (3, 224, 224)


@pytest.fixture()
def thin_jpeg_root(tmp_path):
    d = tmp_path / "imnet" / "val" / W0
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(d / "good.JPEG")
    Image.new("RGB", (30000, 1)).save(d / "thin.JPEG")
    assert (d / "thin.JPEG").stat().st_size < 20000
    return tmp_path / "imnet"


def test_thin_jpeg_is_skipped_or_one_line(tmp_path, thin_jpeg_root, capsys):
    with registered_vit("_hostile_rgb_vit", dict(img_size=32, patch_size=8, num_classes=1000, embed_dim=16, depth=1,
                                                 num_heads=2),
                        dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875,
                             interpolation="bicubic", dataset="imagenet")) as name:
        args = ["--model", name, "--data", str(thin_jpeg_root), "--batch-size", "2", "--mode", "pynative"]
        assert eval_script.cli([*args, "--output", str(tmp_path / "a")]) == 2
        line = one_error_line(capsys)
        assert "thin.JPEG" in line and "over the bound" in line
        assert eval_script.cli([*args, "--skip-bad-images", "--output", str(tmp_path / "b")]) == 0
        res = json.loads((tmp_path / "b" / "result.json").read_text())
        assert res["num_images"] == 1 and res["skipped_images"] == 1


@pytest.fixture()
def rgb_vit():
    with registered_vit("_hostile_rgb_vit", dict(img_size=32, patch_size=8, num_classes=1000, embed_dim=16, depth=1,
                                                 num_heads=2),
                        dict(input_size=(3, 32, 32), mean=(0.5,) * 3, std=(0.5,) * 3, crop_pct=0.875,
                             interpolation="bicubic", dataset="imagenet")) as name:
        yield name


def test_skip_bad_images_skips_unreadable_entries_of_any_kind(tmp_path, rgb_vit, capsys):
    val = tmp_path / "imnet" / "val"
    good = val / W0
    good.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), np.uint8)).save(good / f"good{i}.JPEG")
    os.symlink("loop.JPEG", good / "loop.JPEG")  # a link to itself
    os.symlink(tmp_path / "gone.JPEG", good / "dangling.JPEG")
    os.mkfifo(good / "fifo.JPEG")  # not a regular file: never opened (open() would block)
    os.symlink("n01443537", val / "n01443537")  # a class folder that is a link loop
    os.symlink("a", val / "b")
    os.symlink("b", val / "a")  # a loop of two links
    (val / "n01484850").mkdir()
    os.symlink(val / "n01484850", val / "n01484850" / "n01484850")  # a folder that holds itself: not followed
    args = ["--model", rgb_vit, "--data", str(tmp_path / "imnet"), "--batch-size", "2", "--mode", "pynative"]
    assert eval_script.cli([*args, "--output", str(tmp_path / "a")]) == 2
    line = one_error_line(capsys)
    assert "Too many levels of symbolic links" in line and "--skip-bad-images skips it" in line
    assert eval_script.cli([*args, "--skip-bad-images", "--output", str(tmp_path / "b")]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and "n01443537" in err
    res = json.loads((tmp_path / "b" / "result.json").read_text())
    assert res["num_images"] == 3 and res["skipped_images"] == 2  # the two image entries that cannot be read


def test_crop_pct_is_range_checked(capsys):
    assert eval_script.cli(["--crop-pct", "1e-6"]) == 2
    assert "crop_pct" in one_error_line(capsys)


# ----------------------------------------------------------------------------- 5. validation before work

@pytest.mark.parametrize("flags, words", [
    (["--percentile", "0"], "percentile"), (["--percentile", "nan"], "finite"), (["--percentile", "inf"], "finite"),
    (["--percentile", "100.5"], "percentile"), (["--search-alpha", "0", "--search-beta", "0"], "search_alpha"),
    (["--search-alpha", "1.2", "--search-beta", "0.5"], "below search_beta"),
    (["--ranking-gamma", "nan"], "finite"), (["--batch-size", "100000000"], "batch_size"),
    (["--num-workers", "100000"], "num_workers"), (["--search-candidates", "10000000"], "search_candidates"),
    (["--seed", "-1"], "seed"), (["--fp-result", "{list_json}"], "not the result.json"),
    (["--calib-num", "1000000000000"], "key 'calib_num' is 1000000000000; expected a value from 1"),
])
def test_bad_values_fail_before_any_work(flags, words, tmp_path, capsys, monkeypatch):
    import src.sharded as dist
    (tmp_path / "list.json").write_text("[1, 2]")
    flags = [f.format(list_json=tmp_path / "list.json") for f in flags]
    monkeypatch.setattr(dist, "evaluate_sharded", lambda *a, **k: pytest.fail("evaluation started"))
    assert quant_script.cli(flags) == 2
    assert words in one_error_line(capsys)


def test_yaml_non_finite_value(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("percentile: .nan\n")
    with pytest.raises(ConfigError, match="finite"):
        load_yaml(str(p))


# ----------------------------------------------------------------------------- 6. checkpoints

@pytest.mark.parametrize("edit, words", [
    (lambda m: m.pop("layers"), "'layers'"),
    (lambda m: m.update(num_classes="10"), "'num_classes'"),
    (lambda m: m.update(num_classes=True), "'num_classes'"),
    (lambda m: m["layers"][next(iter(m["layers"]))]["a"].update(bits="8"), ".a.bits"),
    (lambda m: m["packed_weights"][next(iter(m["packed_weights"]))].update(shape=[-1]), ".shape"),
    (lambda m: m["packed_weights"][next(iter(m["packed_weights"]))].update(shape=[100000, 100000, 100000]),
     ".shape is [100000, 100000, 100000]; layer"),
    (lambda m: m["layers"][next(iter(m["layers"]))]["a"].update(kind="bogus"), ".a.kind is 'bogus'; expected one of"),
    (lambda m: m.update(num_classes=10 ** 15), "'num_classes' is 1000000000000000; expected an integer from 1 to"),
    (lambda m: m.update(num_classes=100000), "'num_classes' is 100000 but 'head.bias' has 10 rows"),
    ("list", "JSON object"),
    ("garbage", "not UTF-8 JSON"),
])
def test_bad_quant_meta_is_one_line(tiny, tmp_path, capsys, edit, words):
    good = tiny_quantized_ckpt(tmp_path / "good.ckpt", tiny)
    meta = json.loads(ms.load_checkpoint(str(good))[META_KEY].asnumpy().tobytes())
    if edit == "list":
        raw = json.dumps([meta]).encode()
    elif edit == "garbage":
        raw = b"\xff\xfe{not json"
    else:
        edit(meta)
        raw = json.dumps(meta).encode()
    bad = rewrite_meta(good, tmp_path / "bad.ckpt", raw)
    assert eval_script.cli(["--ckpt", str(bad), "--output", str(tmp_path / "e")]) == 2
    line = one_error_line(capsys)
    assert words in line and str(bad) in line
    assert export_script.cli(["--ckpt", str(bad), "--format", "mindir"]) == 2
    assert words in one_error_line(capsys)
    assert not (tmp_path / "e").exists() and not (tmp_path / "bad.mindir").exists()


def rewrite_entry(src, dst, name, value):
    """Copy of a checkpoint with the entry `name` replaced by the numpy array `value`."""
    params = ms.load_checkpoint(str(src))
    entries = [{"name": k, "data": Tensor(value) if k == name else v} for k, v in params.items()]
    assert name in params
    ms.save_checkpoint(entries, str(dst))
    return dst


@pytest.mark.parametrize("which, words", [
    ("0-d w_scale", "w_scale' has shape (); expected one interval"),
    ("nan bias", "'blocks.0.mlp.fc1.bias' holds 1 NaN or infinite values (first nan at index [3])"),
])
def test_bad_quantized_entry_is_one_line(tiny, tmp_path, capsys, monkeypatch, which, words):
    import src.sharded as dist
    good = tiny_quantized_ckpt(tmp_path / "good.ckpt", tiny)
    params = ms.load_checkpoint(str(good))
    if which == "0-d w_scale":
        name = next(k for k in params if k.endswith(".w_scale"))
        value = np.array(0.05, np.float32)
    else:
        name = "blocks.0.mlp.fc1.bias"
        value = params[name].asnumpy().copy()
        value[3] = np.nan
    bad = rewrite_entry(good, tmp_path / "bad.ckpt", name, value)
    monkeypatch.setattr(dist, "evaluate_sharded", lambda *a, **k: pytest.fail("evaluation started"))
    assert eval_script.cli(["--ckpt", str(bad), "--output", str(tmp_path / "e")]) == 2
    line = one_error_line(capsys)
    assert words in line and str(bad) in line
    assert not (tmp_path / "e").exists() and not leftovers(tmp_path)


def write_safetensors(path, header, data=b"\0" * 40):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def entry(**over):
    return {"a": {"dtype": "F32", "shape": [10], "data_offsets": [0, 40], **over}}


@pytest.mark.parametrize("header, words", [
    ([1, 2], "the safetensors header is a JSON list; expected an object of tensor names"),
    (entry(data_offsets="0,40"), "tensor 'a': 'data_offsets' is '0,40'; expected [begin, end]"),
    (entry(shape=[10.0]), "tensor 'a': 'shape' is [10.0]; expected a list of at most 8 non-negative integers"),
    (entry(shape="ab"), "tensor 'a': 'shape' is 'ab'; expected a list"),
    (entry(shape=[-2, -5]), "tensor 'a': 'shape' is [-2, -5]; expected a list"),
    (entry(shape=[10 ** 9, 10 ** 9]), "tensor 'a': 'data_offsets' [0, 40] hold 40 bytes; dtype F32 and shape"),
    (entry(dtype=["F32"]), "tensor 'a': 'dtype' is ['F32']; expected one of"),
    ({"a": [1]}, "tensor 'a': 'entry' is [1]; expected a mapping"),
    (entry(data_offsets=[0, 40, 80]), "'data_offsets' is [0, 40, 80]"),
])
def test_bad_safetensors_header_is_one_line(tiny, tmp_path, capsys, header, words):
    bad = write_safetensors(tmp_path / "bad.safetensors", header)
    assert eval_script.cli(["--model", tiny, "--ckpt", str(bad), "--output", str(tmp_path / "e")]) == 2
    line = one_error_line(capsys)
    assert words in line and str(bad) in line, line
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("script", ["eval", "quant"])
def test_non_finite_weights_refused_at_load(tmp_path, capsys, monkeypatch, script):
    import src.sharded as dist
    from src.models.registry import default_checkpoint
    params = ms.load_checkpoint(default_checkpoint("deit_fmnist"))
    names = list(params)
    first, later = names[len(names) // 2], names[-3]
    entries = []
    for k, v in params.items():
        a = v.asnumpy().copy()
        if k == first:
            a.flat[1] = np.inf
        if k == later:
            a.flat[0] = np.nan
        entries.append({"name": k, "data": Tensor(a)})
    bad = tmp_path / "nan.ckpt"
    ms.save_checkpoint(entries, str(bad))
    monkeypatch.setattr(dist, "evaluate_sharded", lambda *a, **k: pytest.fail("evaluation started"))
    cli = eval_script.cli if script == "eval" else quant_script.cli
    assert cli(["--ckpt", str(bad), *QUICK[:4], "--output", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert str(bad) in line and f"'{first}' holds 1 NaN or infinite values (first inf" in line, line
    assert not (tmp_path / "o").exists() and not leftovers(tmp_path)


def test_not_a_checkpoint_is_one_line(tmp_path, capsys):
    junk = tmp_path / "junk.ckpt"
    junk.write_bytes(b"\x00" * 100)
    assert export_script.cli(["--ckpt", str(junk), "--format", "onnx"]) == 2
    assert "junk.ckpt" in one_error_line(capsys)


# ----------------------------------------------------------------------------- 7. YAML

def test_yaml_alias_bomb_refused_fast(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in "bcdefghi":
        prev = chr(ord(k) - 1)
        lines.append(f"{k}: &{k} [" + ",".join([f"*{prev}"] * 9) + "]")
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    t0 = time.time()
    assert eval_script.cli(["--config", str(p)]) == 2
    line = one_error_line(capsys)
    assert time.time() - t0 < 10 and "aliases" in line and len(line) < 300


def test_deeply_nested_yaml_is_one_line(tmp_path, capsys):
    p = tmp_path / "deep.yaml"
    p.write_text("model: " + "[" * 1200 + "]" * 1200 + "\n")
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)  # the parser's recursion runs out at this depth (as 5000 levels do by default)
    try:
        with pytest.raises(ConfigError, match="nested too deeply"):
            load_yaml(str(p))
    finally:
        sys.setrecursionlimit(limit)
    assert eval_script.cli(["--config", str(p)]) == 2  # whichever check stops it: one line
    assert "deep.yaml" in one_error_line(capsys)


@pytest.mark.parametrize("text, words", [
    ("w_bits: 8\nmethod: minmax\nw_bits: 4\n", "key 'w_bits' is given twice (lines 1 and 3)"),
    ("{a_bits: 8, a_bits: 4}\n", "key 'a_bits' is given twice (lines 1 and 1)"),
])
def test_duplicate_yaml_key_is_refused(tmp_path, capsys, text, words):
    p = tmp_path / "dup.yaml"
    p.write_text(text)
    assert quant_script.cli(["--config", str(p), "--output", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert words in line and str(p) in line
    assert not (tmp_path / "o").exists()


def test_long_values_are_shortened_in_errors(tmp_path, capsys):
    p = tmp_path / "long.yaml"
    p.write_text("model: [" + ",".join(["x" * 50] * 1000) + "]\n")
    assert eval_script.cli(["--config", str(p)]) == 2
    assert len(one_error_line(capsys)) < 300


# ----------------------------------------------------------------------------- 8. devices

@pytest.mark.skipif(ms.hal.is_available("GPU"), reason="this machine has a GPU")
def test_unavailable_device_is_one_line(tmp_path, capsys):
    assert eval_script.cli(["--device-target", "GPU", "--output", str(tmp_path / "o")]) == 2
    line = one_error_line(capsys)
    assert "GPU is not available" in line and not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------- 9. usage errors

@pytest.mark.parametrize("script", ["eval", "quant", "export"])
def test_bad_flag_is_one_line(script):
    extra = ["--ckpt", "x.ckpt", "--format", "onnx"] if script == "export" else []
    r = subprocess.run([sys.executable, f"{script}.py", *extra, "--no-such-flag"], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, GLOG_v="3"))
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--no-such-flag" in lines[0], r.stderr


# ----------------------------------------------------------------------------- 10. failures known in advance

@pytest.mark.parametrize("method", ["easyquant", "vtptq"])
def test_quantize_head_works_with_search_methods(tiny, method):
    model = randomize(create_model(tiny), 0)
    cfg = dict(defaults(), method=method, w_bits=4, a_bits=4, quantize_head=True, search_candidates=8,
               max_rounds=2, calib_batch_size=4)
    quantize_model(model, cfg)
    x = np.random.default_rng(1).standard_normal((4, 1, 28, 28)).astype(np.float32)
    report = calibrate_model(model, x, cfg, log=io.StringIO())
    assert "head" in report and report["head"]["rounds"] >= 1


def test_mindir_export_refuses_uncalibrated_model(tiny, tmp_path):
    from src.export.mindir import export_mindir
    model = randomize(create_model(tiny), 0)
    quantize_model(model, dict(defaults()))
    from src.quant import set_quant_mode
    set_quant_mode(model, "quantized")
    with pytest.raises(ValueError, match="not calibrated"):
        export_mindir(model, str(tmp_path / "m.mindir"), 2)
    assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------- 11. Ctrl-C

@pytest.mark.parametrize("ignored_at_start", [False, True])
def test_ctrl_c_says_interrupted_and_exits_130(tmp_path, ignored_at_start):
    out = tmp_path / "run"

    def preexec():
        if ignored_at_start:  # as for a background job started from a script
            signal.signal(signal.SIGINT, signal.SIG_IGN)
    p = subprocess.Popen([sys.executable, "quant.py", "--calib-num", "8", "--output", str(out)], cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec,
                         env=dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1"))
    try:
        for line in p.stdout:  # interrupt while the FP evaluation runs
            if line.startswith("deit_fmnist_minmax_w8a8:"):
                break
        time.sleep(2)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("signals, gap", [
    ((signal.SIGINT, signal.SIGINT), 0.1),  # a double Ctrl-C (issue #21: exit 143)
    ((signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGINT), 0.03),
    ("storm", 0.02),  # a signal every 20 ms until the process has gone
])
def test_any_number_of_signals_says_interrupted_and_exits_130(tmp_path, signals, gap):
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, "quant.py", "--method", "easyquant", "--calib-num", "64", "--max-images", "200",
                          "--output", str(out)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, GLOG_v="3", PYTHONUNBUFFERED="1"))
    try:
        for line in p.stdout:  # interrupt during the calibration
            if line.startswith("full precision"):
                break
        time.sleep(0.5)
        if signals == "storm":
            while p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGINT if int(time.time() * 50) % 3 else signal.SIGTERM)
                time.sleep(gap)
        else:
            for sig in signals:
                p.send_signal(sig)
                time.sleep(gap)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert not out.exists() and not leftovers(tmp_path)


# ----------------------------------------------------------------------------- 12. kernel cache

PLANTED_C = r"""
#include <stdio.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fputs("the planted library ran\n", f); fclose(f); }
}
void FakeQuant(void) {}
void Gelu(void) {}
void Permute0213(void) {}
"""  # no SplitHeads: a stale handle of it broke MindSpore (issue #21)


def planted_library(tmp_path, marker):
    import shutil
    if shutil.which("gcc") is None:
        pytest.skip("no gcc to build the planted library")
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    lib = tmp_path / "planted.so"
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)], check=True)
    return lib


def plant(cache, lib, lib_mode=0o600, index_mode=0o600, digest=None):
    """The planted library at every name the cache uses (the old fixed name, a unique name and
    the hash file naming it with the planted bytes' true SHA-256)."""
    import hashlib
    import shutil
    from src import kernels
    name = kernels.library_name()
    for target in (f"{name}.so", f"{name}.planted1.so"):
        shutil.copy(lib, cache / target)
        os.chmod(cache / target, lib_mode)
    digest = digest or hashlib.sha256(lib.read_bytes()).hexdigest()
    (cache / (name + kernels.HASH_SUFFIX)).write_text(f"{digest}  {name}.planted1.so\n")
    os.chmod(cache / (name + kernels.HASH_SUFFIX), index_mode)
    return cache / f"{name}.planted1.so"


def library_path_in(cache):
    code = "from src import kernels; print(kernels.library_path())"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, VTPTQ_KERNEL_CACHE=str(cache)))
    assert p.returncode == 0, p.stderr
    return p.stdout.strip(), p.stderr


def test_planted_library_in_an_open_cache_never_runs(tmp_path):
    marker = tmp_path / "marker"
    lib = planted_library(tmp_path, marker)
    cache = tmp_path / "kc"
    cache.mkdir()
    os.chmod(cache, 0o777)  # anyone may write there
    plant(cache, lib)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "eval.py", "--max-images", "20", "--output", str(out)], cwd=REPO,
                       capture_output=True, text=True, env=dict(os.environ, GLOG_v="3", VTPTQ_KERNEL_CACHE=str(cache)))
    assert p.returncode == 0, p.stderr
    assert not marker.exists()
    assert f"note: kernel cache {cache} is writable by group or others (mode 0777)" in p.stderr
    assert "Traceback" not in p.stderr and json.loads((out / "result.json").read_text())["num_images"] == 20
    path, err = library_path_in(cache)
    assert not path.startswith(str(cache)) and os.path.basename(path).startswith("vtptq_cpu_ops_")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["library mode 0755", "hash file mode 0644", "hash of other bytes", "cache of another user"])
def test_planted_library_in_a_private_cache_never_runs(tmp_path, case):
    marker = tmp_path / "marker"
    lib = planted_library(tmp_path, marker)
    cache = tmp_path / "kc"
    cache.mkdir(mode=0o700)
    if case == "library mode 0755":
        planted = plant(cache, lib, lib_mode=0o755)
    elif case == "hash file mode 0644":
        planted = plant(cache, lib, index_mode=0o644)
    elif case == "hash of other bytes":
        planted = plant(cache, lib, digest="0" * 64)
    else:
        planted = plant(cache, lib)
        os.chown(cache, 12345, -1) if os.geteuid() == 0 else pytest.skip("needs root to give the folder away")
    path, err = library_path_in(cache)
    assert not marker.exists(), err
    assert path.startswith("/") and path != str(planted) and "Traceback" not in err
    if case != "cache of another user":  # rebuilt in the cache, under a fresh name
        assert os.path.dirname(path) == str(cache) and os.path.isfile(path)
    else:  # built in a private temporary folder, removed when the process ended
        assert "is owned by user id 12345" in err and not os.path.exists(path)


# ----------------------------------------------------------------------------- 13. msrun

def test_distribute_script_checks_the_workers_before_launching(tmp_path):
    t0 = time.time()
    r = subprocess.run(["bash", "scripts/run_eval_distribute_cpu.sh", "3", "configs/deit_fmnist_fp.yaml", "embedded", "",
                        "--max-images", "2", "--output", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, RUN_LOG_DIR=str(tmp_path / "logs"), MASTER_PORT="8131"))
    assert r.returncode == 2, r.stderr
    assert [ln for ln in r.stderr.splitlines() if ln.strip()] == [
        "error: 3 workers for 2 images in 1 batch of 100: every worker needs at least one whole batch; launch at most "
        "1 workers or lower the batch size"]
    assert "msrun not launched" in r.stdout and time.time() - t0 < 30
    assert not (tmp_path / "out").exists() and not [n for n in os.listdir(tmp_path / "logs") if n.startswith("msrun_")]


def test_worker_death_ends_the_run_with_one_line_and_no_staging_folder(tmp_path):
    """A worker killed during the calibration: msrun stops the others; rank 0's log ends with one
    line, and its staging folder is gone (removed by the run's reaper, which msrun cannot kill)."""
    import glob
    logs, out = tmp_path / "logs", tmp_path / "out"
    env = dict(os.environ, GLOG_v="3", MS_NODE_TIMEOUT="10",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "mindspore.parallel.cluster.run", "--worker_num=2", "--local_worker_num=2",
                          f"--master_port={port}", f"--log_dir={logs}", "--join=True", "quant.py", "--method", "easyquant",
                          "--calib-num", "64", "--max-images", "100", "--batch-size", "50", "--output", str(out)],
                         cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def log(rank):
        path = logs / f"worker_{rank}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def worker_pid(rank):
        for d in glob.glob("/proc/[0-9]*"):
            with contextlib.suppress(OSError):
                with open(os.path.join(d, "environ"), "rb") as f:
                    environ = f.read().split(b"\0")
                with open(os.path.join(d, "cmdline"), "rb") as f:
                    cmd = f.read()
                if b"quant.py" in cmd and f"--output\0{out}".encode() in cmd and b"MS_ROLE=MS_WORKER" in environ \
                        and f"MS_NODE_ID={rank}".encode() in environ:
                    return int(os.path.basename(d))
        return None
    try:
        deadline = time.time() + 240
        while "calibration shard" not in log(1) and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert [n for n in os.listdir(tmp_path) if n.startswith(".out.")], log(0)  # rank 0's staging folder
        victim = worker_pid(1)
        assert victim, "rank 1 not found"
        t0 = time.time()
        os.kill(victim, signal.SIGKILL)
        p.wait(timeout=120)
        deadline = time.time() + 30
        while [n for n in os.listdir(tmp_path) if n.startswith(".out.")] and time.time() < deadline:
            time.sleep(0.2)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode != 0 and time.time() - t0 < 60
    assert worker_pid(0) is None
    errors = [ln for ln in log(0).splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "rank 0" in errors[0] and "msrun" in errors[0], log(0)[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["logs"]
