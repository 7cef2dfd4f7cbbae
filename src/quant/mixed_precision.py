"""Mixed precision (the paper's Sec. on bit allocation): one bit width per MSA module and
per MLP module, shared by the weights and inputs inside it, chosen to minimize

    Ω = Σ_i  σ_i · ||Ŷ_i(b_i) - Y_i||²,    σ_i = Σ_j σ_j(Y_i)  (nuclear norm)

subject to the model size of the uniform model at the nominal width. σ_i is the nuclear
norm of the attention map (MSA; summed over heads) or of the output feature (MLP), and
||Ŷ_i - Y_i||² the squared error of the module's output (attn.proj / mlp.fc2 output), both
averaged over the calibration images. Each module's error is measured at each candidate
width with its own interval search and with every other module in floating point, so Ω is
a sum of per-module terms and the best assignment is an exact knapsack (dynamic programming
over modules and size), not an enumeration of all |B|^M assignments.
"""
import math
import sys
import time

import numpy as np

from ..distributed import gather_samples
from .calibrate import _set_quant, calibrate_stage, calibration_session, get_method, run_stage
from .convert import quant_cells

MP_METHODS = ("vtptq", "vtptq_plus")  # methods quant.py allows mixed precision with (the per-layer interface)
# criterion -> the methods it works with. The paper's calibrates module by module inside a block
# and cannot run vtptq_plus's per-block LayerNorm folds (before_stage, which change parameters
# and depend on both modules' widths); the refined one calibrates whole models with calibrate_model.
MP_CRITERION_METHODS = {"paper": ("vtptq",), "refined": MP_METHODS}
MP_TARGETS = {"4MP": (4, (2, 3, 4, 5, 6)), "6MP": (6, (4, 5, 6, 7, 8)), "8MP": (8, (6, 7, 8, 9, 10))}
MODULE_LAYERS = {"attn": ("attn.qkv", "attn.matmul1", "attn.matmul2", "attn.proj"), "mlp": ("mlp.fc1", "mlp.fc2")}
MAX_DP_UNITS = 1 << 20
SHARDABLE_CRITERIA = ("paper", "refined")  # criteria whose reductions over samples go through src/distributed.py


def is_shardable(qcfg):
    """Whether the bit search may run on this rank's shard of the calibration images (the paper's
    criterion: per-sample nuclear norms and errors, gathered over the ranks; refined: per-image
    KL values, gathered over the ranks, src/quant/mp_refined.py)."""
    return qcfg.get("mp_criterion", "paper") in SHARDABLE_CRITERIA


def model_modules(model):
    """[(module name, block index, [quantized layer names])] for every MSA and MLP module."""
    names = {n for n, _ in quant_cells(model)}
    out = []
    for i in range(len(model.blocks)):
        for kind, suffixes in MODULE_LAYERS.items():
            layers = [f"blocks.{i}.{s}" for s in suffixes if f"blocks.{i}.{s}" in names]
            if layers:
                out.append((f"blocks.{i}.{kind}", i, layers))
    return out


def module_weight_params(model, layers):
    """Number of weight parameters of the quantized layers of a module (sets its size)."""
    cells = dict(quant_cells(model))
    return sum(int(np.prod(cells[n].weight.shape)) for n in layers if "w" in cells[n].operands)


def nuclear_norm(y):
    """Σ of singular values per sample, summed over leading matrix batches: y (n, ..., R, C) -> (n,)."""
    y = np.asarray(y, np.float64)
    sv = np.linalg.svd(y, compute_uv=False)
    return sv.reshape(len(y), -1).sum(axis=1)


def knapsack(costs, omegas, capacity):
    """Exact minimum of Σ omegas[m][k] subject to Σ costs[m][k] <= capacity.

    costs: integer (M, K) cost of choice k for module m; omegas: (M, K). Returns the list of
    chosen indices per module, or None if no assignment fits."""
    costs = np.asarray(costs, np.int64)
    omegas = np.asarray(omegas, np.float64)
    m_count, _ = costs.shape
    inf = np.inf
    dp = np.full(capacity + 1, inf)  # dp[c]: best Ω of the modules so far at total cost exactly c
    dp[0] = 0.0
    choice = np.zeros((m_count, capacity + 1), np.int64)
    for m in range(m_count):
        new = np.full(capacity + 1, inf)
        for k, (c, w) in enumerate(zip(costs[m], omegas[m])):
            if c > capacity:
                continue
            cand = np.full(capacity + 1, inf)
            cand[c:] = dp[:capacity + 1 - c] + w
            better = cand < new
            new[better] = cand[better]
            choice[m][better] = k
        dp = new
    if not np.isfinite(dp).any():
        return None
    c = int(np.argmin(dp))
    picks = []
    for m in reversed(range(m_count)):
        k = int(choice[m][c])
        picks.append(k)
        c -= int(costs[m][k])
    return picks[::-1]


