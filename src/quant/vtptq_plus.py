"""`vtptq_plus`: the paper's similarity search (vtptq) plus later ViT PTQ techniques, each a
switch (a config key; null = the method's default, SWITCHES: always off for vtptq; for
vtptq_plus, on except recon_iters, which is off by default; every default was decided on
the val split, docs/results.md "vtptq_plus defaults, decided on val"):

  ln_reparam             scale reparameterization after LayerNorm: per-channel centres m_c and
                         ranges h_c of the inputs of attn.qkv and mlp.fc1 folded into the
                         LayerNorm (γ' = γ/r, β' = (β - m)/r) and the next layer (W' = W·diag(r),
                         b' = b + W m), r_c = (h_c / mean h)^α. The deployed layer keeps one
                         activation interval per tensor. (α, centring) per layer from
                         {0, 0.5, 1} x {no, yes}, chosen by the layer's Pearson objective on the
                         calibration images (α = 0 without centring is no fold).
  softmax_quantizer      grid of the softmax output (matmul2's first operand): uniform, log2,
                         logsqrt2 (see quantizer.KINDS for their integer forms), or auto: per
                         layer, the one of unsigned uniform / log2 / log√2 whose search reaches
                         the best objective on the calibration images.
  gelu_asymmetric        an asymmetric grid with a zero point for the post-GELU input of mlp.fc2
                         (z = round(-min / Δ), the minimum over the calibration inputs; Δ searched).
  weight_channel_search  per-output-channel weight intervals, each channel's searched on its own
                         (after vtptq's shared multiplier) by coordinate ascent of the layer's
                         mean per-sample Pearson correlation; implies weight_per_channel.
  attn_reparam           per-channel folds inside the attention: Q' = Q·s, K' = K/s (s from the
                         channel ranges of K and Q) and V' = V/t with attn.proj's weight columns
                         times t (t from V's channel ranges), folded into attn.qkv's rows and
                         attn.proj; each with α in {0, 0.5, 1} chosen per block by a Pearson
                         proxy on the calibration images (α = 0: no fold).
  recon_iters            learned weight rounding (AdaRound-style, layer by layer, MSE of the
                         layer output from its quantized input) for this many Adam steps per
                         layer; 0 = off. Kept for a layer only if, learned on 3/4 of the
                         calibration images, it beats nearest rounding on the other 1/4.
  block_recon_iters      block-wise reconstruction (BRECQ-style): after a transformer block is
                         calibrated, the rounding of its four weights is learned together for
                         this many Adam steps against the block's FP output, with every
                         activation quantized and QDrop (src/quant/block_recon.py); 0 = off.
                         Learned on 3/4 of the calibration images, kept for a block only if it
                         lowers the block's output error on the other 1/4. Off by default.

Every grid has at most 2^b levels at b bits (see quantizer.grid_levels).

Sharded calibration (src/distributed.py): every quantity reduced over calibration samples
goes through the distributed helpers, so a sharded run gives the single-process intervals:
channel minima and maxima (folds, log and asymmetric grids, max-based starts) through
max_over_samples (a minimum as the maximum of the negation); objectives through
search.sample_mean; the per-sample sums of the per-channel weight search through
gather_samples; learned rounding gathers the layer's quantized input and target (the
single-process arrays, so its held-out split and its Gram matrices are the same), and block
reconstruction the block's quantized-path input and FP output.
"""
import time

import numpy as np

from ..config import ConfigError
from ..distributed import gather_samples, local_reductions, max_over_samples, sharding_calibration
from .block_recon import SoftRounding, reconstruct_block
from .calibrate import operand_roles, register_method
from .quantizer import (EPS, LOG_INV_STEP, fake_quant_asym_np, fake_quant_log_np, fake_quant_np, init_scale,
                        zero_point)
from .search import LayerProblem, _similarity_from_sums, candidate_grid, evaluate_pair, score_candidates
from .vtptq import VTPTQ

