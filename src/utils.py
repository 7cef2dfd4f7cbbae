"""Small helpers shared by the entry points: atomic file writes, run output folders, progress
display, and the command-line wrapper that turns errors and signals into one line."""
import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time

import numpy as np


# ----------------------------------------------------------------------------- temporaries
# Every temporary is created by tempfile in the destination's folder: an unpredictable name,
# O_CREAT | O_EXCL (a file or link planted under a guessed name is never opened, let alone
# followed), mode 0600; the finished file is renamed onto the destination, and os.replace
# replaces a link there rather than writing through it.

def _split(path):
    d, base = os.path.split(os.path.abspath(path))
    return d, base


@contextlib.contextmanager
def os_errors_name(path, temporary):
    """An OSError raised inside the block that names no file, or the temporary `temporary`
    (a file or folder), is raised again naming `path`, the file the user asked for."""
    try:
        yield
    except OSError as e:
        name = e.filename
        if name is None or (isinstance(name, str) and os.path.abspath(name).startswith(os.path.abspath(temporary))):
            raise OSError(e.errno, e.strerror or first_line(e), str(path)) from None
        raise


@contextlib.contextmanager
def _temp_file(path):
    """Yields (fd, tmp) of a new private file beside `path`; on success it is given ordinary
    permissions and renamed onto `path`; on any error (or interrupt) it is removed."""
    d, base = _split(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=".tmp", dir=d)
    try:
        with os_errors_name(path, tmp):
            yield fd, tmp
            make_readable(tmp)
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write_bytes(path, data):
    """Write `data` to a private temporary file beside `path`, then rename it onto `path`."""
    with _temp_file(path) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def atomic_write_text(path, text):
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_bench_json(path, obj):
    """A benchmark's `--json FILE`: the folder made if needed, written atomically, announced."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, obj)
    print(f"written to {path}")


def atomic_save_npz(path, **arrays):
    with _temp_file(path) as (fd, _):
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)


@contextlib.contextmanager
def atomic_output(path):
    """For writers that take a file name (MindSpore, matplotlib): yields a name inside a new
    private (0700) folder beside `path`; the file written there is renamed onto `path`, and
    the folder is removed whatever happens."""
    d, base = _split(path)
    tmp_dir = tempfile.mkdtemp(prefix=f".{base}.", suffix=".tmp", dir=d)
    try:
        tmp = os.path.join(tmp_dir, base)
        with os_errors_name(path, tmp_dir):
            yield tmp
            if not os.path.isfile(tmp):
                raise OSError(f"{path}: the writer produced no file")
            make_readable(tmp)
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def make_readable(path, folder=False):
    """Ordinary permissions (0666, or 0777 for a folder, less the umask) for a file that
    MindSpore saved owner-read-only (0400) or that tempfile created 0600 / 0700."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if folder else 0o666) & ~umask)


@contextlib.contextmanager
def quiet_mindspore_log():
    """Silence MindSpore's Python logger for a call whose failure is reported as one line
    (save_checkpoint logs a CRITICAL line naming the temporary file before it raises)."""
    from mindspore import log
    logger = log._get_logger()  # pylint: disable=protected-access
    before = logger.disabled
    logger.disabled = True
    try:
        yield
    finally:
        logger.disabled = before


def save_checkpoint_atomic(obj, path, append_dict=None):
    """mindspore.save_checkpoint to a private temporary name, then rename. `obj`: Cell or list
    of dicts. A failed write (a full disk, say) becomes an OSError that names `path`."""
    import mindspore as ms
    with atomic_output(path) as tmp:
        try:
            with quiet_mindspore_log():
                ms.save_checkpoint(obj, tmp, append_dict=append_dict)
        except (OSError, RuntimeError) as e:
            reason = getattr(e, "strerror", None) or first_line(e)
            raise OSError(getattr(e, "errno", None), f"cannot write the checkpoint ({reason})", path) from None


# ----------------------------------------------------------------------------- paths
def file_sha256(path):
    """Hex SHA-256 of a file's bytes, read in blocks of 1 MiB."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def is_inside(path, folder):
    """Whether `path` is `folder` or under it, links resolved (parts that do not exist yet taken as given)."""
    p, f = os.path.realpath(os.path.abspath(path)), os.path.realpath(os.path.abspath(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def check_writable_file(path, what):
    """Fail now (before any work) if the file `path` could not be written later: its folder
    must exist or be creatable and writable, and the path must not be a folder."""
    if not path:
        return
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise UserError(f"{what} {path}: is a folder; expected a file name")
    d = os.path.dirname(full)
    probe = d
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise UserError(f"{what} {path}: {probe} is not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: folder {probe} is not writable")


# ----------------------------------------------------------------------------- progress
class Progress:
    """A one-line progress display with rate and ETA, printed to stderr at most every `every` s."""

    def __init__(self, total, desc="", unit="img", every=2.0, stream=None):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = time.time()
        self._last = 0.0

    def update(self, n):
        check_interrupted()
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


# ----------------------------------------------------------------------------- command line
class UserError(Exception):
    """An error in how a run was set up or launched (not a bug): run_cli prints it on one line."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived."""


EXIT_USAGE, EXIT_OS, EXIT_INTERRUPTED = 2, 1, 130


