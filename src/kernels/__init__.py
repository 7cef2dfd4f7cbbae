"""Fused CPU kernels (cpu_ops.cc) for the elementwise hot spots of the forward pass: the
activation fake quantizer and the exact GELU; and, for numpy arrays through ctypes
(`numpy_kernel`), the hinges of vtptq's ranking loss in the interval search (all pairs and
sampled pairs), which reproduce numpy's float32 operations and float64 sums bit for bit
(tests/test_kernels.py); where the kernels are off, the search uses numpy (same values, slower).

MindSpore's CPU backend runs `clamp(round(x / s), lo, hi) * s` as five single-threaded passes
with a buffer each (round alone about 2 ns per element), and the exact GELU as five (erf about
3.4 ns per element). cpu_ops.cc does each in one pass on the runtime's threads, with the same
float32 operations in the same order, so the results are bit-identical (tests/test_kernels.py
checks this against the MindSpore chains, in GRAPH and PYNATIVE mode).

The library is compiled with the system C++ compiler on first use into a per-user cache
(`VTPTQ_KERNEL_CACHE`, default `$XDG_CACHE_HOME/vtptq` or `~/.cache/vtptq`), keyed by a hash of
the source and the flags, under a unique name recorded with the SHA-256 of its bytes in
`vtptq_cpu_ops_<key>.sha256` beside it. Nothing in the cache is loaded unless the folder is
private to the user, the library and its hash file are private files of the user and the
bytes match the hash (else it is rebuilt under a new name, or built in a private temporary
folder when the cache folder is not private). Where there is no
compiler, the device target is not CPU, or `VTPTQ_CPU_KERNELS=0`, `fake_quant_op()` and
`gelu_op()` return None and the callers use the MindSpore chains (same values, slower). The
decision is made when a layer is built: build models after `setup_context`.
"""
import contextlib
import functools
import hashlib
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

