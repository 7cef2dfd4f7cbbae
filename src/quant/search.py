"""Interval search maths (numpy): similarity objectives, the candidate grid, and the batched
evaluation of all candidates of one operand's interval for one layer.

A quantized layer is a bilinear function of two operands, out = a @ op(b) (+ bias):
  dense / patch embedding: a = input (N, T, in), b = weight (out, in), op = transpose;
  attn.matmul1: a = Q (N, H, T, d), b = K (N, H, T, d), op = transpose;
  attn.matmul2: a = softmax(A) (N, H, T, T), b = V (N, H, T, d), op = identity.
The search quantizes one operand with each candidate interval while the other stays
quantized at its current interval, and scores each candidate on all calibration samples.
"""
import concurrent.futures
import contextlib
import functools
import os
import queue

import numpy as np

from ..distributed import gather_samples
from ..utils import check_interrupted
from .quantizer import fake_quant_np, fake_quant_row_sums_np

EPS = 1e-12
CHUNK_ELEMS = 1 << 22  # float32 elements of candidate outputs held at once (16 MB): below glibc's
# largest mmap threshold (32 MB), so that with kept_heap_memory() the temporaries of the search
# reuse heap memory instead of being mapped, page-faulted and unmapped chunk after chunk


X_SUM_KEEP_BYTES = 256 << 20  # the most float64 input sums Σ_t x̂ a layer's input searches share
MAX_AUTO_THREADS = 8  # calib_threads 0: one thread per available core, at most this many
GRAM_KEEP_BYTES = 2 << 30  # the most float64 weight Gram matrices (ŴᵀŴ per candidate) a layer's searches share


_THREADS = [1]  # threads of the candidate-chunk loops (set_search_threads; 1: the loops run in the caller)


