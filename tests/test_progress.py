"""The calibration progress a user plans with: the stage, the elapsed time and an ETA from the
blocks done so far (src.quant.calibrate.CalibrationProgress), and quant.py --quiet, which keeps
the calibration to one updating line."""
import importlib
import io
import os
import sys

import pytest
import yaml

from src.quant import calibrate as calib
from src.quant.calibrate import CalibrationProgress

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)
quant_script = importlib.import_module("quant")

STAGES = [("embed", None, ["patch_embed.proj"]), ("blocks.0", None, ["b0.x", "b0.y"]),
          ("blocks.1", None, ["b1.x", "b1.y"]), ("blocks.2", None, ["b2.x", "b2.y"]), ("head", None, [])]


class Clock:
    def __init__(self):
        self.now = 100.0

    def time(self):
        return self.now


def feed(progress, clock, steps):
    """steps: [(layer name, its seconds)]; the clock advances by each layer's seconds."""
    for name, seconds in steps:
        clock.now += seconds
        progress.layer_done(name, name, seconds)


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(calib, "time", c)
    return c


def test_eta_from_the_blocks_done(clock):
    log = io.StringIO()
    p = CalibrationProgress(STAGES, log, start=clock.now)
    feed(p, clock, [("patch_embed.proj", 1.0), ("b0.x", 2.0)])
    # no block ended yet: 3 s for 2 of 7 layers -> 5 layers at 1.5 s
    assert p.eta(clock.now) == pytest.approx(7.5)
    feed(p, clock, [("b0.y", 2.0)])  # block 0 took 4 s; blocks 1 and 2 are left
    assert p.eta(clock.now) == pytest.approx(8.0)
    feed(p, clock, [("b1.x", 3.0)])  # 3 s into block 1: 1 s of it left, then block 2
    assert p.eta(clock.now) == pytest.approx(5.0)
    feed(p, clock, [("b1.y", 4.0)])  # block 1 took 7 s: mean 5.5, one block left
    assert p.eta(clock.now) == pytest.approx(5.5)
    lines = log.getvalue().splitlines()
    assert len(lines) == 5
    assert lines[0].endswith("[1.0s, embed (1/5), 1s elapsed, ETA 6s]")  # 1 s per layer, 6 to go
    assert lines[2].endswith("[2.0s, blocks.0 (2/5), 5s elapsed, ETA 8s]")
    assert lines[4].endswith("[4.0s, blocks.1 (3/5), 12s elapsed, ETA 6s]")  # 5.5 rounded to even


def test_quiet_is_one_updating_line(clock):
    log = io.StringIO()
    p = CalibrationProgress(STAGES, log, quiet=True, start=clock.now)
    feed(p, clock, [("patch_embed.proj", 1.0), ("b0.x", 2.0), ("b0.y", 2.0)])
    text = log.getvalue()
    assert "\n" not in text and text.count("\r") == 3
    assert text.rsplit("\r", 1)[1].startswith("calibrating blocks.0 (2/5) b0.y [3/7 layers, 5s elapsed, ETA 8s]")
    p.close()
    assert log.getvalue().endswith("\n")


def test_silent_without_a_stream(clock):
    p = CalibrationProgress(STAGES, None, start=clock.now)
    feed(p, clock, [("patch_embed.proj", 1.0)])
    p.close()  # nothing to write to, nothing raised
    assert p.layers_done == 1


def test_quant_quiet_flag(tmp_path, capsys):
    """quant.py --quiet: no line per layer, one 'calibrating' line with the stage and an ETA;
    the flag is a display setting, not saved in config.yaml."""
    out = tmp_path / "run"
    args = ["--max-images", "20", "--batch-size", "20", "--calib-num", "4", "--calib-batch-size", "4",
            "--w-bits", "8", "--a-bits", "8", "--method", "minmax", "--output", str(out)]
    assert quant_script.cli([*args, "--quiet"]) == 0
    err = capsys.readouterr().err
    calib_lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("calibrating")]
    assert calib_lines and "ETA" in calib_lines[-1] and "blocks.3 (5/6)" in calib_lines[-1]
    assert not [ln for ln in err.splitlines() if ln.startswith("  blocks.")]
    assert "quiet" not in yaml.safe_load((out / "config.yaml").read_text())
    assert quant_script.cli([*args, "--output", str(tmp_path / "loud")]) == 0
    err = capsys.readouterr().err
    layer_lines = [ln for ln in err.splitlines() if ln.startswith("  blocks.")]
    assert len(layer_lines) == 24 and all("ETA" in ln for ln in layer_lines)
