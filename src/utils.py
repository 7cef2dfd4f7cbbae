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


# ----------------------------------------------------------------------------- run folders
# A run folder holds a manifest of the run's own files (RUN_MANIFEST, marked RUN_MARKER); a
# later run replaces the folder only if it holds nothing else. Folders written before the
# manifest existed are recognized by LEGACY_NAMES (see run_folder_problem).
RUN_MANIFEST = "run_manifest.json"
RUN_MARKER = "vtptq run folder: these files were written by one run; the next run into this folder replaces them"
# Every name this project's tools wrote into a run folder before the manifest: config.yaml and
# result.json (eval.py, quant.py), quantized.ckpt and bits.png (quant.py), the exports of the
# checkpoint beside it (export.py's default output).
LEGACY_NAMES = ("config.yaml", "result.json", "quantized.ckpt", "bits.png", "quantized.onnx", "quantized.mindir")
# The marker file inside a staging folder (a run in progress): the pid and host that own it.
STAGING_MARKER = ".vtptq_staging"


def _sha256(path):
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _walk(top):
    """(relative path, lstat) of everything under the folder `top`, links not followed, parents first."""
    import stat as st
    pending = [""]
    while pending:
        rel = pending.pop()
        with os.scandir(os.path.join(top, rel)) as it:
            entries = sorted(it, key=lambda e: e.name)
        for e in entries:
            r = os.path.join(rel, e.name)
            info = e.stat(follow_symlinks=False)
            yield r, info
            if st.S_ISDIR(info.st_mode):
                pending.append(r)


def _manifest_entries(folder, names=None):
    """({relative path: {bytes, sha256}}, [sub-folders]) of the regular files under `folder`
    (links not followed), or only of those under the relative paths `names`."""
    import stat as st
    files, folders = {}, []
    for rel, info in _walk(folder):
        if rel in (RUN_MANIFEST, STAGING_MARKER):
            continue
        if names is not None and not any(rel == n or rel.startswith(n + os.sep) for n in names):
            continue
        if st.S_ISDIR(info.st_mode):
            folders.append(rel)
        elif st.S_ISREG(info.st_mode):
            files[rel] = {"bytes": info.st_size, "sha256": _sha256(os.path.join(folder, rel))}
    return files, folders


def write_run_manifest(folder):
    """Write RUN_MANIFEST in `folder`: every file under it (relative path, bytes, SHA-256) and
    every sub-folder."""
    files, folders = _manifest_entries(folder)
    atomic_write_json(os.path.join(folder, RUN_MANIFEST), {"marker": RUN_MARKER, "files": files, "folders": folders})


def _read_manifest(folder):
    """The manifest dict of `folder`, or a reason (str) why it is not one of this project's."""
    path = os.path.join(folder, RUN_MANIFEST)
    if os.path.islink(path) or not os.path.isfile(path):
        return f"{RUN_MANIFEST} is not a file"
    try:
        if os.path.getsize(path) > 16 << 20:
            return f"{RUN_MANIFEST} is over 16 MB"
        with open(path, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        return f"{RUN_MANIFEST} is not JSON ({first_line(e, 80)})"
    if not (isinstance(m, dict) and m.get("marker") == RUN_MARKER and isinstance(m.get("files"), dict)
            and isinstance(m.get("folders", []), list)
            and all(isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)
                    for v in m["files"].values())):
        return f"{RUN_MANIFEST} is not a manifest of this project's runs"
    return m


def _legacy_marker_ok(path, name):
    """Whether config.yaml / result.json of a folder without a manifest is one this project wrote."""
    try:
        if os.path.getsize(path) > 16 << 20:
            return False
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if name == "result.json":
            obj = json.loads(text)
            return isinstance(obj, dict) and isinstance(obj.get("model"), str)
        import yaml
        from .config import DEFAULTS
        obj = yaml.safe_load(text)
        return isinstance(obj, dict) and "model" in obj and all(k in DEFAULTS for k in obj)
    except Exception:  # noqa: BLE001 - a file that cannot be read or parsed is not one of ours
        return False


