"""Run folders: the output folder of one run of eval.py or quant.py, written as a unit
(RunOutput), with a manifest of its own files (RUN_MANIFEST) so that the next run replaces it
only if it holds nothing else, and export.py's record of files written into it afterwards
(record_in_run_folder)."""
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time

import yaml

from .config import DEFAULTS
from .distributed import launched_distributed
from .utils import (UserError, atomic_write_json, atomic_write_text, file_sha256, first_line, make_readable,
                    shielded)

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
            files[rel] = {"bytes": info.st_size, "sha256": file_sha256(os.path.join(folder, rel))}
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
        if info.st_size != rec["bytes"] or file_sha256(os.path.join(folder, rel)) != rec["sha256"]:
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


def _remove(path):
    """Remove a file, link or folder tree at `path` (a link is removed, never followed)."""
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


