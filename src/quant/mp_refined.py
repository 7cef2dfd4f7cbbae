"""Mixed precision, `mp_criterion: refined` (beyond the paper): bit widths chosen by their
measured end-to-end effect on the calibration set.

The paper's criterion (mixed_precision.search_bits) scores each module by σ·‖Ŷ - Y‖² with
every other module in floating point; σ (nuclear norm of the attention map or of the MLP
output) and the error live in different units for MSA and MLP modules, and an early module's
error is not seen as it grows through the quantized blocks after it. This criterion measures
everything in one unit, the end-to-end objective

    L(assignment) = mean over calibration images of KL(softmax(z_fp) ‖ softmax(ẑ))

of the logits ẑ of the network as it will run (every quantized layer on, inputs quantized),
against the FP logits z_fp:

1. Cache: the model is calibrated with the configured method at every candidate width,
   uniformly (`calibrate_model`, the per-layer interface every method shares), and each
   layer's widths, intervals and bias correction are kept. A module is switched between
   widths by loading its layers' cached state, without recalibrating.
2. Sensitivity: Ω_m(b) = L(module m at b, every other module at the nominal width) - L(all
   nominal), one forward pass of the calibration images per module and width (the block
   inputs before the first changed block are reused).
3. Initial assignment: the exact knapsack on Ω under the size of the uniform nominal model
   (Ω is treated as additive), or the uniform assignment if its measured L is lower.
4. Local search: moves change the widths of two or three modules by 1 or 2 bits, at least
   one up and one down, within the size target; the moves are ranked by their additive
   prediction from Ω, the best `REFINED_TOP_MOVES` not yet measured are measured, and the
   best is kept only if it lowers the measured L by more than `REFINED_MIN_GAIN` (relative;
   a guard against fitting the noise of the 32 calibration images; `mp_accept_z` > 0 also
   asks for a paired test over the images; its default `REFINED_Z` = 0 was chosen on val:
   docs/results.md). It stops when no move is
   kept or after `REFINED_MAX_ITERS` kept moves. The knapsack's assignment replaces the
   uniform one by the same rule.

The caller then recalibrates the model at the chosen widths, as for the paper's criterion.

Sharded (src/distributed.py): the cache is calibrated by calibrate_model on this rank's shard
(the method's own sharding), and the KL of each of this rank's images is gathered over the
ranks (gather_samples, float64 bit for bit), so L, the paired test and every decision are
those of one process on all the images.
"""
import contextlib
import itertools
import sys
import time

import numpy as np
import mindspore as ms

from ..distributed import gather_samples
from .calibrate import calibrate_model, run_stage
from .convert import quant_cells, quantize_model, set_quant_mode
from .mixed_precision import candidate_bits, knapsack, model_modules, module_weight_params, size_units

REFINED_TOP_MOVES = 6   # moves measured per local-search step
REFINED_MIN_GAIN = 0.01  # a move is kept only if it lowers L by more than this fraction
REFINED_Z = 0.0         # ... and by more than this many standard errors of the per-image gains (mp_accept_z)
REFINED_MAX_ITERS = 12  # at most this many kept moves
MAX_MOVE_MODULES = 3    # a move changes the widths of 2 .. this many modules
MOVE_STEPS = (-2, -1, 1, 2)
MAX_CACHED_INPUTS = 32  # block inputs kept for reuse (the oldest go first): bounds memory on large models


# ----------------------------------------------------------------------------- cached states
# Every method's state of a layer is kept, including what vtptq_plus learns: grid kinds (log
# softmax grids, the asymmetric post-GELU grid) and zero points, per-channel weight intervals,
# learned rounding, and the FP parameters that its folds change (the layer's weight and bias,
# and the LayerNorm folded into it, FOLDED_NORMS). A width's folds differ, so they switch with
# the module's width too.
FOLDED_NORMS = {"attn.qkv": "norm1", "mlp.fc1": "norm2"}  # layer suffix -> the block's LayerNorm feeding only it


def input_norm(model, name):
    """The LayerNorm cell whose output feeds only layer `name` (FOLDED_NORMS), or None."""
    for suffix, norm in FOLDED_NORMS.items():
        if name.endswith("." + suffix):
            block = name[:-len(suffix) - 1]
            return dict(model.cells_and_names()).get(f"{block}.{norm}")
    return None