RECON_ITERS = 0  # vtptq_plus's default of recon_iters: off (chosen on val: docs/results.md)
BLOCK_RECON_ITERS = 0  # vtptq_plus's default of block_recon_iters: off (chosen on val, docs/results.md)
# key -> (the only value vtptq accepts: off, vtptq_plus's default). vtptq_plus turns on every
# switch but recon_iters and block_recon_iters; each default is the one the val split chose (docs/results.md).
SWITCHES = {
    "ln_reparam": (False, True),
    "softmax_quantizer": ("uniform", "auto"),
    "gelu_asymmetric": (False, True),
    "weight_channel_search": (False, True),
    "recon_iters": (0, RECON_ITERS),
    "attn_reparam": (False, True),  # on since the val decision (a tie within the noise, docs/results.md)
    "block_recon_iters": (0, BLOCK_RECON_ITERS),
}
SOFTMAX_AUTO = ("uniform", "log2", "logsqrt2")
REPARAM_ALPHAS = (0.0, 0.5, 1.0)
REPARAM_CANDIDATES = 25  # activation intervals tried per (α, centring) when choosing the fold


def sample_max(x, axis=None, keepdims=False):
    """Maximum of x over `axis` (axis 0 or None: over the samples), then over the ranks of a
    sharded calibration (exact for float32 x, the dtype of every capture)."""
    m = np.asarray(np.asarray(x).max(axis=axis, keepdims=keepdims))
    return max_over_samples(m).astype(m.dtype) if sharding_calibration() else m


def sample_min(x, axis=None, keepdims=False):
    """Minimum of x over `axis`, then over the ranks of a sharded calibration (see sample_max)."""
    m = np.asarray(np.asarray(x).min(axis=axis, keepdims=keepdims))
    return (-max_over_samples(-m)).astype(m.dtype) if sharding_calibration() else m


def resolve_switches(cfg):
    """Replace null switches by the method's default, in place; a one-line ConfigError for a
    switch that the method or the other keys cannot honour. Returns {switch: value}."""
    method = cfg.get("method")
    plus = method == "vtptq_plus"
    for key, (off, plus_default) in SWITCHES.items():
        value = cfg.get(key)
        if value is None:
            cfg[key] = plus_default if plus else off
        elif not plus and value != off:
            raise ConfigError(f"{key} is {value!r}: a switch of method vtptq_plus; method is {method!r}")
    if cfg["softmax_quantizer"] != "uniform" and not cfg.get("quantize_matmul2", True):
        raise ConfigError(f"softmax_quantizer is {cfg['softmax_quantizer']!r}, but quantize_matmul2 is false "
                          "(the softmax output is not quantized)")
    if cfg["weight_channel_search"]:
        if "weight_per_channel" in cfg.get("given_keys", ()) and not cfg.get("weight_per_channel"):
            raise ConfigError("weight_channel_search is true, but weight_per_channel is false (the search sets "
                              "one weight interval per output channel)")
        cfg["weight_per_channel"] = True
    return {k: cfg[k] for k in SWITCHES}


# ----------------------------------------------------------------------------- LayerNorm fold
def fold_layernorm(norm, dense, shift, ratio):
    """Fold y' = (y - shift) / ratio into LayerNorm `norm` and the compensating W·diag(ratio),
    b + W·shift into the next Dense `dense` (in place; float64 maths, float32 parameters)."""
    shift, ratio = np.asarray(shift, np.float64), np.asarray(ratio, np.float64)
    gamma, beta = norm.gamma.asnumpy().astype(np.float64), norm.beta.asnumpy().astype(np.float64)
    w = dense.weight.asnumpy().astype(np.float64)
    b = dense.bias.asnumpy().astype(np.float64) if dense.has_bias else np.zeros(w.shape[0])
    from mindspore import Tensor
    norm.gamma.set_data(Tensor((gamma / ratio).astype(np.float32)))
    norm.beta.set_data(Tensor(((beta - shift) / ratio).astype(np.float32)))
    dense.weight.set_data(Tensor((w * ratio[None, :]).astype(np.float32)))
    if dense.has_bias:
        dense.bias.set_data(Tensor((b + w @ shift).astype(np.float32)))
    elif np.any(shift):
        raise ValueError("fold_layernorm: a shift needs the next layer to have a bias")


