"""The paper's method (Liu et al., NeurIPS 2021): similarity-aware interval search with the
Pearson correlation, a ranking-aware loss on the attention scores of Q·Kᵀ, and bias
correction after each search round.

    objective = (1/N) Σ_i Γ(O_i, Ô_i)  -  γ · L_rank          (L_rank only for attn.matmul1)
    L_rank    = mean over heads, rows k and column pairs i<j of
                max(0, θ - (Â_ki - Â_kj) · sign(A_ki - A_kj))

The paper writes L_rank as a sum; a sum over ~19,000 pairs per row would swamp the
similarity term (a mean in [-1, 1]) at γ = 0.1, so it is averaged over pairs here. A and Â
are the scaled scores (after the head_dim^-0.5 factor, before the softmax). With
`ranking_pairs` > 0 a fixed, seeded sample of that many column pairs per row is used
instead of all T(T-1)/2 pairs.
"""
import numpy as np

from ..distributed import gather_samples
from .calibrate import AlternatingSearch, register_method

ROW_CHUNK_ELEMS = 1 << 22  # float32 pair differences held at once (16 MB; see search.CHUNK_ELEMS)
PAIR_INDEX_KEEP_BYTES = 256 << 20  # pair indices of the sampled pairs kept per layer search (see pair_index)
PAIR_BLOCK_ELEMS = 1 << 18  # float32 pair differences per block of all pairs (1 MB, cache-sized)


def ranking_loss(scores_fp, scores_q, theta=0.2, pairs=None, index=None):
    """Mean pairwise hinge loss per sample.

    scores_fp: (n, ..., T) FP scaled scores (rows on the last axis); scores_q: (c, n, ..., T)
    quantized scores (any leading candidate axes). pairs: None for all pairs i<j, or a tuple
    of index arrays (i, j) of the column pairs to use; index: their pair_index(scores_fp, pairs)
    if known. Returns float64 (c, n).

    Each hinge is computed in the dtype of scores_q (float32 in the search) and summed in
    float64. With pairs=None the result is that of ranking_loss_reference (to ~1e-15, the sums
    run in another order), which removes the diagonal as T·θ where it summed T hinges
    float32(θ): it exceeds the mean over the pairs i<j by (float32(θ) - θ) / (T - 1)."""
    if pairs is not None:
        return _ranking_loss_pairs(scores_fp, scores_q, theta, pairs, index)
    t = scores_fp.shape[-1]
    theta_q = float(np.asarray(theta, scores_q.dtype))  # θ in the dtype of the hinges (float32: not 0.2)
    return ranking_loss_all_pairs(scores_fp, scores_q, theta) + (theta_q - theta) / max(t - 1, 1)