def layer_states(model):
    """{layer: state} of every quantized cell: operand widths, signedness, grid kinds, intervals
    and zero points, bias correction, learned weight rounding, the FP weight and bias and the
    LayerNorm folded into the layer, to be put back with apply_state."""
    out = {}
    for name, cell in quant_cells(model):
        fp = None
        if hasattr(cell, "weight"):  # Dense / Conv2d (a MatMul has no parameters)
            fp_b = cell._fp_bias if cell._fp_bias is not None else (cell.bias.asnumpy() if cell.has_bias else None)
            fp = ((cell._fp_weight if cell._fp_weight is not None else cell.weight.asnumpy()).copy(),
                  None if fp_b is None else fp_b.copy())
        norm = input_norm(model, name)
        out[name] = {"q": {op: (getattr(cell, f"{op}_q").bits, getattr(cell, f"{op}_q").signed,
                                getattr(cell, f"{op}_q").kind) for op in cell.operands},
                     "scale": {op: cell.get_scale(op) for op in cell.operands},
                     "zero_point": {op: getattr(cell, f"{op}_zero_point").asnumpy().copy()
                                    for op in cell.operands if hasattr(cell, f"{op}_zero_point")},
                     "bias_corr": None if cell.bias_corr is None else cell.bias_corr.copy(),
                     "weight_q": None if cell.weight_q is None else cell.weight_q.copy(),
                     "fp": fp,
                     "norm": None if norm is None else (norm.gamma.asnumpy().copy(), norm.beta.asnumpy().copy())}
    return out


def apply_state(cell, state, norm=None):
    """Put a layer_states entry back into a cell of the same architecture (and its folded
    LayerNorm `norm`, input_norm's, if the state has one)."""
    from mindspore import Tensor
    for op in cell.operands:
        bits, signed, kind = state["q"][op]
        cell.set_bits(op, bits, signed, kind)
        cell.set_scale(op, state["scale"][op])
    for op, zp in state["zero_point"].items():
        getattr(cell, f"{op}_zero_point").set_data(Tensor(zp))
    if state["fp"] is not None:  # FP parameters first, then the corrections derived from them
        weight, bias = state["fp"]
        cell._fp_weight = cell.weight_q = cell._fp_bias = cell.bias_corr = None
        cell.weight.set_data(Tensor(weight))
        if bias is not None:
            cell.bias.set_data(Tensor(bias))
    if state["norm"] is not None and norm is not None:
        norm.gamma.set_data(Tensor(state["norm"][0]))
        norm.beta.set_data(Tensor(state["norm"][1]))
    if state["weight_q"] is not None:
        cell.set_quantized_weight(state["weight_q"])
    corr = state["bias_corr"]
    if corr is not None:
        cell.set_bias_correction(corr)
    elif cell.bias_corr is not None:
        cell.set_bias_correction(np.zeros_like(cell.bias_corr))


def calibrate_widths(build_model, images, qcfg, widths, log=sys.stderr):
    """{width: layer_states} of the model calibrated uniformly at each width with qcfg's method."""
    cache = {}
    for b in widths:
        t0 = time.time()
        cfg = dict(qcfg, w_bits=b, a_bits=b)
        model = build_model()
        quantize_model(model, cfg)
        calibrate_model(model, images, cfg, log=None)
        cache[b] = _share_equal(layer_states(model), cache[widths[0]] if cache else None)
        print(f"  refined: calibrated every layer at {b} bits [{time.time() - t0:.1f}s]", file=log, flush=True)
    return cache


def _share_equal(states, ref):
    """states with the FP parameters ("fp", "norm") that equal those of `ref` (another width's
    layer_states) replaced by ref's arrays: one copy of the unchanged weights, whatever the
    number of widths (a method without folds changes no parameter)."""
    if ref is not None:
        for name, st in states.items():
            for key in ("fp", "norm"):
                mine, theirs = st[key], ref[name][key]
                if mine is not None and all(_same(u, v) for u, v in zip(mine, theirs)):
                    st[key] = theirs
    return states


def _same(u, v):
    return (u is None) == (v is None) and (u is None or np.array_equal(u, v))


# ----------------------------------------------------------------------------- end-to-end objective
def kl_to_reference(logits_fp, logits_q):
    """Mean over samples of KL(softmax(logits_fp) ‖ softmax(logits_q)), in float64."""
    return float(kl_per_sample(logits_fp, logits_q).mean())


def kl_per_sample(logits_fp, logits_q):
    """KL(softmax(logits_fp) ‖ softmax(logits_q)) per sample: (n, classes) -> float64 (n,)."""
    a = np.asarray(logits_fp, np.float64)
    b = np.asarray(logits_q, np.float64)
    la = a - a.max(axis=1, keepdims=True)
    la -= np.log(np.exp(la).sum(axis=1, keepdims=True))
    lb = b - b.max(axis=1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(axis=1, keepdims=True))
    return (np.exp(la) * (la - lb)).sum(axis=1)