def reparam_factors(x, alpha, center):
    """(shift m, ratio r) of the fold for activations x (..., C): m_c the centre of channel c's
    range (0 without centring), r_c = (h_c / mean h)^α with h_c its half range (max |x - m|)."""
    flat = x.reshape(-1, x.shape[-1])
    lo, hi = sample_min(flat, axis=0).astype(np.float64), sample_max(flat, axis=0).astype(np.float64)
    shift = (lo + hi) / 2 if center else np.zeros_like(lo)
    half = np.maximum(np.maximum(hi - shift, shift - lo), EPS)
    ratio = (half / half.mean()) ** alpha
    return shift, ratio


def choose_reparam(x, cell, qcfg):
    """Best (alpha, center, objective) for the layer `cell` (QuantDense) with FP input x
    (N, T, C): for each candidate fold, the layer's Pearson objective after a search of the
    activation interval then of the weight interval(s) (max-based start, REPARAM_CANDIDATES
    candidates each), on the calibration inputs."""
    w = cell.weight.asnumpy().astype(np.float64)
    b = cell.bias.asnumpy().astype(np.float64) if cell.has_bias else np.zeros(w.shape[0])
    target = (x.astype(np.float64) @ w.T + b).astype(np.float32)
    a_q, w_q = cell.a_q, cell.w_q

    def score(option):
        center, alpha = option
        shift, ratio = reparam_factors(x, alpha, center)
        xs = ((x - shift) / ratio).astype(np.float32)
        ws = (w * ratio[None, :]).astype(np.float32)
        problem = LayerProblem(xs, ws, target, bias=(b + w @ shift).astype(np.float32))
        sw = init_scale(ws, w_q.bits, True, per_channel=cell.per_channel)
        cand_a = candidate_grid(init_scale(xs, a_q.bits, True, combine=max_over_samples), qcfg["search_alpha"],
                                qcfg["search_beta"], REPARAM_CANDIDATES)
        w_hat = fake_quant_np(ws, sw, w_q.bits, True).T
        scores = score_candidates(problem, "a", cand_a, None, np.ascontiguousarray(w_hat), a_q.bits, True, "pearson")
        x_hat = fake_quant_np(xs, cand_a[int(np.argmax(scores))], a_q.bits, True)
        cand_w = candidate_grid(sw, qcfg["search_alpha"], qcfg["search_beta"], REPARAM_CANDIDATES)
        return (alpha, center), float(score_candidates(problem, "b", cand_w, x_hat, None, w_q.bits, True,
                                                       "pearson").max())
    return best_fold([(center, alpha) for center in (False, True) for alpha in REPARAM_ALPHAS], score)


def best_fold(options, score):
    """(*result, objective) of the option with the largest objective, where score(option) ->
    (result tuple, objective); options in order, a later one taken only when it is better by
    more than 1e-9 (a tie keeps the earlier, milder fold)."""
    best = None
    for option in options:
        result, value = score(option)
        if best is None or value > best[-1] + 1e-9:
            best = (*result, value)
    return best


# ----------------------------------------------------------------------------- attention folds
def _best_interval_score(problem, which, scale0, other_hat, bits, signed, qcfg):
    """Best objective over REPARAM_CANDIDATES intervals of one operand (the other fixed)."""
    cands = candidate_grid(scale0, qcfg["search_alpha"], qcfg["search_beta"], REPARAM_CANDIDATES)
    if which == "a":
        return float(score_candidates(problem, "a", cands, None, other_hat, bits, signed, "pearson").max())
    return float(score_candidates(problem, "b", cands, other_hat, None, bits, signed, "pearson").max())