from ..utils import file_sha256

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_ops.cc")
# -march=native: vector rounding and division (the quantizer runs about 8x faster than with the
# baseline instruction set); exact IEEE float32 operations either way, and no contraction into
# fused multiply-adds (-ffp-contract=off), so the values do not depend on the flags. The cached
# library is keyed by the CPU's feature flags as well as the source.
FLAGS = ["-O3", "-march=native", "-std=c++14", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-pthread"]
ENV_SWITCH = "VTPTQ_CPU_KERNELS"
ENV_CACHE = "VTPTQ_KERNEL_CACHE"


def cache_dir():
    base = os.environ.get(ENV_CACHE)
    if base:
        return base
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(xdg, "vtptq")


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_signature():
    """The machine and the CPU's feature flags (a library built with -march=native elsewhere is not reused)."""
    import platform
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = line.split(":", 1)[-1].strip()
                    break
    except OSError:
        flags = platform.processor()
    return f"{platform.machine()} {flags}"


SYMBOLS = ("FakeQuant", "Gelu", "Permute0213", "SplitHeads", "RankHingeAllPairs", "RankHingePairs",
           "FakeQuantCandidates", "FakeQuantRowSums")
HASH_SUFFIX = ".sha256"  # beside the library: "<sha256 of its bytes>  <library file name>"


def _has_symbols(path):
    """Whether the library at `path` (already verified: our own build) loads and has every kernel."""
    import ctypes
    try:
        lib = ctypes.CDLL(path)
        return all(hasattr(lib, name) for name in SYMBOLS)
    except OSError:
        return False


def _unsafe_folder(path):
    """None if code may be loaded from the folder `path` (it exists), else why not: the folder
    must be owned by this user and not writable by group or others, and every folder above it
    (as given and with links resolved) owned by this user or root and not writable by group or
    others unless sticky (as /tmp), so that no one else can put a file there or swap a folder."""
    uid = os.geteuid()
    try:
        info = os.stat(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if not stat.S_ISDIR(info.st_mode):
        return "is not a folder"
    if info.st_uid != uid:
        return f"is owned by user id {info.st_uid}, not by you ({uid})"
    if info.st_mode & 0o022:
        return f"is writable by group or others (mode {stat.S_IMODE(info.st_mode):04o})"
    for full in {os.path.abspath(path), os.path.realpath(path)}:
        above = os.path.dirname(full)
        while True:
            try:
                a = os.stat(above)
            except OSError as e:
                return f"has a folder above it that cannot be read ({above}: {e.strerror})"
            if a.st_uid not in (0, uid) or (a.st_mode & 0o022 and not a.st_mode & stat.S_ISVTX):
                return f"is inside {above}, which others can write to"
            if above == os.path.dirname(above):
                break
            above = os.path.dirname(above)
    return None


def _private_file(path):
    """None if `path` is a regular file (not a link) owned by this user that only its owner can
    read or write (mode 0600, 0700, 0400 ...), else why not."""
    try:
        info = os.lstat(path)
    except OSError as e:
        return e.strerror
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if info.st_uid != os.geteuid():
        return f"owned by user id {info.st_uid}"
    if info.st_mode & 0o077:
        return f"mode {stat.S_IMODE(info.st_mode):04o} (expected 0600 or 0700)"
    return None


def _cached(folder, name):
    """(library, None) for the library named by the hash file `name`.sha256 in `folder` if both
    are private files of this user and the library's bytes have the recorded SHA-256; else
    (None, the file the hash file names or None). Nothing is loaded before this check: a file
    that someone else planted never runs."""
    index = os.path.join(folder, name + HASH_SUFFIX)
    if _private_file(index) is not None or os.path.getsize(index) > 4096:
        return None, None
    with open(index, encoding="ascii", errors="replace") as f:
        parts = f.read().split()
    if len(parts) != 2 or not re.fullmatch(r"[0-9a-f]{64}", parts[0]) \
            or not re.fullmatch(re.escape(name) + r"\.[A-Za-z0-9_]{1,32}\.so", parts[1]):
        return None, None
    lib = os.path.join(folder, parts[1])
    if _private_file(lib) is not None or file_sha256(lib) != parts[0]:
        return None, lib
    return lib, None


def _private_temp_folder():
    """A new private (0700) folder for this process's build, removed when the process exits."""
    import atexit
    folder = tempfile.mkdtemp(prefix="vtptq_kernels_")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _build(cxx, folder, name):
    """Compile cpu_ops.cc into a new library of a unique name in `folder` (mode 0700), check its
    kernels, and record the SHA-256 of its bytes beside it (`name`.sha256, mode 0600). The unique
    name makes each build a path this process has never loaded: glibc hands back an already
    loaded library for a path it has seen, whatever the file now holds."""
    work = tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    try:
        out = os.path.join(work, "lib.so")
        subprocess.run([cxx, *FLAGS, "-o", out, SOURCE], check=True, capture_output=True, timeout=300)
        os.chmod(out, 0o700)
        digest = file_sha256(out)
        fd, lib = tempfile.mkstemp(prefix=f"{name}.", suffix=".so", dir=folder)
        os.close(fd)
        os.replace(out, lib)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    try:
        if _private_file(lib) is not None or file_sha256(lib) != digest or not _has_symbols(lib):
            raise OSError(f"the library built from {SOURCE} lacks the kernels {', '.join(SYMBOLS)}")
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)  # mode 0600
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{digest}  {os.path.basename(lib)}\n")
        os.replace(tmp, os.path.join(folder, name + HASH_SUFFIX))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(lib)
        raise
    return lib


def library_name(cxx=None):
    """Stem of the cached library's files: a hash of the source, the compiler, the flags and the CPU."""
    cxx = cxx or _compiler()
    with open(SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha1(src + " ".join([str(cxx)] + FLAGS + [_cpu_signature()]).encode()).hexdigest()[:16]
    return f"vtptq_cpu_ops_{key}"


@functools.lru_cache(maxsize=None)
def library_path():
    """Path of the compiled cpu_ops library, building it if needed; None if it cannot be built
    (the reason is printed once to stderr). The cache folder must be private to this user
    (_unsafe_folder), else the library is built in a private temporary folder for this process
    (a one-line note); a cached library is loaded only if it and its hash file are private
    files of this user and its bytes have the recorded SHA-256 (_cached)."""
    cxx = _compiler()
    if cxx is None:
        print("note: no C++ compiler found: the fused CPU kernels are off (same results, slower)", file=sys.stderr)
        return None
    name = library_name(cxx)
    folder = cache_dir()
    try:
        if not os.path.isdir(folder):
            os.makedirs(folder, mode=0o700, exist_ok=True)
        problem = _unsafe_folder(folder)
        if problem:
            print(f"note: kernel cache {folder} {problem}: the fused CPU kernels are built in a private temporary "
                  f"folder for this run (set {ENV_CACHE} to a folder of yours that only you can write)",
                  file=sys.stderr)
            folder = _private_temp_folder()
            problem = _unsafe_folder(folder)
            if problem:
                raise OSError(f"the temporary folder {folder} {problem}")
        lib, bad = _cached(folder, name)
        if lib is not None and _has_symbols(lib):
            return lib
        lib = _build(cxx, folder, name)
        if bad is not None and _private_file(bad) is None:  # a library of ours whose bytes changed
            with contextlib.suppress(OSError):
                os.remove(bad)
        return lib
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[:1] or [str(e)]
        print(f"note: could not build the fused CPU kernels ({reason[0]}); they are off (same results, slower)",
              file=sys.stderr)
        return None


def switched_off():
    """Whether VTPTQ_CPU_KERNELS turns the kernels off (0, false, no, off)."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off")


@functools.lru_cache(maxsize=None)
def _numpy_function(path, name, argtypes):
    import ctypes
    fn = getattr(ctypes.CDLL(path), name)
    fn.restype, fn.argtypes = ctypes.c_int, list(argtypes)
    return fn


def numpy_kernel(name, argtypes):
    """The ctypes function `name` of the library, for numpy arrays (the interval search's
    kernels, which run on any device target: the search is numpy on the CPU), or None where the
    kernels are off (no compiler, VTPTQ_CPU_KERNELS=0). ctypes releases the GIL during the call."""
    if switched_off():
        return None
    path = library_path()
    return None if path is None else _numpy_function(path, name, tuple(argtypes))


FUSED_ATTRS = ("fq_op", "fused", "heads_t", "qkv_t")  # cell attributes that hold a fused kernel (or None)


@contextlib.contextmanager
def unfused(model):
    """Within the block, every cell of `model` uses MindSpore's own operations instead of the
    fused kernels (same values): for a MindIR export, which must not need this machine's
    library. Python attributes, read when a graph is compiled."""
    saved = []
    for _, cell in model.cells_and_names():
        for attr in FUSED_ATTRS:
            if getattr(cell, attr, None) is not None:
                saved.append((cell, attr, getattr(cell, attr)))
                setattr(cell, attr, None)
    try:
        yield model
    finally:
        for cell, attr, value in saved:
            setattr(cell, attr, value)


def enabled():
    """Whether the fused kernels are used for layers built now: CPU device, not switched off,
    library built."""
    import mindspore as ms
    if switched_off():
        return False
    if ms.get_context("device_target") != "CPU":
        return False
    return library_path() is not None


def config(*values):
    """A float32 config tensor for a kernel: `values`, then the thread count."""
    import numpy as np
    from mindspore import Tensor
    return Tensor(np.array([*values, threads()], np.float32))


def threads():
    """Threads of a fused kernel: MindSpore's runtime_num_threads, at most the CPU count."""
    import mindspore as ms
    try:
        n = int(ms.get_context("runtime_num_threads"))
    except (ValueError, TypeError, RuntimeError):
        n = 0
    return max(1, min(n or os.cpu_count() or 1, os.cpu_count() or 1))


def _same_dtype(x, *_):
    return x


_OPS = {}  # one primitive per kernel and library, shared by every layer


def _custom(name, out_shape, out_dtype=_same_dtype):
    from mindspore import ops
    key = (library_path(), name)
    if key not in _OPS:
        _OPS[key] = ops.Custom(f"{key[0]}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")
    return _OPS[key]


def fake_quant_op():
    """ops.Custom (x, scale, zero_point, config) -> fake-quantized x, or None (see module doc)."""
    if not enabled():
        return None
    return _custom("FakeQuant", _same_dtype)


def gelu_op():
    """ops.Custom (x, config) -> GELU(x), or None (see module doc)."""
    if not enabled():
        return None
    return _custom("Gelu", _same_dtype)


def permute0213_op():
    """ops.Custom (x (A, B, C, D), config) -> x transposed to (A, C, B, D), or None (see module doc)."""
    if not enabled():
        return None
    return _custom("Permute0213", lambda x, c: [x[0], x[2], x[1], x[3]])


def split_heads_op():
    """ops.Custom (x (A, B, 3, C, D), config) -> (q, k, v), each x[:, :, i] transposed to
    (A, C, B, D), or None (see module doc)."""
    if not enabled():
        return None

    def shapes(x, c):
        return tuple([x[0], x[3], x[1], x[4]] for _ in range(3))

    def dtypes(x, c):
        return (x, x, x)
    return _custom("SplitHeads", shapes, dtypes)