class EndToEnd:
    """L(assignment) of one model whose modules switch between cached widths.

    assignment: tuple of widths, one per module of `modules` (model_modules order). Block
    inputs are cached per prefix of the assignment, so a change in block k reruns blocks k..
    and the head only. Run inside `pynative()` (widths change between passes)."""

    def __init__(self, model, images, cache, modules, nominal, batch, z=REFINED_Z):
        self.model, self.cache, self.modules, self.batch, self.z = model, cache, modules, batch, z
        self.cells = dict(quant_cells(model))
        self.norms = {name: input_norm(model, name) for name in self.cells}
        for name, cell in self.cells.items():
            apply_state(cell, cache[nominal][name], self.norms[name])
        self.applied = [nominal] * len(modules)
        set_quant_mode(model, "fp")
        x = np.asarray(images, np.float32)
        self.logits_fp = run_stage(model, x, batch)[0]
        set_quant_mode(model, "quantized")
        self.block_of = [m[1] for m in modules]
        self.inputs = {(): run_stage(model.embed, x, batch)[0]}  # prefix of block widths -> block input
        self.values = {}  # assignment -> L
        self.per_image = {}  # assignment -> KL per calibration image
        self.passes = 0

    def _apply(self, assignment):
        for i, (b, cur) in enumerate(zip(assignment, self.applied)):
            if b != cur:
                for layer in self.modules[i][2]:
                    apply_state(self.cells[layer], self.cache[b][layer], self.norms[layer])
                self.applied[i] = b

    def _prefix(self, assignment, block):
        return tuple(b for b, k in zip(assignment, self.block_of) if k < block)

    def __call__(self, assignment):
        assignment = tuple(assignment)
        if assignment in self.values:
            return self.values[assignment]
        self._apply(assignment)
        blocks = self.model.blocks
        start = 0
        for k in range(len(blocks), -1, -1):
            if self._prefix(assignment, k) in self.inputs:
                start = k
                break
        x = self.inputs[self._prefix(assignment, start)]
        for k in range(start, len(blocks)):
            x = run_stage(blocks[k], x, self.batch)[0]
            self.inputs[self._prefix(assignment, k + 1)] = x
            if len(self.inputs) > MAX_CACHED_INPUTS:
                del self.inputs[next(key for key in self.inputs if key)]  # the oldest, never the embedding's
        logits = run_stage(self.model.forward_head, x, self.batch)[0]
        self.passes += 1
        self.per_image[assignment] = gather_samples(kl_per_sample(self.logits_fp, logits))  # every rank's images
        self.values[assignment] = float(self.per_image[assignment].mean())
        return self.values[assignment]

    def better(self, new, old):
        """True if assignment `new` lowers L by more than REFINED_MIN_GAIN (relative) and by more
        than self.z (mp_accept_z) standard errors of the per-image differences (a paired test over the
        calibration images: a move that helps a few images and hurts the rest is not kept)."""
        self(new), self(old)
        d = self.per_image[tuple(old)] - self.per_image[tuple(new)]
        gain = float(d.mean())
        if gain <= self.values[tuple(old)] * REFINED_MIN_GAIN:
            return False
        return gain > self.z * float(d.std(ddof=1)) / np.sqrt(len(d)) if len(d) > 1 else True


@contextlib.contextmanager
def pynative():
    prev = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        yield
    finally:
        ms.set_context(mode=prev)


# ----------------------------------------------------------------------------- search
def candidate_moves(current, choices, costs, capacity):
    """Assignments (as index tuples) that change 2..MAX_MOVE_MODULES modules by MOVE_STEPS,
    at least one up and one down, with total cost <= capacity."""
    m_count = len(current)
    k_count = len(choices)
    base_cost = sum(costs[m][current[m]] for m in range(m_count))
    out = []
    for size in range(2, MAX_MOVE_MODULES + 1):
        for mods in itertools.combinations(range(m_count), size):
            for steps in itertools.product(MOVE_STEPS, repeat=size):
                if min(steps) > 0 or max(steps) < 0:
                    continue
                new = list(current)
                cost = base_cost
                ok = True
                for m, s in zip(mods, steps):
                    k = current[m] + s
                    if not 0 <= k < k_count:
                        ok = False
                        break
                    cost += costs[m][k] - costs[m][current[m]]
                    new[m] = k
                if ok and cost <= capacity:
                    out.append(tuple(new))
    return out