def choose_qk_fold(q, k, bits, qcfg):
    """Per-channel factors s (H, 1, hd) for Q' = Q·s, K' = K/s (Q·Kᵀ unchanged): s = (max|K_c| /
    max|Q_c|)^(α/2), α from REPARAM_ALPHAS by the Pearson objective of the scores with Q' and K'
    quantized (max-based K', searched Q'). Returns (alpha, factors, objective)."""
    target = np.matmul(q, np.swapaxes(k, -1, -2))
    ratio = np.maximum(sample_max(np.abs(k), axis=(0, 2), keepdims=True), EPS) / \
        np.maximum(sample_max(np.abs(q), axis=(0, 2), keepdims=True), EPS)  # (1, H, 1, hd)

    def score(alpha):
        s = (ratio ** (alpha / 2)).astype(np.float32)
        qs, ks = q * s, k / s
        problem = LayerProblem(qs, ks, target, transpose_b=True, b_shared=False)
        k_hat = fake_quant_np(problem.b_right, init_scale(ks, bits, combine=max_over_samples), bits, True)
        return (alpha, s[0]), _best_interval_score(problem, "a", init_scale(qs, bits, combine=max_over_samples),
                                                   k_hat, bits, True, qcfg)
    return best_fold(REPARAM_ALPHAS, score)


def choose_v_fold(attn, v, proj, bits, qcfg):
    """Per-channel factors t (H, 1, hd) for V' = V/t and proj's weight columns times t (attn·V·
    projᵀ unchanged): t = (h_c / mean h)^α with h_c = max|V_c|, α from REPARAM_ALPHAS by the
    Pearson objective of attn.proj's output with V' quantized (searched), its input quantized
    (searched) and its weight at the max-based interval(s). Returns (alpha, factors, objective)."""
    n, heads, tokens, hd = v.shape
    w = proj.weight.asnumpy()
    b = proj.bias.asnumpy() if proj.has_bias else None
    o = np.matmul(attn, v).transpose(0, 2, 1, 3).reshape(n, tokens, heads * hd)
    target = o @ w.T + (0 if b is None else b)
    h = np.maximum(sample_max(np.abs(v), axis=(0, 2), keepdims=True), EPS)  # (1, H, 1, hd)

    def score(alpha):
        t = ((h / h.mean()) ** alpha).astype(np.float32)
        vs = v / t
        mm = LayerProblem(attn, vs, np.matmul(attn, vs), transpose_b=False, b_shared=False)
        cands = candidate_grid(init_scale(vs, bits, combine=max_over_samples), qcfg["search_alpha"],
                               qcfg["search_beta"], REPARAM_CANDIDATES)
        sv = cands[int(np.argmax(score_candidates(mm, "b", cands, attn, None, bits, True, "pearson")))]
        os_ = np.matmul(attn, fake_quant_np(vs, sv, bits, True)).transpose(0, 2, 1, 3).reshape(n, tokens, -1)
        ws = (w * t.reshape(1, -1)).astype(np.float32)
        problem = LayerProblem(os_, ws, target, bias=b)
        w_hat = fake_quant_np(ws, init_scale(ws, proj.w_q.bits, True, per_channel=proj.per_channel), proj.w_q.bits,
                              True)
        return (alpha, t[0]), _best_interval_score(problem, "a", init_scale(os_, bits, combine=max_over_samples),
                                                   np.ascontiguousarray(w_hat.T), bits, True, qcfg)
    return best_fold(REPARAM_ALPHAS, score)