def ranking_loss_all_pairs(scores_fp, scores_q, theta=0.2):
    """Mean hinge over all column pairs i<j: ranking_loss(pairs=sample_pairs(T, 0)) (the hinges
    computed the same way, summed in float64 in another order), O(T²) per row without gathers.

    The columns of each row are sorted by decreasing FP score: the pairs at offset k, (p, p + k),
    then have sign +1 (0 for a tie), and their differences are two contiguous slices. Rows are
    laid out on the inner axis (T, c·rows), in blocks of about PAIR_BLOCK_ELEMS differences."""
    t = scores_fp.shape[-1]
    lead = scores_q.shape[:scores_q.ndim - scores_fp.ndim]
    n = scores_fp.shape[0]
    c = int(np.prod(lead, dtype=np.int64))
    fp_rows = scores_fp.reshape(n, -1, t)
    rows = fp_rows.shape[1]
    order = np.argsort(-fp_rows, axis=-1, kind="stable")
    a_sorted = np.take_along_axis(fp_rows, order, axis=-1)
    q_rows = scores_q.reshape(c, n, rows, t)
    total = np.zeros((c, n), np.float64)  # twice the sum of the hinges
    step = max(1, PAIR_BLOCK_ELEMS // (c * t))  # rows per block
    sums = _hinge_sums_kernel(q_rows, order, a_sorted, theta)
    if sums is not None:  # the same per-column sums as the loop below computes (cpu_ops.cc)
        for s, r in ((s, r) for s in range(n) for r in range(0, rows, step)):
            total[:, s] += np.ascontiguousarray(sums[:, s, r:r + step]).sum(axis=1)
        return (total / (rows * t * (t - 1))).reshape(lead + (n,))
    for s, r in ((s, r) for s in range(n) for r in range(0, rows, step)):
        a = np.ascontiguousarray(a_sorted[s, r:r + step].T)  # (T, rows of the block)
        tied = bool(np.any(a[1:] == a[:-1]))
        q = np.take_along_axis(q_rows[:, s, r:r + step], order[None, s, r:r + step], axis=-1)
        q = np.ascontiguousarray(q.transpose(2, 0, 1)).reshape(t, -1)  # (T, c·rows): contiguous slices
        buf = np.empty((2,) + q.shape, q.dtype)
        acc = np.zeros(q.shape[1], np.float64)
        for k in range(1, t):
            d, mag = buf[0, :t - k], buf[1, :t - k]
            np.subtract(q[:t - k], q[k:], out=d)  # fl(Â_hi - Â_lo) of the pairs (p, p + k)
            if tied:  # a tie: difference 0, hinge θ
                d.reshape(t - k, c, -1)[...] *= (a[:t - k] != a[k:])[:, None, :]
            np.subtract(theta, d, out=d)
            np.abs(d, out=mag)
            d += mag  # x + |x| = 2·max(0, x) exactly, and faster than np.maximum
            acc += d.sum(axis=0, dtype=np.float64)
        total[:, s] += acc.reshape(c, -1).sum(axis=1)
    return (total / (rows * t * (t - 1))).reshape(lead + (n,))


def _pair_hinge_kernel():
    """The compiled RankHingePairs (cpu_ops.cc), or None where the kernels are off."""
    import ctypes
    from ..kernels import numpy_kernel
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    return numpy_kernel("RankHingePairs", (p, i64, i64, p, p, i64, ctypes.c_float, p))


def _hinge_sums_kernel(q_rows, order, a_sorted, theta):
    """(c, n, rows) float64: per candidate and row, Σ_k Σ_p of the loop of ranking_loss_all_pairs
    (acc before it is summed over a block's rows), by the compiled kernel RankHingeAllPairs (one
    pass, the pairs in registers; the same float32 hinges and float64 sums in the same order, so
    the same bits); None where the kernels are off or the scores are not float32."""
    import ctypes
    from ..kernels import numpy_kernel
    if q_rows.dtype != np.float32 or a_sorted.dtype != np.float32:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    fn = numpy_kernel("RankHingeAllPairs", (p, p, p, i64, i64, i64, ctypes.c_float, p))
    if fn is None:
        return None
    c, n, rows, t = q_rows.shape
    q = np.ascontiguousarray(q_rows)
    order = np.ascontiguousarray(order, np.int64)
    a_sorted = np.ascontiguousarray(a_sorted)
    sums = np.empty((c, n, rows), np.float64)
    if fn(q.ctypes.data, order.ctypes.data, a_sorted.ctypes.data, c, n * rows, t, float(np.float32(theta)),
          sums.ctypes.data) != 0:
        raise RuntimeError("RankHingeAllPairs: bad arguments")
    return sums


def ranking_loss_reference(scores_fp, scores_q, theta=0.2):
    """ranking_loss over all pairs as commit fdfbc73 computed it (every ordered pair, with a sign
    pass), kept as the reference of the tests and of bench/ranking_cost.py. Arguments and result
    as ranking_loss's."""
    t = scores_fp.shape[-1]
    lead = scores_q.shape[:scores_q.ndim - scores_fp.ndim]
    n = scores_fp.shape[0]
    fp_rows = scores_fp.reshape(n, -1, t)
    q_rows = scores_q.reshape(lead + (n, -1, t))
    rows = fp_rows.shape[1]
    total = np.zeros(lead + (n,), np.float64)
    step = max(1, ROW_CHUNK_ELEMS // max(1, t * t * int(np.prod(lead, dtype=np.int64)) * n))
    for r in range(0, rows, step):
        a = fp_rows[:, r:r + step]
        q = q_rows[..., r:r + step, :]
        # every ordered pair: (i, j) and (j, i) give the same hinge, the diagonal gives θ
        d = q[..., :, None] - q[..., None, :]
        d *= np.sign(a[..., :, None] - a[..., None, :])
        np.subtract(theta, d, out=d)
        np.maximum(d, 0.0, out=d)
        total += d.reshape(d.shape[:len(lead) + 1] + (-1,)).sum(axis=-1, dtype=np.float64)
    total = (total - rows * t * theta) / 2.0
    return total / (rows * t * (t - 1) // 2)


def pair_index(scores_fp, pairs):
    """Flat indices (hi, lo) into the (n, rows, T) scores of the two columns of every given pair
    in every row, oriented so that hi has the larger FP score (a tie: lo = hi); (n·rows·P,) each.
    They depend only on the FP scores: the search computes them once per sample chunk."""
    t = scores_fp.shape[-1]
    n = scores_fp.shape[0]
    fp_rows = scores_fp.reshape(n, -1, t)
    rows = fp_rows.shape[1]
    ii, jj = pairs
    a_i, a_j = fp_rows[..., ii], fp_rows[..., jj]  # (n, rows, P)
    first = a_i > a_j
    hi, lo = np.where(first, ii, jj), np.where(first, jj, ii)
    tie = a_i == a_j
    lo[tie] = hi[tie]
    base = (np.arange(n * rows, dtype=np.int64) * t).reshape(n, rows, 1)
    return (hi + base).ravel(), (lo + base).ravel()


def _ranking_loss_pairs(scores_fp, scores_q, theta, pairs, index=None):
    """ranking_loss over the given column pairs. Each pair is oriented per row so that its
    first index has the larger FP score (sign +1), and a tie points both indices at the same
    column (hinge max(0, θ - 0) = θ, as sign 0 gives); the hinge then needs two gathers from
    the flat quantized scores and no sign pass. index: pair_index(scores_fp, pairs), if known."""
    t = scores_fp.shape[-1]
    lead = scores_q.shape[:scores_q.ndim - scores_fp.ndim]
    n = scores_fp.shape[0]
    rows = int(np.prod(scores_fp.shape[1:-1], dtype=np.int64))
    hi, lo = pair_index(scores_fp, pairs) if index is None else index
    c = int(np.prod(lead, dtype=np.int64))
    q = scores_q.reshape(c, n * rows * t)
    total = np.zeros((c, n), np.float64)
    per_sample = rows * len(pairs[0])
    step = max(1, ROW_CHUNK_ELEMS // max(1, c * per_sample))  # samples per chunk
    kernel = _pair_hinge_kernel() if q.dtype == np.float32 else None
    for s0 in range(0, n, step):
        sel = slice(s0 * per_sample, min(n, s0 + step) * per_sample)
        if kernel is not None:  # the same float32 hinges in one pass (cpu_ops.cc)
            h, l = np.ascontiguousarray(hi[sel], np.int64), np.ascontiguousarray(lo[sel], np.int64)
            q = np.ascontiguousarray(q)
            d = np.empty((c, len(h)), np.float32)
            if kernel(q.ctypes.data, c, q.shape[1], h.ctypes.data, l.ctypes.data, len(h), float(np.float32(theta)),
                      d.ctypes.data) != 0:
                raise RuntimeError("RankHingePairs: bad arguments")
        else:
            d = np.take(q, hi[sel], axis=1)
            d -= np.take(q, lo[sel], axis=1)
            np.subtract(theta, d, out=d)
            np.maximum(d, 0.0, out=d)
        total[:, s0:s0 + step] = d.reshape(c, -1, per_sample).sum(axis=-1, dtype=np.float64)
    return (total / per_sample).reshape(lead + (n,))


def sample_pairs(t, num, seed=0):
    """A fixed sample of `num` column pairs i<j of a T-token row (all pairs if num >= T(T-1)/2)."""
    ii, jj = np.triu_indices(t, k=1)
    if num <= 0 or num >= len(ii):
        return ii, jj
    sel = np.sort(np.random.default_rng(seed).choice(len(ii), num, replace=False))
    return ii[sel], jj[sel]


def bias_correction(problem, a_hat, b_hat_right):
    """Expected output error per output channel, E[Ô - O] over samples and tokens: (out,).
    Ô is computed with both operands quantized; the caller subtracts it from the bias.
    Per-sample sums over tokens, gathered over the ranks of a sharded calibration, then
    summed over samples in order (the same sums in one process and in several)."""
    width = problem.target.shape[-1]
    sums = np.zeros((problem.n, width), np.float64)
    tokens = 0
    for sl in problem.sample_chunks(1):
        out = problem.forward(a_hat[sl], b_hat_right)
        d = (out - problem.target[sl]).reshape(sl.stop - sl.start, -1, width)
        sums[sl] = d.sum(axis=1, dtype=np.float64)
        tokens = d.shape[1]
    sums = gather_samples(sums)
    return (sums.sum(axis=0) / max(len(sums) * tokens, 1)).astype(np.float32)


@register_method
class VTPTQ(AlternatingSearch):
    """Similarity-aware (Pearson) alternating search, ranking-aware loss on attn.matmul1,
    bias correction after each round; rounds stop when the objective stops improving, at
    most `max_rounds`. Switches: ranking_loss, bias_correction."""

    name = "vtptq"
    objective = "pearson"
    stop_early = True
    shardable = True

    def rounds(self):
        return self.qcfg["max_rounds"]

    def extra_loss(self, cell, problem):
        q = self.qcfg
        if not q.get("ranking_loss", True) or not getattr(cell, "is_attention_scores", False):
            return None
        scale = cell.scores_scale
        t = problem.target.shape[-1]
        pairs = sample_pairs(t, q.get("ranking_pairs", 0), seed=q.get("calib_seed", 0))
        theta, gamma = q["ranking_theta"], q["ranking_gamma"]
        if len(pairs[0]) == t * (t - 1) // 2:  # all pairs: the same hinges, summed without gathers

            def loss(out, sl):
                return gamma * ranking_loss_all_pairs(problem.target[sl] * scale, out * scale, theta=theta)
            return loss

        indices, kept = {}, [0]  # pair_index per sample chunk, kept up to PAIR_INDEX_KEEP_BYTES

        def loss(out, sl):
            fp = problem.target[sl] * scale
            index = indices.get((sl.start, sl.stop))
            if index is None:
                index = pair_index(fp, pairs)
                if kept[0] + 2 * index[0].nbytes <= PAIR_INDEX_KEEP_BYTES:
                    indices[sl.start, sl.stop] = index
                    kept[0] += 2 * index[0].nbytes
            return gamma * ranking_loss(fp, out * scale, theta=theta, pairs=pairs, index=index)
        return loss

    def after_round(self, cell, problem, a_hat, b_hat_right):
        if self.qcfg.get("bias_correction", True) and problem.bias is not None:
            problem.bias = (problem.bias - bias_correction(problem, a_hat, b_hat_right)).astype(np.float32)
