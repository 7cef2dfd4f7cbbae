"""Interval search maths (numpy): similarity objectives, the candidate grid, and the batched
evaluation of all candidates of one operand's interval for one layer.

A quantized layer is a bilinear function of two operands, out = a @ op(b) (+ bias):
  dense / patch embedding: a = input (N, T, in), b = weight (out, in), op = transpose;
  attn.matmul1: a = Q (N, H, T, d), b = K (N, H, T, d), op = transpose;
  attn.matmul2: a = softmax(A) (N, H, T, T), b = V (N, H, T, d), op = identity.
The search quantizes one operand with each candidate interval while the other stays
quantized at its current interval, and scores each candidate on all calibration samples.
"""
import numpy as np

from .quantizer import fake_quant_np

EPS = 1e-12
CHUNK_ELEMS = 1 << 23  # float32 elements of candidate outputs held at once (32 MB)


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

    def sample_chunks(self, num_candidates):
        step = max(1, CHUNK_ELEMS // max(1, num_candidates * self.out_elems))
        for i in range(0, self.n, step):
            yield slice(i, min(self.n, i + step))


def _expand_candidates(scales, ndim):
    """(C, *scale_shape) -> broadcastable against a (C, ...) stack of `ndim`-dim operands."""
    return scales.reshape(scales.shape[:1] + (1,) * (ndim - scales.ndim + 1) + scales.shape[1:])


def score_candidates(problem, which, candidates, a_hat, b_hat_right, bits, signed, objective,
                     extra_loss=None, cand_chunk=None):
    """Mean objective over samples for each candidate interval of operand `which` ('a' or 'b').

    candidates: (C, *scale_shape) in the layout of `a` or `b` (per-channel (out, 1) for a
    weight); a_hat / b_hat_right: the other operand already fake-quantized (b in the layout
    of problem.b_right; the one being searched is ignored). extra_loss(out (c, n, ...), sample
    slice) -> (c, n) is subtracted from the objective (the ranking loss). Returns float64 (C,)."""
    sim = OBJECTIVES[objective] if isinstance(objective, str) else objective
    num_c = len(candidates)
    cand_chunk = cand_chunk or max(1, min(num_c, CHUNK_ELEMS // max(1, problem.out_elems)))
    total = np.zeros(num_c, np.float64)
    for c0 in range(0, num_c, cand_chunk):
        cs = candidates[c0:c0 + cand_chunk]
        cs_right = np.stack([problem.right_scale(c) for c in cs]) if which == "b" else cs
        shared_b = None
        if which == "b" and problem.b_shared:
            shared_b = fake_quant_np(problem.b_right[None], _expand_candidates(cs_right, problem.b_right.ndim),
                                     bits, signed)
        for sl in problem.sample_chunks(len(cs)):
            if which == "a":
                a_c = fake_quant_np(problem.a[sl][None], _expand_candidates(cs, problem.a.ndim), bits, signed)
                out = problem.forward_a_candidates(a_c, b_hat_right if problem.b_shared else b_hat_right[sl])
            elif shared_b is not None:
                out = problem.forward_b_candidates(a_hat[sl], shared_b)
            else:
                b_c = fake_quant_np(problem.b_right[sl][None],
                                    _expand_candidates(cs_right, problem.b_right.ndim), bits, signed)
                out = problem.forward_b_candidates(a_hat[sl], b_c)
            n = sl.stop - sl.start
            s = sim(problem.target[sl].reshape(n, -1), out.reshape(len(cs), n, -1))
            if extra_loss is not None:
                s = s - extra_loss(out, sl)
            total[c0:c0 + len(cs)] += s.sum(axis=1)
    return total / problem.n


def evaluate_pair(problem, a_hat, b_hat_right, objective, extra_loss=None):
    """Mean objective of the layer with both operands already fake-quantized (b in the layout
    of problem.b_right)."""
    sim = OBJECTIVES[objective] if isinstance(objective, str) else objective
    total = 0.0
    for sl in problem.sample_chunks(1):
        b = b_hat_right if problem.b_shared else b_hat_right[sl]
        out = problem.forward(a_hat[sl], b)
        n = sl.stop - sl.start
        s = sim(problem.target[sl].reshape(n, -1), out.reshape(1, n, -1))
        if extra_loss is not None:
            s = s - extra_loss(out[None], sl)
        total += float(s.sum())
    return total / problem.n