def first_line(e, limit=300):
    """The first line of an exception's text (or its type), at most `limit` characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


def short_repr(value, limit=60):
    """repr of a value for an error message: one line, at most `limit` characters."""
    text = repr(value).replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


# Signal state: 0 running, 1 a signal received and not yet acted upon, 2 Interrupted raised
# (the run is unwinding: its `finally` blocks remove temporaries, and further signals are
# ignored so that they cannot cut that short).
_STATE = {"phase": 0, "signum": None, "shielded": 0}


def _on_signal(signum, frame):
    """Remember the signal; check_interrupted raises at the next safe point. Raising here, at
    whatever bytecode runs, could land inside a MindSpore call into Python (graph compilation
    parses the model's code), where it is swallowed or turned into a compile-failure report.
    A second signal raises at once; any later one is ignored (the run is already unwinding)."""
    phase = _STATE["phase"]
    if phase == 0:
        _STATE.update(phase=1, signum=signum)
    elif phase == 1 and not _STATE["shielded"]:
        _STATE["phase"] = 2
        raise Interrupted(signal.Signals(signum).name)


@contextlib.contextmanager
def shielded():
    """Within the block (the swap of a run folder, the removal of temporaries) a signal is only
    recorded, never raised at once, so the block runs to its end."""
    _STATE["shielded"] += 1
    try:
        yield
    finally:
        _STATE["shielded"] -= 1


def check_interrupted():
    """A safe point of the long loops (each batch, layer and candidate chunk): raise
    Interrupted if SIGINT or SIGTERM arrived since."""
    if _STATE["phase"] == 1:
        _STATE["phase"] = 2
        raise Interrupted(signal.Signals(_STATE["signum"]).name)


def interrupted():
    """Whether SIGINT or SIGTERM arrived during this run."""
    return _STATE["phase"] > 0


def install_signal_handlers():
    """Ctrl-C (SIGINT) and SIGTERM make the next safe point (check_interrupted) raise
    Interrupted, so that `finally` blocks remove temporaries and run_cli exits 130 with one
    line. Installed after MindSpore is imported (it installs its own SIGINT handler), and also
    when SIGINT was ignored at start (a background job of a script). MindSpore's runtime turns
    a Ctrl-C that lands inside an operation into a SIGTERM to the process; that is why SIGTERM
    is handled the same way. Returns the previous handlers {signal: handler}."""
    _STATE.update(phase=0, signum=None, shielded=0)
    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, _on_signal)
    return previous


def _ignore_signals():
    """From an interrupt to the process's end, SIGINT and SIGTERM are ignored. Restoring the
    defaults would let one more Ctrl-C kill the process on its way out: MindSpore's exit path
    re-installs its own SIGINT handler, which turns a Ctrl-C into a SIGTERM (exit 143 with the
    default action), and Python resets a SIGINT handler of its own to the default action when it
    finalizes (exit by SIGINT); an ignored signal stays ignored through both."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


def _notes(e):
    notes = getattr(e, "__notes__", None)
    return f" ({'; '.join(notes)})" if notes else ""


def _message(e):
    """One line for an error: 'PATH: reason' for an OSError that names a file, else its first
    line; notes (such as what DIR.failed/ kept) in brackets."""
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        name = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        return f"{name}: {e.strerror}" + _notes(e)
    return first_line(e) + _notes(e)


def run_cli(fn, *args):
    """Run an entry point's work with one-line errors (VTPTQ_DEBUG=1 shows the traceback):
    - a user error (bad config, value, file, device): `error: ...`, exit 2;
    - a file-system error: `error: PATH: reason`, exit 1;
    - out of memory: `error: out of memory ...`, exit 1;
    - Ctrl-C / SIGTERM, any number of them: `interrupted`, exit 130; an error raised once a
      signal has arrived (MindSpore may turn an interrupt into its own error) counts as the
      interrupt. Both signals are ignored from then on (see _ignore_signals), also for an
      in-process caller; otherwise the caller's handlers are restored.
    Temporaries are removed on the way out by the writers' own `finally` blocks."""
    import traceback
    import mindspore  # noqa: F401 - imported first: it installs a SIGINT handler of its own
    previous = install_signal_handlers()
    debug = bool(os.environ.get("VTPTQ_DEBUG"))
    try:
        try:
            fn(*args)  # a signal after the last safe point: the work is done and kept, exit 0
            return 0
        except BaseException as e:  # noqa: BLE001 - anything after a signal is the interrupt; else below
            if isinstance(e, SystemExit) or not (isinstance(e, KeyboardInterrupt) or interrupted()):
                raise
            _STATE["phase"] = 2
            _ignore_signals()  # and not restored below: see _ignore_signals
            if debug and not isinstance(e, KeyboardInterrupt):
                traceback.print_exc()
            print("interrupted" + _notes(e), file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
    except (UserError, ValueError, ImportError) as e:  # a ConfigError is a ValueError
        if debug:
            traceback.print_exc()
        print(f"error: {_message(e)}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # FileNotFoundError is a user error of the same kind as a bad value
        if debug:
            traceback.print_exc()
        print(f"error: {_message(e)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, FileNotFoundError) else EXIT_OS
    except MemoryError as e:
        if debug:
            traceback.print_exc()
        print(f"error: out of memory ({first_line(e)}); try a smaller --batch-size or --calib-batch-size",
              file=sys.stderr)
        return EXIT_OS
    finally:  # in-process callers (tests, notebooks) get their handlers back, unless a signal came
        if interrupted():
            _ignore_signals()
        else:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