def refined_search(build_model, images, qcfg, log=sys.stderr, cache=None):
    """The refined criterion (module docstring). build_model() -> a fresh FP model; cache:
    calibrate_widths' result for the candidate widths, if already computed.

    Returns the report of search_bits (target, nominal_bits, candidates, modules, sensitivity,
    omega, params, seconds) with criterion 'refined', and objective (L of the uniform, initial
    and final assignments), swaps_accepted, swaps_measured, forward_passes, history."""
    start, cpu_start = time.time(), time.process_time()
    target = qcfg["mp_target"]
    nominal, bits = candidate_bits(qcfg)
    bits = list(bits)
    batch = qcfg["calib_batch_size"]
    if cache is None:
        cache = calibrate_widths(build_model, images, qcfg, bits, log)
    t_cache = time.time() - start
    model = build_model()
    quantize_model(model, dict(qcfg, w_bits=nominal, a_bits=nominal))
    modules = model_modules(model)
    names = [m[0] for m in modules]
    params = {n: module_weight_params(model, layers) for n, _, layers in modules}
    costs, capacity = size_units([params[n] for n in names], bits, nominal)
    k_nom = bits.index(nominal)
    uniform = tuple([k_nom] * len(names))
    with pynative():
        model.set_train(False)
        ev = EndToEnd(model, images, cache, modules, nominal, batch, z=float(qcfg.get("mp_accept_z", REFINED_Z)))

        def loss(idx):
            return ev(tuple(bits[k] for k in idx))

        l_uniform = loss(uniform)
        omega = np.zeros((len(names), len(bits)))
        for m in range(len(names)):
            for k in range(len(bits)):
                if k != k_nom:
                    idx = list(uniform)
                    idx[m] = k
                    omega[m, k] = loss(idx) - l_uniform
            print(f"  {names[m]:20s} dL " + " ".join(f"{b}b:{o:+.4g}" for b, o in zip(bits, omega[m]))
                  + f" [{time.time() - start:.0f}s]", file=log, flush=True)
        picks = knapsack(costs, omega, capacity)
        initial = tuple(picks) if picks is not None else uniform
        l_initial = loss(initial)
        current = initial if initial != uniform and ev.better(_widths(bits, initial), _widths(bits, uniform)) \
            else uniform
        l_current = loss(current)
        history = [{"assignment": _named(names, bits, current), "objective": l_current, "step": "start"}]
        accepted, measured = 0, 0
        while accepted < REFINED_MAX_ITERS:
            moves = candidate_moves(current, bits, costs, capacity)
            pred = {mv: sum(omega[m, k] - omega[m, current[m]] for m, k in enumerate(mv)) for mv in moves}
            ranked = sorted((mv for mv in moves if tuple(bits[k] for k in mv) not in ev.values), key=pred.get)
            trial = ranked[:REFINED_TOP_MOVES]
            if not trial:
                break
            results = [(loss(mv), mv) for mv in trial]
            measured += len(trial)
            best_l, best_mv = min(results)
            if ev.better(_widths(bits, best_mv), _widths(bits, current)):
                current, l_current = best_mv, best_l
                accepted += 1
                history.append({"assignment": _named(names, bits, current), "objective": l_current, "step": "swap"})
                print(f"  refined: swap {accepted} -> L {l_current:.5g}: "
                      + ", ".join(f"{n}={bits[k]}" for n, k in zip(names, current))
                      + f" [{time.time() - start:.0f}s]", file=log, flush=True)
            else:
                break
    chosen = _named(names, bits, current)
    sens = {n: float(omega[m, k_nom - 1]) if k_nom > 0 else float(omega[m, 0]) for m, n in enumerate(names)}
    return {"criterion": "refined", "target": target, "nominal_bits": nominal, "candidates": bits,
            "modules": chosen, "sensitivity": sens,
            "sensitivity_meaning": f"increase of L when the module alone drops from {nominal} to "
                                   f"{bits[max(k_nom - 1, 0)]} bits",
            "omega": {n: {str(b): float(omega[m, k]) for k, b in enumerate(bits)} for m, n in enumerate(names)},
            "params": params, "objective": {"name": "kl_logits", "uniform": l_uniform, "initial": l_initial,
                                            "final": l_current},
            "initial_modules": _named(names, bits, initial), "ended_on_uniform": current == uniform,
            "swaps_accepted": accepted, "swaps_measured": measured, "forward_passes": ev.passes,
            "cache_seconds": t_cache, "history": history, "seconds": time.time() - start,
            "cpu_seconds": time.process_time() - cpu_start}


def _widths(bits, idx):
    return tuple(bits[k] for k in idx)


def _named(names, bits, idx):
    return {n: bits[k] for n, k in zip(names, idx)}
