"""Fused CPU kernels (cpu_ops.cc) for the elementwise hot spots of the forward pass: the
activation fake quantizer and the exact GELU.

MindSpore's CPU backend runs `clamp(round(x / s), lo, hi) * s` as five single-threaded passes
with a buffer each (round alone about 2 ns per element), and the exact GELU as five (erf about
3.4 ns per element). cpu_ops.cc does each in one pass on the runtime's threads, with the same
float32 operations in the same order, so the results are bit-identical (tests/test_kernels.py
checks this against the MindSpore chains, in GRAPH and PYNATIVE mode).

The library is compiled with the system C++ compiler on first use into a per-user cache
(`VTPTQ_KERNEL_CACHE`, default `$XDG_CACHE_HOME/vtptq` or `~/.cache/vtptq`), named by a hash of
the source and the flags, written under a temporary name and renamed. Where there is no
compiler, the device target is not CPU, or `VTPTQ_CPU_KERNELS=0`, `fake_quant_op()` and
`gelu_op()` return None and the callers use the MindSpore chains (same values, slower). The
decision is made when a layer is built: build models after `setup_context`.
"""
import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile

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


SYMBOLS = ("FakeQuant", "Gelu", "Permute0213", "SplitHeads")


def _loads(path):
    """Whether `path` is a loadable library with every kernel (a truncated or foreign file in the
    cache is rebuilt, not handed to MindSpore)."""
    import ctypes
    if not os.path.isfile(path):
        return False
    try:
        lib = ctypes.CDLL(path)
        return all(hasattr(lib, name) for name in SYMBOLS)
    except OSError:
        return False


@functools.lru_cache(maxsize=None)
def library_path():
    """Path of the compiled cpu_ops library, building it if needed; None if it cannot be built
    (the reason is printed once to stderr)."""
    cxx = _compiler()
    if cxx is None:
        print("note: no C++ compiler found: the fused CPU kernels are off (same results, slower)", file=sys.stderr)
        return None
    with open(SOURCE, "rb") as f:
        src = f.read()
    key = hashlib.sha1(src + " ".join([cxx] + FLAGS + [_cpu_signature()]).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"vtptq_cpu_ops_{key}.so")
    if _loads(path):
        return path
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
        os.close(fd)
        try:
            subprocess.run([cxx, *FLAGS, "-o", tmp, SOURCE], check=True, capture_output=True, timeout=300)
            if not _loads(tmp):
                raise OSError(f"the library built from {SOURCE} lacks the kernels {', '.join(SYMBOLS)}")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    except (OSError, subprocess.SubprocessError) as e:
        detail = getattr(e, "stderr", b"") or b""
        reason = detail.decode(errors="replace").strip().splitlines()[:1] or [str(e)]
        print(f"note: could not build the fused CPU kernels ({reason[0]}); they are off (same results, slower)",
              file=sys.stderr)
        return None
    return path


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
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
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