def size_units(params, bits, nominal):
    """Integer costs (M, K) and capacity for the knapsack: params·bits in units of the gcd of
    the module sizes (coarsened, rounding costs up, if that would be too many units)."""
    g = 0
    for p in params:
        g = math.gcd(g, int(p))
    g = max(g, 1)
    capacity = sum(p // g for p in params) * nominal
    unit = g
    if capacity > MAX_DP_UNITS:
        factor = math.ceil(capacity / MAX_DP_UNITS)
        unit = g * factor
        capacity = sum(params) * nominal // unit
    costs = [[math.ceil(p * b / unit) for b in bits] for p in params]
    return costs, capacity


def candidate_bits(qcfg):
    """(nominal width, candidate widths) of qcfg's mp_target, without those below mp_min_bits."""
    nominal, bits = MP_TARGETS[qcfg["mp_target"]]
    low = qcfg.get("mp_min_bits")
    if low is not None:
        bits = tuple(b for b in bits if b >= low)
        if not bits or bits[0] > nominal:
            raise ValueError(f"mp_min_bits {low} leaves no candidate width at or below {qcfg['mp_target']}'s "
                             f"{nominal} bits")
    return nominal, bits


def search_bits(model, images, qcfg, log=sys.stderr):
    """Measure σ and Ω per module and candidate width, and solve the knapsack.

    Returns dict(target, nominal, candidates, modules: {name: bits}, sensitivity, omega,
    params, seconds). The model's intervals are left as found at the chosen widths with FP
    inputs; the caller recalibrates the whole model at the chosen widths."""
    target = qcfg["mp_target"]
    nominal, bits = candidate_bits(qcfg)
    method = get_method(qcfg)
    modules = model_modules(model)
    batch = qcfg["calib_batch_size"]
    sens, omega, params = {}, {}, {}
    start = time.time()
    x = np.asarray(images, np.float32)
    cell_map = dict(model.cells_and_names())
    with calibration_session(model) as cells:
        x = run_stage(model.embed, x, batch)[0]
        for bi, blk in enumerate(model.blocks):
            mods = [m for m in modules if m[1] == bi]
            attn_map_cell = cells.get(f"blocks.{bi}.attn.matmul2")
            for name, _, layers in mods:
                out_cell = cell_map[name]
                capture = {out_cell: "out"}
                if name.endswith("attn") and attn_map_cell is not None:
                    capture[attn_map_cell] = "in"
                _, cap = run_stage(blk, x, batch, capture)
                y_fp = cap[out_cell]
                feat = cap[attn_map_cell][0] if name.endswith("attn") and attn_map_cell is not None else y_fp
                sens[name] = float(gather_samples(nuclear_norm(feat)).mean())  # over every rank's samples
                params[name] = module_weight_params(model, layers)
                omega[name] = []
                for b in bits:
                    for n in layers:
                        for op in cells[n].operands:
                            cells[n].set_bits(op, b)
                    calibrate_stage(method, cells, blk, layers, x, x, batch)
                    _, cap = run_stage(blk, x, batch, {out_cell: "out"})
                    err = ((cap[out_cell] - y_fp) ** 2).reshape(len(x), -1).sum(axis=1)
                    err = float(gather_samples(err).mean())  # over every rank's samples
                    omega[name].append(sens[name] * err)
                    _set_quant(cells, layers, False)
                print(f"  {name:20s} sigma {sens[name]:.4g}  omega " +
                      " ".join(f"{b}b:{o:.4g}" for b, o in zip(bits, omega[name]))
                      + f" [{time.time() - start:.0f}s]", file=log, flush=True)
            x = run_stage(blk, x, batch)[0]
    names = [m[0] for m in modules]
    costs, capacity = size_units([params[n] for n in names], bits, nominal)
    picks = knapsack(costs, [omega[n] for n in names], capacity)
    if picks is None:
        raise ValueError(f"mixed precision: no assignment of {bits} fits the {target} size target")
    chosen = {n: bits[k] for n, k in zip(names, picks)}
    return {"criterion": "paper", "sensitivity_meaning": "sigma: nuclear norm (attention map for MSA, output for MLP)",
            "target": target, "nominal_bits": nominal, "candidates": list(bits), "modules": chosen,
            "sensitivity": sens, "omega": {n: dict(zip(map(str, bits), omega[n])) for n in names},
            "params": params, "seconds": time.time() - start}


def layer_bits_from_modules(model, module_bits):
    """{layer: {operand: bits}} for quantize_model from {module: bits}."""
    out = {}
    for name, _, layers in model_modules(model):
        if name in module_bits:
            for n in layers:
                b = module_bits[name]
                out[n] = {"w": b, "a": b, "b": b}
    return out