def fold_attention(attn, s_qk=None, t_v=None):
    """Fold Q' = Q·s, K' = K/s and V' = V/t (factors (H, 1, hd) or None) into attn.qkv's rows and
    t into attn.proj's weight columns, in place (the FP function is unchanged)."""
    from mindspore import Tensor
    qkv, proj = attn.qkv, attn.proj
    w = qkv.weight.asnumpy().astype(np.float64)
    b = qkv.bias.asnumpy().astype(np.float64) if qkv.has_bias else None
    dim = w.shape[0] // 3
    row = np.ones(3 * dim)
    if s_qk is not None:
        s = np.asarray(s_qk, np.float64).reshape(-1)
        row[:dim], row[dim:2 * dim] = s, 1 / s
    if t_v is not None:
        t = np.asarray(t_v, np.float64).reshape(-1)
        row[2 * dim:] = 1 / t
        pw = proj.weight.asnumpy().astype(np.float64)
        proj.weight.set_data(Tensor((pw * t[None, :]).astype(np.float32)))
    qkv.weight.set_data(Tensor((w * row[:, None]).astype(np.float32)))
    if b is not None:
        qkv.bias.set_data(Tensor((b * row).astype(np.float32)))


# ----------------------------------------------------------------------------- per-channel weights
def search_channels(problem, a_hat, current, bits, factors, objective="pearson", sweeps=3):
    """Per-output-channel weight intervals by coordinate ascent of the layer's mean per-sample
    objective (Pearson or cosine over the whole output of each sample).

    problem: a dense LayerProblem (weight b (O, K)); a_hat: the quantized input (N, T, K);
    current: the current per-channel intervals (O, 1), kept as a candidate (so the objective
    never falls); factors: multipliers of each channel's max-based interval. Channel by
    channel (Gauss-Seidel, up to `sweeps` passes), the candidate that maximizes the objective
    with every other channel fixed is taken. Returns (intervals (O, 1), objective before, after)."""
    w = problem.b
    n = problem.n
    o_dim = w.shape[0]
    x = a_hat.reshape(n, -1, w.shape[1])
    t = problem.target.reshape(n, x.shape[1], o_dim).astype(np.float64)
    if objective == "pearson":
        t = t - t.mean(axis=(1, 2), keepdims=True)
    t_norm2 = np.einsum("nto,nto->n", t, t)
    m = problem.out_elems
    base = init_scale(w, bits, True, per_channel=True).reshape(o_dim)
    cands = np.concatenate([np.asarray(factors, np.float64)[:, None] * base[None, :],
                            np.asarray(current, np.float64).reshape(1, o_dim)]).astype(np.float32)  # (C+1, O)
    num = len(cands)
    cross = np.empty((num, n, o_dim))
    s1 = np.empty((num, n, o_dim))
    s2 = np.empty((num, n, o_dim))
    bias = 0.0 if problem.bias is None else problem.bias
    for k in range(num):
        w_hat = fake_quant_np(w, cands[k][:, None], bits, True)
        out = (x @ w_hat.T + bias).astype(np.float64)  # (n, T, O)
        cross[k] = np.einsum("nto,nto->no", out, t)
        s1[k] = out.sum(axis=1)
        s2[k] = np.einsum("nto,nto->no", out, out)
    cross, s1, s2 = (_gather_axis1(a) for a in (cross, s1, s2))  # every rank's samples, in order
    t_norm2 = gather_samples(t_norm2)
    idx = np.full(o_dim, num - 1)
    cols = np.arange(o_dim)
    tot = [a[idx, :, cols].sum(axis=0) for a in (cross, s1, s2)]  # (n,) each

    def value(c_cross, c_s1, c_s2):
        return _similarity_from_sums(objective, c_cross, c_s1, c_s2, t_norm2, m).mean(axis=-1)

    before = float(value(*tot))
    for _ in range(sweeps):
        changed = 0
        for c in range(o_dim):
            trial = [tot[i] - a[idx[c], :, c] + a[:, :, c] for i, a in enumerate((cross, s1, s2))]  # (C+1, n)
            vals = value(*trial)
            k = int(np.argmax(vals))
            if k != idx[c] and vals[k] > vals[idx[c]]:
                tot = [tr[k] for tr in trial]
                idx[c] = k
                changed += 1
        if not changed:
            break
    return cands[idx, cols].reshape(o_dim, 1), before, float(value(*tot))


def _gather_axis1(a):
    """gather_samples of an array whose axis 1 is the samples."""
    return np.swapaxes(gather_samples(np.swapaxes(a, 0, 1)), 0, 1)


