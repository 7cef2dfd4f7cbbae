"""Small helpers shared by the entry points: atomic file writes, progress display."""
import json
import os
import sys
import time

import numpy as np


def _tmp_name(path):
    d, base = os.path.split(os.path.abspath(path))
    return os.path.join(d, f".{base}.tmp{os.getpid()}")


def atomic_write_text(path, text):
    """Write `text` to a temporary name in the same folder, then rename onto `path`."""
    tmp = _tmp_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npz(path, **arrays):
    tmp = _tmp_name(path) + ".npz"
    try:
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def make_readable(path):
    """Ordinary permissions (0666 less the umask) for a file that MindSpore saved owner-read-only
    (0400) or that tempfile created 0600."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_checkpoint_atomic(obj, path, append_dict=None):
    """mindspore.save_checkpoint to a temporary name, then rename. `obj`: Cell or list of dicts."""
    import mindspore as ms
    tmp = _tmp_name(path) + ".ckpt"
    try:
        ms.save_checkpoint(obj, tmp, append_dict=append_dict)
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class Progress:
    """A one-line progress display with rate and ETA, printed to stderr at most every `every` s."""

    def __init__(self, total, desc="", unit="img", every=2.0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.time()
        self._last = 0.0

    def update(self, n):
        self.done += n
        now = time.time()
        if now - self._last >= self.every or self.done >= self.total:
            self._last = now
            el = max(now - self.start, 1e-9)
            rate = self.done / el
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.stream.write(f"\r{self.desc} {self.done}/{self.total} {self.unit} "
                              f"[{el:.0f}s, {rate:.1f} {self.unit}/s, ETA {eta:.0f}s]")
            if self.done >= self.total:
                self.stream.write("\n")
            self.stream.flush()

    @property
    def seconds(self):
        return time.time() - self.start


class UserError(Exception):
    """An error in how a run was set up or launched (not a bug): run_cli prints it on one line."""


def run_cli(fn, *args):
    """Run an entry point's work; a user error (bad config, value, file) becomes one line
    `error: ...` on stderr and exit code 2 (VTPTQ_DEBUG=1 shows the traceback)."""
    import traceback
    from .config import ConfigError
    try:
        fn(*args)
        return 0
    except (ConfigError, UserError, ValueError, FileNotFoundError, ImportError) as e:
        if os.environ.get("VTPTQ_DEBUG"):
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