def available_cores():
    """Cores this process may run on (its CPU affinity where the OS reports it)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_search_threads(n):
    """Threads for the interval search's candidate chunks: n >= 1, or 0 for one per available
    core (at most MAX_AUTO_THREADS). Each chunk is the same computation on the same numbers
    whichever thread runs it, and writes only its own rows: the scores do not depend on n.
    Returns the number set."""
    _THREADS[0] = max(1, min(available_cores(), MAX_AUTO_THREADS) if not n else int(n))
    return _THREADS[0]


@contextlib.contextmanager
def search_threads(n):
    """set_search_threads(n) for the duration of a with block (the previous number after it)."""
    before = _THREADS[0]
    set_search_threads(n)
    try:
        yield _THREADS[0]
    finally:
        _THREADS[0] = before


@functools.cache
def _openblas():
    """(get, set) of the thread count of numpy's bundled OpenBLAS, or None (another BLAS, or
    not found): the library numpy loaded, opened again by its path (the same handle)."""
    import ctypes
    import glob
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs", "libopenblas*"))
    for path in libs:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for suffix in ("64_", ""):
            get = getattr(lib, "openblas_get_num_threads" + suffix, None)
            put = getattr(lib, "openblas_set_num_threads" + suffix, None)
            if get is not None and put is not None:
                get.restype, put.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, put
    return None


@contextlib.contextmanager
def _one_blas_thread():
    """numpy's OpenBLAS on one thread for the duration: the pool's chunks each take a core,
    instead of every chunk's matrix products competing for all of them. A matrix product's
    result does not depend on OpenBLAS's thread count (each output element is one thread's)."""
    blas = _openblas()
    if blas is None:
        yield
        return
    get, put = blas
    before = get()
    put(1)
    try:
        yield
    finally:
        put(before)


def for_each_chunk(fn, starts):
    """fn(start) for every start, on the search threads (in order on one thread); the first
    exception of any chunk is raised here, after the chunks already running end."""
    starts = list(starts)
    if _THREADS[0] == 1 or len(starts) < 2:
        for start in starts:
            fn(start)
        return
    with _one_blas_thread(), concurrent.futures.ThreadPoolExecutor(min(_THREADS[0], len(starts))) as pool:
        futures = [pool.submit(fn, start) for start in starts]
        try:
            for f in futures:
                f.result()
        except BaseException:
            for f in futures:
                f.cancel()
            raise


class WorkBuffers:
    """Work buffers of one for_each_chunk loop, a set per thread that runs its chunks, allocated
    up front by the calling thread and lent to each chunk for its duration (`with w.lend() as
    buf`). The pool's threads are new for every loop, and glibc serves their large blocks with
    fresh mappings: allocated there, every chunk's buffer of tens of MB is page-faulted and
    zeroed by the kernel again (about 15 % of a DeiT-S calibration's time before this). Blocks
    the calling thread allocates come from its heap, which kept_heap_memory keeps for reuse.
    make(): one set (e.g. a dict of arrays)."""

    def __init__(self, make, num_chunks):
        self._free = queue.SimpleQueue()
        for _ in range(max(1, min(_THREADS[0], num_chunks))):
            self._free.put(make())

    @contextlib.contextmanager
    def lend(self):
        buf = self._free.get()
        try:
            yield buf
        finally:
            self._free.put(buf)


def flat_view(buf, shape):
    """A C-contiguous view of the first prod(shape) elements of the 1-d array buf."""
    return buf[:int(np.prod(shape, dtype=np.int64))].reshape(shape)


HEAP_TRIM_BYTES = 1 << 40  # during calibration: free heap memory is not given back (see kept_heap_memory)


def _libc():
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def kept_heap_memory():
    """For the duration: glibc's allocator serves the main thread's blocks from the heap whatever
    their size (no mmap) and keeps freed heap memory for reuse; after it, the free memory is given
    back (malloc_trim). The search allocates and frees temporaries of a few MB to GB thousands of
    times (per round, the Gram matrices of a layer's inputs and candidate weights); each fresh
    mapping is page-faulted and zeroed by the kernel (with the default dynamic thresholds a third
    of DeiT-S calibration time went to it; with blocks above 32 MB still mapped and 1 GB kept, a
    tenth). The pool's threads get their large work buffers from the calling thread
    (WorkBuffers). Yields whether the settings took (False where glibc is not the allocator)."""
    libc = _libc()
    if libc is None:
        yield False
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold, m_mmap_max = -1, -2, -3, -4
    ok = libc.mallopt(m_mmap_threshold, 32 << 20) == 1
    ok &= libc.mallopt(m_mmap_max, 0) == 1  # threads' arenas still map their large blocks
    ok &= libc.mallopt(m_trim_threshold, HEAP_TRIM_BYTES) == 1
    ok &= libc.mallopt(m_top_pad, 64 << 20) == 1
    try:
        yield bool(ok)
    finally:
        libc.mallopt(m_trim_threshold, 1 << 30)
        libc.mallopt(m_mmap_max, 1 << 16)  # glibc's default
        libc.malloc_trim(0)


def cosine(target, out):
    """Cosine similarity per sample. target (n, M), out (..., n, M) -> float64 (..., n)."""
    num = np.einsum("...nm,nm->...n", out, target).astype(np.float64)
    oo = np.einsum("...m,...m->...", out, out).astype(np.float64)
    tt = np.einsum("nm,nm->n", target, target).astype(np.float64)
    return num / np.maximum(np.sqrt(oo * tt), EPS)


def pearson(target, out):
    """Pearson correlation per sample over all elements of the sample's output (the paper's Γ).
    target (n, M), out (..., n, M) -> float64 (..., n).

    Three passes over `out` and no copy of it: Σ o·(t - t̄) (= Σ (o - ō)(t - t̄)), Σ o and Σ o²."""
    m = target.shape[-1]
    tc = target - target.mean(axis=-1, keepdims=True)
    cov = np.einsum("...nm,nm->...n", out, tc).astype(np.float64)
    so = out.sum(axis=-1, dtype=np.float64)
    soo = np.einsum("...m,...m->...", out, out).astype(np.float64)
    var_o = np.maximum(soo - so * so / m, 0.0)
    var_t = np.einsum("nm,nm->n", tc, tc).astype(np.float64)
    return cov / np.maximum(np.sqrt(var_o * var_t), EPS)


OBJECTIVES = {"cosine": cosine, "pearson": pearson}


def candidate_grid(scale0, alpha, beta, num):
    """`num` intervals spaced linearly over [alpha·Δ0, beta·Δ0]: (num, *scale0.shape)."""
    factors = np.linspace(alpha, beta, num, dtype=np.float64)
    return (factors.reshape((-1,) + (1,) * np.ndim(scale0)) * np.asarray(scale0, np.float64)).astype(np.float32)


class LayerProblem:
    """Calibration data of one layer: its two operands, bias and full-precision target output.

    a: (N, ..., K) activations. b: the weight (out, in=K) when `b_shared` (dense), else
    (N, ...) activations. target: (N, ...) FP output. transpose_b: out = a @ bᵀ, else a @ b.
    The second operand is kept as `b_right`, laid out to multiply from the right (contiguous,
    so that numpy's batched products run on BLAS)."""

    def __init__(self, a, b, target, bias=None, transpose_b=True, b_shared=True):
        self.a, self.b, self.target, self.bias = a, b, target, bias
        self.fp_bias = bias  # the bias before any correction
        self.transpose_b, self.b_shared = transpose_b, b_shared
        self.b_right = np.ascontiguousarray(np.swapaxes(b, -1, -2)) if transpose_b else b
        self.n = len(a)
        self.out_elems = int(np.prod(target.shape[1:]))

    def right_scale(self, scale):
        """An interval of b (e.g. per output channel (out, 1)) in the layout of b_right."""
        scale = np.asarray(scale, np.float32)
        return np.swapaxes(scale, -1, -2) if self.transpose_b and scale.ndim >= 2 else scale

    def _add_bias(self, out):
        if self.bias is not None:
            out += self.bias
        return out

    def forward(self, a, b_right):
        """Layer output from a and the right-multiplied operand (no candidate axes)."""
        return self._add_bias(np.matmul(a, b_right))

    def forward_a_candidates(self, a_c, b_right):
        """a_c: (c, n, ..., K) -> (c, n, ...)."""
        if self.b_shared:
            out = (a_c.reshape(-1, a_c.shape[-1]) @ b_right).reshape(a_c.shape[:-1] + (b_right.shape[-1],))
        else:
            out = np.matmul(a_c, b_right)
        return self._add_bias(out)

    def forward_b_candidates(self, a, b_c):
        """b_c: (c, K, out) for a shared weight, else (c, n, ..., K, M) -> (c, n, ...)."""
        if self.b_shared:
            c, k, o = b_c.shape
            flat = a.reshape(-1, k) @ b_c.transpose(1, 0, 2).reshape(k, c * o)  # (n·T, c·out)
            out = np.ascontiguousarray(np.moveaxis(flat.reshape(a.shape[:-1] + (c, o)), -2, 0))
        else:
            out = np.matmul(a, b_c)
        return self._add_bias(out)

    def sample_step(self, num_candidates):
        return max(1, CHUNK_ELEMS // max(1, num_candidates * self.out_elems))

    def sample_chunks(self, num_candidates):
        step = self.sample_step(num_candidates)
        for i in range(0, self.n, step):
            yield slice(i, min(self.n, i + step))


def sample_mean(per_sample, steps):
    """Mean over all calibration samples of per-sample values (C, n) of this rank, gathered
    over the ranks of a sharded calibration (src/distributed.py) and summed as one process
    sums them: chunks of steps[c] samples in order (None: one chunk), each summed by numpy,
    accumulated in float64. steps: one per row (candidate), or one for all. Returns (C,)."""
    full = np.ascontiguousarray(gather_samples(np.asarray(per_sample, np.float64).T).T)
    c, n = full.shape
    steps = list(steps) if np.ndim(steps) else [steps] * c
    total = np.zeros(c, np.float64)
    r = 0
    while r < c:  # rows sharing a step are reduced together, as they were scored together
        r1 = r + 1
        while r1 < c and steps[r1] == steps[r]:
            r1 += 1
        step = steps[r] or max(n, 1)
        for i in range(0, n, step):
            total[r:r1] += np.ascontiguousarray(full[r:r1, i:i + step]).sum(axis=1)
        r = r1
    return total / n


def _expand_candidates(scales, ndim):
    """(C, *scale_shape) -> broadcastable against a (C, ...) stack of `ndim`-dim operands."""
    return scales.reshape(scales.shape[:1] + (1,) * (ndim - scales.ndim + 1) + scales.shape[1:])


def score_candidates(problem, which, candidates, a_hat, b_hat_right, bits, signed, objective,
                     extra_loss=None, cand_chunk=None, quant=None, memo=None):
    """Mean objective over samples for each candidate interval of operand `which` ('a' or 'b').

    candidates: (C, *scale_shape) in the layout of `a` or `b` (per-channel (out, 1) for a
    weight); a_hat / b_hat_right: the other operand already fake-quantized (b in the layout
    of problem.b_right; the one being searched is ignored). extra_loss(out (c, n, ...), sample
    slice) -> (c, n) is subtracted from the objective (the ranking loss). quant(x, scales): the
    fake quantizer of the searched operand (default the uniform grid of bits / signed; another
    grid, e.g. vtptq_plus's log2, takes the candidate-by-candidate path). memo: None, or a dict
    that the caller keeps for one layer, one searched operand and one interval of the fixed
    operand (see AlternatingSearch.calibrate): a later call with the same memo reuses the
    results of the computations that do not depend on the bias, which are the same
    computations on the same numbers (bit-identical results, a fraction of the time). Returns
    float64 (C,)."""
    if quant is None and problem.b_shared and extra_loss is None and objective in OBJECTIVES:
        return _score_dense_moments(problem, which, candidates, a_hat, b_hat_right, bits, signed, objective, memo)
    key = None
    if memo is not None and quant is None:  # the whole result, when the bias is the same too
        key = ("scores", candidates.tobytes(), None if problem.bias is None else problem.bias.tobytes(),
               id(extra_loss), objective, bits, signed, cand_chunk, CHUNK_ELEMS)
        if key in memo:
            return memo[key].copy()
    if quant is None:
        def quant(x, scales):
            return fake_quant_np(x, scales, bits, signed)
    sim = OBJECTIVES[objective] if isinstance(objective, str) else objective
    num_c = len(candidates)
    cand_chunk = cand_chunk or max(1, min(num_c, CHUNK_ELEMS // max(1, problem.out_elems)))
    per_sample, steps = np.zeros((num_c, problem.n), np.float64), [None] * num_c

    def chunk(c0):  # rows c0 .. c0 + cand_chunk of per_sample and steps
        check_interrupted()
        cs = candidates[c0:c0 + cand_chunk]
        cs_right = np.stack([problem.right_scale(c) for c in cs]) if which == "b" else cs
        shared_b = None
        if which == "b" and problem.b_shared:
            shared_b = quant(problem.b_right[None], _expand_candidates(cs_right, problem.b_right.ndim))
        for sl in problem.sample_chunks(len(cs)):
            if which == "a":
                a_c = quant(problem.a[sl][None], _expand_candidates(cs, problem.a.ndim))
                out = problem.forward_a_candidates(a_c, b_hat_right if problem.b_shared else b_hat_right[sl])
            elif shared_b is not None:
                out = problem.forward_b_candidates(a_hat[sl], shared_b)
            else:
                b_c = quant(problem.b_right[sl][None], _expand_candidates(cs_right, problem.b_right.ndim))
                out = problem.forward_b_candidates(a_hat[sl], b_c)
            n = sl.stop - sl.start
            s = sim(problem.target[sl].reshape(n, -1), out.reshape(len(cs), n, -1))
            if extra_loss is not None:
                s = s - extra_loss(out, sl)
            per_sample[c0:c0 + len(cs), sl] = s
        steps[c0:c0 + len(cs)] = [problem.sample_step(len(cs))] * len(cs)

    for_each_chunk(chunk, range(0, num_c, cand_chunk))
    scores = sample_mean(per_sample, steps)
    if key is not None:
        memo[key] = scores.copy()
    return scores


def evaluate_pair(problem, a_hat, b_hat_right, objective, extra_loss=None):
    """Mean objective of the layer with both operands already fake-quantized (b in the layout
    of problem.b_right)."""
    sim = OBJECTIVES[objective] if isinstance(objective, str) else objective
    per_sample = np.zeros((1, problem.n), np.float64)
    for sl in problem.sample_chunks(1):
        b = b_hat_right if problem.b_shared else b_hat_right[sl]
        out = problem.forward(a_hat[sl], b)
        n = sl.stop - sl.start
        s = sim(problem.target[sl].reshape(n, -1), out.reshape(1, n, -1))
        if extra_loss is not None:
            s = s - extra_loss(out[None], sl)
        per_sample[:, sl] = s
    return float(sample_mean(per_sample, problem.sample_step(1))[0])


def _similarity_from_sums(objective, cross, s_o, s_oo, t_norm2, m):
    """Pearson (cross = Σ o·(t - t̄)) or cosine (cross = Σ o·t) from per-sample sums."""
    if objective == "pearson":
        var_o = np.maximum(s_oo - s_o * s_o / m, 0.0)
    else:
        var_o = np.maximum(s_oo, 0.0)
    return cross / np.maximum(np.sqrt(var_o * t_norm2), EPS)


def _score_dense_moments(problem, which, candidates, a_hat, b_hat_right, bits, signed, objective, memo=None):
    """score_candidates for a dense layer (shared weight) without forming the candidate outputs.

    With o = x̂ Ŵᵀ + b per token, the objective needs per sample only Σ o·t', Σ o and Σ o²:
      Σ o·t' = <Ŵ, t'ᵀ x̂> + Σ_o b_o Σ_t t'_o        Σ o = (Σ_t x̂)·(Σ_o Ŵ_o) + T Σ b
      Σ o²   = <ŴᵀŴ, x̂ᵀ x̂> + 2 (Ŵᵀ b)·(Σ_t x̂) + T ‖b‖²
    (t' the centered target for Pearson, the target for cosine). A weight search then costs
    per-sample Gram matrices once and small products per candidate instead of C full layer
    outputs (_weight_search_moments); an input search uses x̂ (ŴᵀŴ) when the layer widens
    (in < out) (_input_search_moments). Sums in float64.

    memo (see score_candidates): the bias-free terms <Ŵ, t'ᵀ x̂>, (Σ_t x̂)·(Σ_o Ŵ_o), <ŴᵀŴ, x̂ᵀ x̂>
    and Σ_t x̂ per chunk are kept; a repeated search recomputes only the bias terms, with the
    same operations on the same arrays. memo["layer"], when present, is shared by the memos of
    one layer: weight searches at different input intervals reuse the candidates' ŴᵀŴ there."""
    key = ("moments", which, candidates.tobytes(), objective, bits, signed, CHUNK_ELEMS)
    parts = {} if memo is None else memo.setdefault(key, {})
    layer = None if memo is None else memo.get("layer")
    target = functools.cache(lambda: _target_moments(problem, objective))  # only where a term is computed
    t_sum, t_norm2 = (parts["t_sum"], parts["t_norm2"]) if "t_norm2" in parts else target()[1:]
    bias = np.zeros(problem.target.shape[-1]) if problem.bias is None else problem.bias.astype(np.float64)
    n_tok = problem.a.shape[-2]
    # the bias terms: Σ_o b_o Σ_t t'_o (n,), T Σ b and T ‖b‖²
    bias_terms = _BiasTerms(bias, t_sum @ bias, n_tok * bias.sum(), n_tok * float(bias @ bias))
    search = _weight_search_moments if which == "b" else _input_search_moments
    per_sample, step = search(problem, candidates, a_hat if which == "b" else b_hat_right, bits, signed, objective,
                              parts, layer, target, t_norm2, bias_terms)
    parts.update(t_sum=t_sum, t_norm2=t_norm2)  # every bias-free term is in `parts` now
    return sample_mean(per_sample, step)


class _BiasTerms:
    """The bias b (float64) and the terms of the moments that depend on it alone."""

    def __init__(self, bias, t_bias, const_o, const_oo):
        self.bias, self.t_bias, self.const_o, self.const_oo = bias, t_bias, const_o, const_oo


def _target_moments(problem, objective):
    """(t', Σ_t t', ‖t'‖²): the target per sample (n, T, O) in float64, centered for Pearson, its
    sum over tokens (n, O) and its squared norm (n,)."""
    n_tok = problem.a.shape[-2]
    t = problem.target.reshape(problem.n, n_tok, -1).astype(np.float64)
    if objective == "pearson":
        t = t - t.mean(axis=(1, 2), keepdims=True)
    t_norm2 = np.einsum("nto,nto->n", t, t)
    return t, t.sum(axis=1), t_norm2


TRANSPOSE_COPY_MIN = 1024  # aᵀ·b with a's last axis at least this long: from a contiguous copy of aᵀ


def _transposed_matmul(a, b, out=None):
    """aᵀ·b over the last two axes. Where a's last axis is long (K x K results, K ≥ 1024, e.g.
    DeiT-S mlp.fc2's Gram matrices), numpy's product of the transposed view runs at half the
    speed of the product of a contiguous copy; the two give the same bits (the same BLAS
    products, tests/test_search_threads.py)."""
    at = np.swapaxes(a, -1, -2)
    if a.shape[-1] >= TRANSPOSE_COPY_MIN:
        at = np.ascontiguousarray(at)
    return np.matmul(at, b, out=out)


def _weight_search_moments(problem, candidates, a_hat, bits, signed, objective, parts, layer, target, t_norm2, bt):
    """Per-sample similarity (C, n) of each candidate weight interval, in chunks of 16 candidates,
    and the sample step of its mean (None: one chunk). The bias-free terms of a chunk come from
    `parts` or are computed (and kept there) from the input's per-sample sums and Gram matrices."""
    n, n_tok, k = problem.n, problem.a.shape[-2], problem.a.shape[-1]

    @functools.cache
    def input_sums():  # Σ_t x̂ (n, K), x̂ᵀx̂ (n, K·K), t'ᵀx̂ (n, O·K)
        x = a_hat.reshape(n, n_tok, k).astype(np.float64)
        gram_x = _transposed_matmul(x, x).reshape(n, -1)
        cross_x = np.matmul(np.swapaxes(target()[0], 1, 2), x).reshape(n, -1)
        return x.sum(axis=1), gram_x, cross_x

    x_sum = parts["x_sum"] if "x_sum" in parts else input_sums()[0]
    # ŴᵀŴ of every candidate depends on neither operand's other interval nor the bias: the
    # searches of one layer share them when they fit GRAM_KEEP_BYTES
    grams = None
    if layer is not None and len(candidates) * k * k * 8 <= GRAM_KEEP_BYTES:
        grams = layer.setdefault(("gram_w", candidates.tobytes(), bits, signed), {})
    per_sample = np.zeros((len(candidates), n), np.float64)
    starts = range(0, len(candidates), 16)
    todo = [c0 for c0 in starts if c0 not in parts]
    width = min(16, len(candidates))
    # per thread: Ŵ in float64, and ŴᵀŴ when it is not kept (16 x K² x 8 bytes); the kept ŴᵀŴ
    # still to compute get their blocks here too (all from the calling thread, see WorkBuffers)
    work = WorkBuffers(lambda: dict(w=np.empty((width,) + problem.b.shape, np.float64),
                                    gram=None if grams is not None or not todo else np.empty((width, k, k))),
                       len(starts))
    new_grams = {} if grams is None else {c0: np.empty((min(16, len(candidates) - c0), k, k))
                                          for c0 in todo if c0 not in grams}

    def chunk(c0):  # rows c0 .. c0 + 16 of per_sample
        check_interrupted()
        cs = candidates[c0:c0 + 16]
        with work.lend() as buf:
            w = fake_quant_np(problem.b[None], _expand_candidates(cs, problem.b.ndim), bits, signed,
                              out=buf["w"][:len(cs)])
            if c0 not in parts:
                _, gram_x, cross_x = input_sums()
                g = None if grams is None else grams.get(c0)
                if g is None:
                    g = _transposed_matmul(w, w, out=buf["gram"][:len(cs)] if grams is None else new_grams[c0])
                    if grams is not None:
                        grams[c0] = g
                parts[c0] = (w.reshape(len(cs), -1) @ cross_x.T, w.sum(axis=1) @ x_sum.T,
                             g.reshape(len(cs), -1) @ gram_x.T)
            wx, wsx, gx = parts[c0]
            cross = wx + bt.t_bias                        # (c, n)
            s_o = wsx + bt.const_o
            s_oo = gx + 2.0 * (np.einsum("cok,o->ck", w, bt.bias) @ x_sum.T) + bt.const_oo
        per_sample[c0:c0 + len(cs)] = _similarity_from_sums(objective, cross, s_o, s_oo, t_norm2, problem.out_elems)

    if todo:
        input_sums()  # computed once (its products on every core), before the chunks share it
    for_each_chunk(chunk, starts)
    parts["x_sum"] = x_sum
    return per_sample, None


def _input_search_moments(problem, candidates, b_hat_right, bits, signed, objective, parts, layer, target, t_norm2,
                          bt):
    """Per-sample similarity (C, n) of each candidate input interval, in chunks of candidates and
    samples of CHUNK_ELEMS, and the sample step of its mean. The bias-free terms of a chunk come
    from `parts` or are computed (and kept there) from the fake-quantized inputs."""
    a, n = problem.a, problem.n
    n_tok, k = a.shape[-2], a.shape[-1]
    w = np.swapaxes(b_hat_right, -1, -2)  # Ŵ (O, K), float32
    w64 = w.astype(np.float64)
    widen = k < w.shape[0]

    @functools.cache
    def weight_sums():  # t'Ŵ (n, T, K) float32, Σ_o Ŵ_o (K,), ŴᵀŴ (K, K) float32 when the layer widens
        gram_w = (w64.T @ w64).astype(np.float32) if widen else None
        return (target()[0] @ w64).astype(np.float32), w64.sum(axis=0), gram_w

    def quantized_inputs(cs, sl, buf, sums=False):  # x̂ (c, n, T, K), or (x̂, Σ_t x̂ (c, n, K) in float64)
        x = a[sl].reshape(-1, n_tok, k)[None]
        out = flat_view(buf, (len(cs),) + x.shape[1:])
        quant = fake_quant_row_sums_np if sums else fake_quant_np
        return quant(x, _expand_candidates(cs, 3), bits, signed, out=out)

    w_bias = w64.T @ bt.bias
    sample_elems = n_tok * max(k, w.shape[0])
    step_n = max(1, CHUNK_ELEMS // max(1, len(candidates) * sample_elems))
    cand_chunk = len(candidates) if step_n > 1 else max(1, CHUNK_ELEMS // sample_elems)
    per_sample = np.zeros((len(candidates), n), np.float64)
    # Σ_t x̂ per chunk depends only on the candidates: kept once per layer when it is small, else a
    # repeated search fake-quantizes x again for it
    x_sums = None
    if layer is not None and len(candidates) * n * k * 8 <= X_SUM_KEEP_BYTES:
        x_sums = layer.setdefault(("x_sum", candidates.tobytes(), bits, signed, CHUNK_ELEMS), {})

    starts = range(0, len(candidates), cand_chunk)
    todo = any((c0, i) not in parts for c0 in starts for i in range(0, n, step_n))
    # per thread: the chunk's fake-quantized inputs (float32), from the calling thread (WorkBuffers)
    quantizes = todo or x_sums is None
    work = WorkBuffers(lambda: np.empty(min(cand_chunk, len(candidates)) * min(step_n, n) * n_tok * k
                                        if quantizes else 0, np.float32), len(starts))

    def chunk(c0):  # rows c0 .. c0 + cand_chunk of per_sample
        check_interrupted()
        cs = candidates[c0:c0 + cand_chunk]
        with work.lend() as buf:
            chunk_rows(c0, cs, buf)

    def chunk_rows(c0, cs, buf):
        for i in range(0, n, step_n):
            sl = slice(i, min(n, i + step_n))
            x_sum = None if x_sums is None else x_sums.get((c0, i))
            if (c0, i) not in parts:
                tw, w_sum, gram_w = weight_sums()
                if x_sum is None:
                    xc, x_sum = quantized_inputs(cs, sl, buf, sums=True)
                else:
                    xc = quantized_inputs(cs, sl, buf)
                if widen:
                    s_oo0 = np.einsum("cntk,cntk->cn", xc @ gram_w, xc).astype(np.float64)
                else:
                    out = xc @ np.ascontiguousarray(w.T)
                    s_oo0 = np.einsum("cnto,cnto->cn", out, out).astype(np.float64)
                parts[c0, i] = np.einsum("cntk,ntk->cn", xc, tw[sl]).astype(np.float64), x_sum @ w_sum, s_oo0
                if x_sums is not None:
                    x_sums[c0, i] = x_sum
            elif x_sum is None:
                x_sum = quantized_inputs(cs, sl, buf, sums=True)[1]
            cross0, s_o0, s_oo0 = parts[c0, i]
            cross = cross0 + bt.t_bias[sl]
            s_o = s_o0 + bt.const_o
            s_oo = s_oo0 + 2.0 * (x_sum @ w_bias) + bt.const_oo
            per_sample[c0:c0 + len(cs), sl] = _similarity_from_sums(objective, cross, s_o, s_oo, t_norm2[sl],
                                                                    problem.out_elems)

    if todo:
        weight_sums()  # computed once, before the chunks share it
    for_each_chunk(chunk, starts)
    return per_sample, step_n