# ----------------------------------------------------------------------------- learned weight rounding
def learn_rounding(x_hat, w, scale, bias, target, bits, iters, seed=0):
    """Layer-wise learned rounding of the weight (AdaRound-style, MSE of the layer's output).

    x_hat: quantized input (..., K); w: FP weight (O, K); scale: its interval(s) (O, 1) or (1,);
    bias: (O,) or None; target: FP output (..., O). Each weight between two grid points chooses
    floor or ceil through h(V) (a rectified sigmoid, block_recon.SoftRounding), optimized with
    Adam for `iters` steps on
        ‖X̂ W̃ᵀ + b - Y‖² / ‖X̂ W_nᵀ + b - Y‖²  +  λ · mean(1 - |2h - 1|^β)
    (W_n: nearest rounding; the products come from the Gram matrices X̂ᵀX̂ and X̂ᵀ(Y - b), so an
    iteration costs one (O, K) x (K, K) product). Weights outside the grid stay clipped.
    Returns (W̃ = codes x interval (O, K) float32, mse of W̃, mse of nearest rounding)."""
    k = w.shape[1]
    x = x_hat.reshape(-1, k).astype(np.float64)
    y = target.reshape(-1, w.shape[0]).astype(np.float64) - (0.0 if bias is None else bias)
    gram = (x.T @ x).astype(np.float32)  # (K, K)
    cross = (x.T @ y).T.astype(np.float32)  # (O, K)
    yy = float((y * y).sum())
    rounding = SoftRounding(w, scale, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)

    def mse(codes):
        wt = codes * rounding.scale
        return float(np.einsum("ok,ok->", wt @ gram, wt) - 2 * np.einsum("ok,ok->", wt, cross) + yy)

    mse0 = max(mse(rounding.nearest), 1e-30)
    n_w = float(rounding.movable.sum()) or 1.0
    for it in range(iters):
        wt = rounding.soft()
        rounding.step((2.0 / mse0) * (wt @ gram - cross), it, iters, n_w)  # d(normalized MSE)/dW̃
    codes = rounding.hard_codes()
    return rounding.hard(), mse(codes), mse0


