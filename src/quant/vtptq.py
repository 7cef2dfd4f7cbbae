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

from .calibrate import AlternatingSearch, register_method

ROW_CHUNK_ELEMS = 1 << 23


def ranking_loss(scores_fp, scores_q, theta=0.2, pairs=None):
    """Mean pairwise hinge loss per sample.

    scores_fp: (n, ..., T) FP scaled scores (rows on the last axis); scores_q: (c, n, ..., T)
    quantized scores (any leading candidate axes). pairs: None for all pairs i<j, or a tuple
    of index arrays (i, j) of the column pairs to use. Returns float64 (c, n)."""
    t = scores_fp.shape[-1]
    lead = scores_q.shape[:scores_q.ndim - scores_fp.ndim]
    n = scores_fp.shape[0]
    fp_rows = scores_fp.reshape(n, -1, t)
    q_rows = scores_q.reshape(lead + (n, -1, t))
    rows = fp_rows.shape[1]
    num_pairs = t * (t - 1) // 2 if pairs is None else len(pairs[0])
    width = t * t if pairs is None else num_pairs
    total = np.zeros(lead + (n,), np.float64)
    step = max(1, ROW_CHUNK_ELEMS // max(1, width * int(np.prod(lead, dtype=np.int64)) * n))
    for r in range(0, rows, step):
        a = fp_rows[:, r:r + step]
        q = q_rows[..., r:r + step, :]
        if pairs is None:
            # every ordered pair: (i, j) and (j, i) give the same hinge, the diagonal gives θ
            sign = np.sign(a[..., :, None] - a[..., None, :])
            d = q[..., :, None] - q[..., None, :]
        else:
            ii, jj = pairs
            sign = a[..., ii] - a[..., jj]
            np.sign(sign, out=sign)
            d = q[..., ii] - q[..., jj]
        d *= sign
        np.subtract(theta, d, out=d)
        np.maximum(d, 0.0, out=d)
        total += d.reshape(d.shape[:len(lead) + 1] + (-1,)).sum(axis=-1, dtype=np.float64)
    if pairs is None:
        total = (total - rows * t * theta) / 2.0
    return total / (rows * num_pairs)


def sample_pairs(t, num, seed=0):
    """A fixed sample of `num` column pairs i<j of a T-token row (all pairs if num >= T(T-1)/2)."""
    ii, jj = np.triu_indices(t, k=1)
    if num <= 0 or num >= len(ii):
        return ii, jj
    sel = np.sort(np.random.default_rng(seed).choice(len(ii), num, replace=False))
    return ii[sel], jj[sel]


def bias_correction(problem, a_hat, b_hat_right):
    """Expected output error per output channel, E[Ô - O] over samples and tokens: (out,).
    Ô is computed with both operands quantized; the caller subtracts it from the bias."""
    err = np.zeros(problem.target.shape[-1], np.float64)
    count = 0
    for sl in problem.sample_chunks(1):
        out = problem.forward(a_hat[sl], b_hat_right)
        d = (out - problem.target[sl]).reshape(-1, out.shape[-1])
        err += d.sum(axis=0, dtype=np.float64)
        count += d.shape[0]
    return (err / max(count, 1)).astype(np.float32)


@register_method
class VTPTQ(AlternatingSearch):
    """Similarity-aware (Pearson) alternating search, ranking-aware loss on attn.matmul1,
    bias correction after each round; rounds stop when the objective stops improving, at
    most `max_rounds`. Switches: ranking_loss, bias_correction."""

    name = "vtptq"
    objective = "pearson"
    stop_early = True

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

        def loss(out, sl):
            return gamma * ranking_loss(problem.target[sl] * scale, out * scale, theta=theta, pairs=pairs)
        return loss

    def after_round(self, cell, problem, a_hat, b_hat_right):
        if self.qcfg.get("bias_correction", True) and problem.bias is not None:
            problem.bias = (problem.bias - bias_correction(problem, a_hat, b_hat_right)).astype(np.float32)