def run_folder_problem(folder):
    """None if the existing folder may be replaced by a run, else a reason naming the first
    entry that is not a file of an earlier run:
    - an empty folder;
    - a folder with this project's RUN_MANIFEST that holds nothing else than the files and
      folders it lists, each file with its recorded size and SHA-256 (files it lists may be
      missing);
    - a folder written before the manifest existed: only regular files named in LEGACY_NAMES,
      with a config.yaml of config keys or a result.json of a result among them."""
    import stat as st
    if not os.path.exists(os.path.join(folder, RUN_MANIFEST)) and not os.path.islink(os.path.join(folder, RUN_MANIFEST)):
        names = sorted(os.listdir(folder))
        if not names:
            return None
        for name in names:
            path = os.path.join(folder, name)
            if name not in LEGACY_NAMES or os.path.islink(path) or not os.path.isfile(path):
                return f"holds '{name}', which is not a file of an earlier run (no {RUN_MANIFEST})"
        if not any(n in names and _legacy_marker_ok(os.path.join(folder, n), n) for n in ("config.yaml", "result.json")):
            return (f"holds no {RUN_MANIFEST} and no config.yaml or result.json of an earlier run "
                    f"({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        return None
    m = _read_manifest(folder)
    if isinstance(m, str):
        return m
    files, folders = m["files"], set(m.get("folders", []))
    for rel, info in _walk(folder):
        if rel == RUN_MANIFEST:
            continue
        if st.S_ISDIR(info.st_mode) and (rel in folders or any(f.startswith(rel + os.sep) for f in files)):
            continue
        if rel not in files or not st.S_ISREG(info.st_mode):
            return f"holds '{rel}', which is not a file of the earlier run (not in its {RUN_MANIFEST})"
        rec = files[rel]
        if info.st_size != rec["bytes"] or _sha256(os.path.join(folder, rel)) != rec["sha256"]:
            return f"holds '{rel}', changed since the earlier run wrote it (its {RUN_MANIFEST} records other bytes)"
    return None


def record_in_run_folder(*paths):
    """Files (or folders) written into a run folder after the run, such as export.py's default
    output beside quantized.ckpt, join the folder's manifest, so that the next run replaces
    them too. Nothing happens outside a run folder (no manifest of this project)."""
    folder = os.path.dirname(os.path.abspath(paths[0]))
    m = _read_manifest(folder)
    if not isinstance(m, dict):
        return
    names = [os.path.relpath(os.path.abspath(p), folder) for p in paths if os.path.lexists(p)]
    files, folders = _manifest_entries(folder, names)
    m["files"].update(files)
    m["folders"] = sorted(set(m.get("folders", [])) | set(folders))
    atomic_write_json(os.path.join(folder, RUN_MANIFEST), m)


def _rename_exchange(a, b):
    """Swap the folders at `a` and `b` in one step (Linux renameat2 RENAME_EXCHANGE); False where
    the system or file system cannot."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    import errno
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _lock_free(fd):
    """Whether an exclusive flock on `fd` can be taken now (then it is released); None where
    the file system has no flock."""
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _stale_staging(path, started):
    """Whether `path` is a staging folder of this project's run that is over: owned by this
    user, older than `started`, and no longer locked: its flock free (the lock goes with its
    process, also a killed one) or, on a file system without flock, the pid its marker names
    gone (same host only). A folder without the marker must be a run folder (killed in the
    middle of a swap) with its flock free."""
    import socket
    import stat as st
    try:
        info = os.lstat(path)
        if not st.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mtime >= started:
            return False
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        free = _lock_free(fd)
        if free is False:
            return False
        marker = os.path.join(path, STAGING_MARKER)
        if os.path.isfile(marker) and not os.path.islink(marker):
            with open(marker, encoding="utf-8", errors="replace") as f:
                fields = dict(part.split("=", 1) for part in f.read(4096).split() if "=" in part)
            if fields.get("project") != "vtptq" or fields.get("host") != socket.gethostname():
                return False
            try:
                pid = int(fields.get("pid", ""))
            except ValueError:
                return False
            return free is True or not _pid_alive(pid)
        return free is not None and run_folder_problem(path) is None and os.listdir(path) != []
    except OSError:
        return False
    finally:
        os.close(fd)


# The reaper of a staging folder: a small process in a session of its own (msrun kills a
# worker's whole process group, a terminal's Ctrl-C goes to the foreground group) that waits
# until the run's process closes the pipe, at its end or when it is killed (SIGKILL included:
# the kernel closes the pipe), and then removes the staging folder if it is still there and
# no longer locked, with the note (if any) on the run's stderr.
_REAPER = r"""
import fcntl, os, shutil, signal, sys, time
for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(s, signal.SIG_IGN)
staging, note = sys.argv[1], sys.argv[2]
try:
    while sys.stdin.buffer.read(65536):
        pass
except OSError:
    pass
try:
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
except OSError:
    sys.exit(0)
for _ in range(600):  # a killed process's files close one by one: the lock may be freed after the pipe
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        break
    except BlockingIOError:
        time.sleep(0.05)
    except OSError:
        break
else:
    sys.exit(0)  # still locked after 30 s: a process of the run lives on
shutil.rmtree(staging, ignore_errors=True)
if note and not os.path.lexists(staging):
    print(note, file=sys.stderr, flush=True)
"""


class RunOutput:
    """The output folder of one run, written as a unit so that it always describes one run.

    Everything goes into a new private folder beside DIR (`path(name)`, a staging folder
    `.DIR.XXXXXXXX.tmp/` locked by this process); when the run ends well, `commit` writes the
    run's manifest (RUN_MANIFEST: every file with its size and SHA-256) into it and swaps it
    in for DIR in one step (an earlier run's DIR is removed). When the run fails, DIR is left
    as it was; if the run had already written a quantized checkpoint or a result, the folder
    is kept as `DIR.failed/` (with its manifest) and the error says so; otherwise it is removed.

    An existing DIR is replaced only if it is empty or holds an earlier run and nothing else
    (run_folder_problem), so a mistyped --output never deletes unrelated files. Staging
    folders of earlier runs into DIR that were killed (their lock free, their process gone)
    are removed when the run starts. `enabled=False` (msrun workers other than rank 0):
    nothing is created or written."""

    KEEP = ("quantized.ckpt", "result.json")

    def __init__(self, final, enabled=True):
        self.final = os.path.abspath(final)
        self.given = final
        self.enabled = enabled
        self.staging = None
        self._lock_fd = None
        self._reaper = None
        self.started = time.time()

    def _check_replaceable(self):
        final = self.final
        if os.path.lexists(final) and not os.path.isdir(final):
            raise UserError(f"--output {self.given}: exists and is not a folder")
        if os.path.isdir(final):
            try:
                problem = run_folder_problem(final)
            except OSError as e:
                problem = f"cannot be read ({e.strerror or first_line(e)})"
            if problem:
                raise UserError(f"--output {self.given}: {problem}; nothing was replaced: give a new or empty folder, "
                                "or move that file away")

    def _remove_stale(self):
        """Remove the staging folders of earlier runs into DIR that are over (_stale_staging)."""
        import re
        parent, base = os.path.split(self.final)
        pattern = re.compile(r"\." + re.escape(base) + r"\.[A-Za-z0-9_]{8}\.tmp")
        try:
            names = os.listdir(parent)
        except OSError:
            return
        for name in names:
            path = os.path.join(parent, name)
            if pattern.fullmatch(name) and _stale_staging(path, self.started):
                shutil.rmtree(path, ignore_errors=True)
                if not os.path.exists(path):
                    print(f"note: removed {path}, the unfinished folder of an earlier run that was killed",
                          file=sys.stderr, flush=True)

    def __enter__(self):
        if not self.enabled:
            return self
        self._check_replaceable()
        parent = os.path.dirname(self.final)
        try:
            os.makedirs(parent, exist_ok=True)
            self._remove_stale()
            self.staging = tempfile.mkdtemp(prefix=f".{os.path.basename(self.final)}.", suffix=".tmp", dir=parent)
            self._lock()
        except OSError as e:
            if self.staging:
                shutil.rmtree(self.staging, ignore_errors=True)
                self.staging = None
            self._unlock()
            raise OSError(e.errno, f"cannot create the run's folder in {parent} ({e.strerror})", self.given) from None
        return self

    def _lock(self):
        """Mark the staging folder as this run's (pid, host) and hold a lock on it until the run ends."""
        import fcntl
        import socket
        self._lock_fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY)
        with contextlib.suppress(OSError):  # a file system without flock: the pid tells
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        atomic_write_text(os.path.join(self.staging, STAGING_MARKER),
                          f"project=vtptq pid={os.getpid()} host={socket.gethostname()}\n")
        self._start_reaper()

    def _start_reaper(self):
        """The staging folder is removed even if this process is killed (_REAPER); under msrun,
        which kills every worker when one dies, the reaper also says so on rank 0's log."""
        import subprocess
        from .distributed import launched_distributed
        note = ""
        if launched_distributed():
            note = (f"error: rank 0 (pid {os.getpid()}) was killed before the run ended (msrun kills every worker "
                    f"once one of them has died: see the workers' logs); --output {self.given} is as it was, and the "
                    "run's unfinished folder was removed")
        try:
            self._reaper = subprocess.Popen([sys.executable, "-I", "-S", "-c", _REAPER, self.staging, note],
                                            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
                                            close_fds=True)
        except OSError:  # no reaper: the next run into DIR removes a folder left behind
            self._reaper = None

    def _unlock(self):
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None
        reaper, self._reaper = self._reaper, None
        if reaper is not None:  # the run is over and its staging folder gone: the reaper finds nothing
            with contextlib.suppress(OSError):
                reaper.stdin.close()
            with contextlib.suppress(Exception):
                reaper.wait(timeout=5)

    def path(self, name):
        """Where to write the run's file `name` now."""
        return os.path.join(self.staging if self.staging else self.final, name)

    def final_path(self, name):
        """Where the run's file `name` will be once the run has ended well."""
        return os.path.join(self.final, name)

    def redirect(self, path):
        """A path the user gave (--save-predictions): inside DIR, its place in the new folder."""
        if not path or not self.staging:
            return path
        full = os.path.abspath(path)
        rel = os.path.relpath(full, self.final)
        if rel == os.curdir or rel.startswith(os.pardir + os.sep) or rel == os.pardir:
            return path
        target = os.path.join(self.staging, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        return target

    def _seal(self, folder):
        """The staging folder becomes a run folder: manifest written, marker removed, ordinary permissions."""
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, STAGING_MARKER))
        write_run_manifest(folder)
        make_readable(folder, folder=True)

    def commit(self):
        with shielded():
            self._check_replaceable()  # again: DIR may have changed while the run ran
            self._seal(self.staging)
            if os.path.lexists(self.final):
                if _rename_exchange(self.staging, self.final):  # the earlier run now at the staging name
                    _remove(self.staging)
                else:
                    parent = os.path.dirname(self.final)
                    trash = tempfile.mkdtemp(prefix=f".{os.path.basename(self.final)}.", suffix=".tmp", dir=parent)
                    try:
                        os.rename(self.final, os.path.join(trash, "old"))
                        os.rename(self.staging, self.final)
                    finally:
                        shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.staging, self.final)
            self.staging = None
            self._unlock()

    def _failed_destination(self):
        """DIR.failed, or DIR.failed.2, ... where DIR.failed holds something else than a run."""
        n = 1
        while True:
            path = self.final + ".failed" + (f".{n}" if n > 1 else "")
            if not os.path.lexists(path) or (os.path.isdir(path) and not os.path.islink(path)
                                             and run_folder_problem(path) is None):
                return path
            n += 1

    def __exit__(self, exc_type, exc, tb):
        if not self.enabled or self.staging is None:
            return False
        with shielded():
            try:
                if exc_type is not None:
                    self._keep_failed(exc)
                    return False
                try:
                    self.commit()
                except (UserError, OSError) as e:  # DIR changed under the run, or the swap failed
                    if self.staging is not None:
                        self._keep_failed(e)
                    raise
            finally:
                if self.staging is not None:
                    shutil.rmtree(self.staging, ignore_errors=True)
                    self.staging = None
                self._unlock()
        return False

    def _keep_failed(self, exc):
        """A failed run: its checkpoint or result kept in DIR.failed/ (named in a note), else nothing."""
        if isinstance(exc, OSError):  # name the file the user asked for, not its temporary place
            for attr in ("filename", "filename2"):
                name = getattr(exc, attr)
                if isinstance(name, str) and name.startswith(self.staging + os.sep):
                    setattr(exc, attr, self.final + name[len(self.staging):])
        kept = [n for n in self.KEEP if os.path.isfile(os.path.join(self.staging, n))]
        if kept:
            failed = self._failed_destination()
            _remove(failed)
            self._seal(self.staging)
            os.rename(self.staging, failed)
            self.staging = None
            if hasattr(exc, "add_note"):
                exc.add_note(f"{' and '.join(kept)} of this run kept in {failed}/")


def is_inside(path, folder):
    """Whether `path` is `folder` or under it, links resolved (parts that do not exist yet taken as given)."""
    p, f = os.path.realpath(os.path.abspath(path)), os.path.realpath(os.path.abspath(folder))
    return p == f or p.startswith(f.rstrip(os.sep) + os.sep)


def _remove(path):
    """Remove a file, link or folder tree at `path` (a link is removed, never followed)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


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
    from .config import ConfigError
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
    except (ConfigError, UserError, ValueError, ImportError) as e:
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