# ----------------------------------------------------------------------------- the method
@register_method
class VTPTQPlus(VTPTQ):
    """vtptq with the switches of this module (see the module docstring)."""

    name = "vtptq_plus"
    shardable = True  # every reduction over samples goes through src/distributed.py (module docstring)

    def __init__(self, qcfg):
        super().__init__(qcfg)
        self._lo = {}  # asymmetric operands: layer name -> minimum of the calibration input
        self.reparam = {}  # folded layers: layer name -> {"alpha", "center", "objective"}

    # --- LayerNorm fold, before each block is calibrated (its FP input x_fp)
    def before_stage(self, fn, x_fp, batch):
        from ..models.vit import Block
        from .calibrate import run_stage
        q = self.qcfg
        if not isinstance(fn, Block) or not (q.get("ln_reparam") or q.get("attn_reparam")):
            return
        pairs = ((fn.norm1, fn.attn.qkv), (fn.norm2, fn.mlp.fc1))
        capture = {norm: "out" for norm, _ in pairs}
        if q.get("attn_reparam"):
            capture.update({fn.attn.matmul1: "in", fn.attn.matmul2: "in"})
        _, cap = run_stage(fn, x_fp, batch, capture)
        if q.get("attn_reparam"):
            attn = fn.attn
            a_qk, s_qk, obj_qk = choose_qk_fold(*cap[attn.matmul1], attn.matmul1.a_q.bits, q)
            a_v, t_v, obj_v = choose_v_fold(*cap[attn.matmul2], attn.proj, attn.matmul2.b_q.bits, q)
            fold_attention(attn, s_qk if a_qk else None, t_v if a_v else None)
            self._record_fold(attn.matmul1, {"alpha": a_qk, "objective": obj_qk})
            self._record_fold(attn.proj, {"alpha_v": a_v, "objective_v": obj_v})
        if not q.get("ln_reparam"):
            return
        for norm, dense in pairs:
            alpha, center, objective = choose_reparam(cap[norm], dense, self.qcfg)
            if alpha or center:
                shift, ratio = reparam_factors(cap[norm], alpha, center)
                fold_layernorm(norm, dense, shift, ratio)
            self._record_fold(dense, {"alpha": alpha, "center": center, "objective": objective})

    # --- block reconstruction, after each block is calibrated (its quantized-path input, FP output)
    def after_stage(self, fn, x_q, target, log=None):
        from ..models.vit import Block
        iters = self.qcfg.get("block_recon_iters") or 0
        if not iters or not isinstance(fn, Block):
            return {}
        info = reconstruct_block(fn, x_q, target, iters, log)
        dense = (fn.attn.qkv, fn.attn.proj, fn.mlp.fc1, fn.mlp.fc2)
        return {c.layer_name: {"block_reconstruction": info} for c in dense if getattr(c, "layer_name", None)}

    def _record_fold(self, cell, info):
        """Keep a fold's choice for the calibration record of `cell` (by its layer name; a cell
        that is not quantized has no record)."""
        name = getattr(cell, "layer_name", None)
        if name is not None:
            self.reparam[name] = info

    # --- grids other than the uniform one
    def quantize(self, cell, name, x, scale):
        q = getattr(cell, f"{name}_q")
        if q.kind in LOG_INV_STEP:
            return fake_quant_log_np(x, scale, q.bits, q.kind)
        if q.kind == "asym":
            return fake_quant_asym_np(x, scale, zero_point(self._lo[cell.layer_name], scale, q.bits), q.bits)
        return super().quantize(cell, name, x, scale)

    def score(self, cell, problem, which, name, candidates, a_hat, b_hat_right, extra, memo=None):
        q = getattr(cell, f"{name}_q")
        if q.kind == "uniform":
            return super().score(cell, problem, which, name, candidates, a_hat, b_hat_right, extra, memo)
        return score_candidates(problem, which, candidates, a_hat, b_hat_right, q.bits, q.signed, self.objective,
                                extra, quant=lambda x, s: self.quantize(cell, name, x, s))

    def initial_scales(self, cell, problem):
        sa, sb = super().initial_scales(cell, problem)
        q = cell.a_q
        if q.kind in LOG_INV_STEP:  # top level of the log grid: the largest value
            sa = np.full(1, max(float(sample_max(problem.a)), EPS), np.float32)
        elif q.kind == "asym":
            lo = min(self._lo[cell.layer_name], 0.0)
            sa = np.full(1, max((float(sample_max(problem.a)) - lo) / q.qmax, EPS), np.float32)
        return sa, sb

    def calibrate(self, cell, problem):
        q = self.qcfg
        if cell.a_q.kind == "asym":
            self._lo[cell.layer_name] = float(sample_min(problem.a))
        if getattr(cell, "operands", ()) == ("a", "b") and not cell.is_attention_scores \
                and q.get("softmax_quantizer") == "auto":
            sa, sb, info = self._calibrate_softmax_auto(cell, problem)
        else:
            sa, sb, info = super().calibrate(cell, problem)
        if q.get("weight_channel_search") and "w" in cell.operands and cell.per_channel:
            sb, info["channel_search"] = self._search_channels(cell, problem, sa, sb)
        if q.get("recon_iters") and "w" in cell.operands:
            info["reconstruction"] = self._reconstruct(cell, problem, sa, sb)
        if cell.a_q.kind == "asym":
            zp = zero_point(self._lo[cell.layer_name], sa, cell.a_q.bits)
            cell.set_zero_point(zp)
            info["zero_point"] = float(zp.reshape(-1)[0])
        if cell.layer_name in self.reparam:
            info["reparam"] = self.reparam[cell.layer_name]
        return sa, sb, info

    def _calibrate_softmax_auto(self, cell, problem):
        bits = cell.a_q.bits
        found = {}
        for kind in SOFTMAX_AUTO:
            cell.set_bits("a", bits, signed=False, kind=kind)
            sa, sb, info = super().calibrate(cell, problem)
            found[kind] = (max(info["objective"]), sa, sb, info)
        kind = max(SOFTMAX_AUTO, key=lambda k: found[k][0])  # ties: the first (uniform)
        cell.set_bits("a", bits, signed=False, kind=kind)
        _, sa, sb, info = found[kind]
        info = dict(info, softmax_kind=kind, softmax_objectives={k: v[0] for k, v in found.items()})
        return sa, sb, info

    def _reconstruct(self, cell, problem, sa, sb):
        """Learned rounding of the weight at its searched interval(s), gated by held-out
        calibration images: it is learned on the first 3/4 of the calibration images and kept
        only if the layer's objective on the last 1/4 beats nearest rounding there; then it is
        learned again on all of them and bias correction runs again. (With 32 images of 17
        tokens a layer of 512 inputs has about as many tokens as weights per output channel:
        rounding fitted to all of them alone overfits.)"""
        t0 = time.time()
        a_name, b_name = operand_roles(cell)
        iters, bits = self.qcfg["recon_iters"], cell.w_q.bits
        a_hat = self.quantize(cell, a_name, problem.a, sa)
        w_near = self.quantize(cell, b_name, problem.b_right, problem.right_scale(sb))
        info = {"iters": iters, "kept": False}
        # learned on every rank's samples (gathered: the single-process arrays, so the same
        # held-out split and Gram matrices); the helpers must not gather them a second time
        a_all, target_all = gather_samples(a_hat), gather_samples(problem.target)
        n_all = len(a_all)
        n_fit = n_all - max(1, n_all // 4)
        with local_reductions():
            if n_fit >= 1:
                fit, hold = slice(0, n_fit), slice(n_fit, n_all)
                w_fit, _, _ = learn_rounding(a_all[fit], problem.b, sb, problem.bias, target_all[fit], bits, iters)
                held = LayerProblem(a_all[hold], problem.b, target_all[hold], bias=problem.bias)
                info["holdout_before"] = evaluate_pair(held, a_all[hold], w_near, self.objective)
                info["holdout_after"] = evaluate_pair(held, a_all[hold], np.ascontiguousarray(w_fit.T),
                                                      self.objective)
                info["kept"] = bool(info["holdout_after"] > info["holdout_before"])
            if info["kept"]:
                w_new, mse, mse0 = learn_rounding(a_all, problem.b, sb, problem.bias, target_all, bits, iters)
        del a_all, target_all
        if info["kept"]:
            w_new_right = np.ascontiguousarray(w_new.T)
            info.update(objective_before=evaluate_pair(problem, a_hat, w_near, self.objective),
                        objective_after=evaluate_pair(problem, a_hat, w_new_right, self.objective), mse_ratio=mse / mse0)
            cell.set_quantized_weight(w_new)
            self.after_round(cell, problem, a_hat, w_new_right)
        info["seconds"] = time.time() - t0
        return info

    def _search_channels(self, cell, problem, sa, sb):
        q = self.qcfg
        a_name, b_name = operand_roles(cell)
        a_hat = self.quantize(cell, a_name, problem.a, sa)
        factors = np.linspace(q["search_alpha"], q["search_beta"], q["search_candidates"])
        shape = np.shape(sb)
        new, before, after = search_channels(problem, a_hat, np.reshape(sb, (-1, 1)), cell.w_q.bits, factors,
                                             self.objective)
        new = new.reshape(shape)
        b_hat = self.quantize(cell, b_name, problem.b_right, problem.right_scale(new))
        self.after_round(cell, problem, a_hat, b_hat)  # bias correction for the new weight grid
        final = evaluate_pair(problem, a_hat, b_hat, self.objective)
        return new, {"objective_before": before, "objective_after": after, "objective_final": final}
