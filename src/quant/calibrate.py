"""Calibration loop: stage by stage (embedding, each block, head), layer by layer in forward
order, in PYNATIVE mode. For each quantized layer it captures, with forward hooks, the
full-precision output of the FP network (the target) and the layer's input as it arrives
through the already-quantized layers before it (`calib_input: quantized`) or through the FP
network (`calib_input: fp`), then hands them to the method, which sets the intervals.
Only one stage's activations (and one layer's captures, or the FP outputs of a stage's layers
up to FP_CAPTURE_BYTES) are held at a time, so the memory is bounded by the largest layer, not
by the network.
"""
import contextlib
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor

from ..distributed import calibration_offset, gather_samples, max_over_samples
from ..utils import check_interrupted
from .convert import quant_cells
from .quantizer import fake_quant_np, init_scale, percentile_scale
from .search import LayerProblem, candidate_grid, evaluate_pair, kept_heap_memory, score_candidates, search_threads


# ----------------------------------------------------------------------------- stages
def model_stages(model):
    """[(stage name, function tokens -> tokens, [quant layer names])] in forward order."""
    names = [n for n, _ in quant_cells(model)]

    def within(prefix):
        return [n for n in names if n == prefix or n.startswith(prefix + ".")]

    stages = [("embed", model.embed, within("patch_embed"))]
    for i, blk in enumerate(model.blocks):
        stages.append((f"blocks.{i}", blk, within(f"blocks.{i}")))
    stages.append(("head", model.forward_head, within("head")))
    return stages


def batch_bounds(n, batch_size, offset=0):
    """[(start, stop)] of the batches of n images that begin at image `offset` of the whole
    set, cut where a single process cuts the whole set (a shard's first and last batch may be
    partial)."""
    first = (-offset) % batch_size or batch_size
    cuts = [0] + list(range(first, n, batch_size)) + [n]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


class _Captured(Exception):
    """Raised by a capture hook to end a forward pass whose output is not needed."""


def run_stage(fn, x, batch_size, capture=None, stop=False):
    """Apply a stage to numpy x in batches. capture: {cell: 'in' | 'out'} -> captured numpy
    arrays (a tuple of inputs, or the output) concatenated over batches. Under a sharded
    calibration x is this rank's shard, batched as in one process (batch_bounds). stop: a
    capture hook ends each forward pass (for one captured cell; the stage output is then None)."""
    capture = capture or {}
    store = {cell: [] for cell in capture}
    handles = []
    for cell, what in capture.items():
        def hook(c, inputs, output, _cell=cell, _what=what):
            if _what == "in":
                store[_cell].append(tuple(t.asnumpy() for t in inputs))
            else:
                store[_cell].append(output.asnumpy())
            if stop:
                raise _Captured
        handles.append(cell.register_forward_hook(hook))
    outs = []
    try:
        for i, j in batch_bounds(len(x), batch_size, calibration_offset()):
            check_interrupted()
            try:
                outs.append(fn(Tensor(x[i:j])).asnumpy())
            except _Captured:
                pass
    finally:
        for h in handles:
            h.remove()
    captured = {}
    for cell, chunks in store.items():
        if capture[cell] == "in":
            captured[cell] = tuple(np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0])))
        else:
            captured[cell] = np.concatenate(chunks)
    return (None if stop else np.concatenate(outs)), captured


# ----------------------------------------------------------------------------- problems
def _patches(x, p):
    """Images (N, C, H, W) -> patches (N, T, C·p·p) in the order of a conv weight reshape."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // p, p, w // p, p).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)


def build_problem(cell, inputs, target):
    """LayerProblem of a quantized cell from its captured inputs and FP output."""
    kind = type(cell).__name__
    if kind == "QuantMatMul":
        return LayerProblem(inputs[0], inputs[1], target, transpose_b=cell.transpose_b, b_shared=False)
    w = cell.weight.asnumpy()
    bias = cell.bias.asnumpy() if cell.has_bias else None
    if kind == "QuantConv2d":
        p = w.shape[-1]
        n, d = target.shape[:2]
        return LayerProblem(_patches(inputs[0], p), w.reshape(w.shape[0], -1),
                            target.reshape(n, d, -1).transpose(0, 2, 1), bias=bias)
    x = inputs[0]
    if x.ndim == 2:  # the classifier head sees one token per image: (N, K) -> (N, 1, K)
        x, target = x[:, None, :], target[:, None, :]
    return LayerProblem(x, w, target, bias=bias)


def operand_roles(cell):
    """(name of operand a, name of operand b) for the cell's scales: ('a', 'w') or ('a', 'b')."""
    return ("a", "w") if "w" in cell.operands else ("a", "b")


# ----------------------------------------------------------------------------- methods
class Method:
    """Sets the intervals of one layer from its LayerProblem. Subclasses override calibrate.

    `shardable`: the method reduces over samples only through src/distributed.py
    (gather_samples, max_over_samples, search.sample_mean), so under msrun each rank may
    calibrate on its shard of the images. Declared by each class itself, not inherited
    (see is_shardable): a subclass that adds a reduction over samples must say so."""

    name = "base"
    shardable = False

    def __init__(self, qcfg):
        self.qcfg = qcfg

    def initial_scales(self, cell, problem):
        a_name, b_name = operand_roles(cell)
        a_q, b_q = getattr(cell, f"{a_name}_q"), getattr(cell, f"{b_name}_q")
        per_channel = b_name == "w" and getattr(cell, "per_channel", False)
        sa = init_scale(problem.a, a_q.bits, a_q.signed, combine=max_over_samples)
        sb = init_scale(problem.b, b_q.bits, b_q.signed, per_channel=per_channel,
                        combine=None if problem.b_shared else max_over_samples)
        return sa, sb

    def calibrate(self, cell, problem):
        """-> (scale of a, scale of b, info dict)"""
        raise NotImplementedError


class MinMax(Method):
    name = "minmax"
    shardable = True

    def calibrate(self, cell, problem):
        sa, sb = self.initial_scales(cell, problem)
        return sa, sb, {}


class Percentile(Method):
    """Activation intervals from the `percentile` of |T| over the calibration values; weights
    keep the max-based interval. Under a sharded calibration the values of every rank are
    gathered (exact: the percentile of the same values)."""

    name = "percentile"
    shardable = True

    def calibrate(self, cell, problem):
        sa, sb = self.initial_scales(cell, problem)
        a_name, b_name = operand_roles(cell)
        pct = self.qcfg["percentile"]
        a_q = getattr(cell, f"{a_name}_q")
        sa = percentile_scale(gather_samples(problem.a), a_q.bits, pct, a_q.signed)
        if b_name != "w":
            b_q = getattr(cell, f"{b_name}_q")
            sb = percentile_scale(gather_samples(problem.b), b_q.bits, pct, b_q.signed)
        return sa, sb, {}


class AlternatingSearch(Method):
    """Alternating search of the two intervals over C candidates in [αΔ0, βΔ0]: first the
    second operand (the weight) with the first fixed, then the first; `rounds` times, or until
    the objective stops improving when `stop_early`. EasyQuant: cosine similarity, 2 rounds."""

    name = "easyquant"
    objective = "cosine"
    stop_early = False
    shardable = True

    def rounds(self):
        return self.qcfg["search_rounds"]

    def extra_loss(self, cell, problem):
        return None

    def after_round(self, cell, problem, a_hat, b_hat_right):
        """Hook after each round, given both operands quantized at the round's intervals; may
        replace problem.bias (bias correction in the paper's method)."""

    def quantize(self, cell, name, x, scale):
        """Fake-quantize operand `name` ('a', 'b' or 'w') of `cell` (numpy) at interval `scale`;
        x in the layout of problem.a / problem.b_right (scale likewise)."""
        q = getattr(cell, f"{name}_q")
        return fake_quant_np(x, scale, q.bits, q.signed)

    def score(self, cell, problem, which, name, candidates, a_hat, b_hat_right, extra, memo=None):
        """Mean objective of each candidate interval of operand `which` (see score_candidates)."""
        q = getattr(cell, f"{name}_q")
        return score_candidates(problem, which, candidates, a_hat, b_hat_right, q.bits, q.signed, self.objective,
                                extra, memo=memo)

    def calibrate(self, cell, problem):
        q = self.qcfg
        a_name, b_name = operand_roles(cell)
        sa0, sb0 = self.initial_scales(cell, problem)
        sa, sb = sa0, sb0
        cand_a = candidate_grid(sa0, q["search_alpha"], q["search_beta"], q["search_candidates"])
        cand_b = candidate_grid(sb0, q["search_alpha"], q["search_beta"], q["search_candidates"])
        extra = self.extra_loss(cell, problem)
        a_hat = self.quantize(cell, a_name, problem.a, sa)
        b_hat = self.quantize(cell, b_name, problem.b_right, problem.right_scale(sb))
        start = evaluate_pair(problem, a_hat, b_hat, self.objective, extra)
        best = (start, sa, sb, problem.bias)
        history = [start]
        memo, layer = {}, {}  # a search repeated at the same interval of the other operand reuses its work,
        # and the searches of the layer share what depends on neither interval (search.py)
        for _ in range(self.rounds()):
            slot = memo.setdefault(("b", np.asarray(sa).tobytes()), {"layer": layer})
            scores = self.score(cell, problem, "b", b_name, cand_b, a_hat, None, extra, memo=slot)
            sb = cand_b[int(np.argmax(scores))]
            b_hat = self.quantize(cell, b_name, problem.b_right, problem.right_scale(sb))
            slot = memo.setdefault(("a", np.asarray(sb).tobytes()), {"layer": layer})
            scores = self.score(cell, problem, "a", a_name, cand_a, None, b_hat, extra, memo=slot)
            sa = cand_a[int(np.argmax(scores))]
            a_hat = self.quantize(cell, a_name, problem.a, sa)
            value = float(scores.max())
            history.append(value)
            improved = value > best[0]
            if improved or not self.stop_early:
                best = (value, sa, sb, problem.bias)
            if self.stop_early and not improved:
                break
            self.after_round(cell, problem, a_hat, b_hat)
        _, sa, sb, problem.bias = best
        a_hat = self.quantize(cell, a_name, problem.a, sa)
        b_hat = self.quantize(cell, b_name, problem.b_right, problem.right_scale(sb))
        self.after_round(cell, problem, a_hat, b_hat)  # the correction of the intervals returned
        return sa, sb, {"objective": history, "rounds": len(history) - 1}


METHODS = {"minmax": MinMax, "percentile": Percentile, "easyquant": AlternatingSearch}


def register_method(cls):
    METHODS[cls.name] = cls
    return cls


# ----------------------------------------------------------------------------- driver
def _set_quant(cells, names, on):
    for name in names:
        cells[name].set_quant(weight=on, act=on)


def is_shardable(method):
    """Whether a method (class or instance) declares itself shardable (see Method)."""
    cls = method if isinstance(method, type) else type(method)
    return bool(cls.__dict__.get("shardable", False))


def get_method(qcfg):
    if qcfg["method"] not in METHODS:
        raise ValueError(f"method is {qcfg['method']!r}; expected one of {', '.join(sorted(METHODS))}")
    return METHODS[qcfg["method"]](qcfg)


FP_CAPTURE_BYTES = 1 << 30  # FP outputs of a stage's layers captured together in one pass up to this size


def fp_targets(fn, x_fp, batch, stage_cells):
    """FP outputs of the leading cells of a stage whose outputs fit FP_CAPTURE_BYTES together,
    captured in one pass of the FP stage instead of one pass per layer (the same forward
    computation, so the same values). A one-image pass measures the output sizes first.
    Quantization must be off. Returns (the FP stage output, {cell: output}), or (None, {}) when
    fewer than two fit; the other cells are captured per layer."""
    if len(stage_cells) < 2 or not len(x_fp):
        return None, {}
    _, probe = run_stage(fn, x_fp[:1], 1, {c: "out" for c in stage_cells})
    keep, total = [], 0
    for c in stage_cells:
        total += probe[c].nbytes * len(x_fp)
        if total > FP_CAPTURE_BYTES:
            break
        keep.append(c)
    if len(keep) < 2:
        return None, {}
    return run_stage(fn, x_fp, batch, {c: "out" for c in keep})


def calibrate_stage(method, cells, fn, names, x_fp, x_q, batch, log=None, start=None, fp_out=None, progress=None):
    """Calibrate the layers `names` of one stage in order. x_fp: the stage's FP input; x_q: the
    input through the quantized earlier stages (x_fp itself for FP inputs). The target of each
    layer is its output in the FP stage; its input comes from x_q through the layers of this
    stage calibrated before it. Leaves the stage's layers quantized. Returns {name: info}.
    fp_out: a list, to which the FP stage output is appended when a pass computed it.
    progress: a CalibrationProgress, told of each layer (else each layer is a line on `log`)."""
    report = {}
    start = start or time.time()
    _set_quant(cells, names, False)
    out, targets = fp_targets(fn, x_fp, batch, [cells[n] for n in names])
    if out is not None and fp_out is not None:
        fp_out.append(out)
    for k, name in enumerate(names):
        t0 = time.time()
        cell = cells[name]
        _set_quant(cells, names, False)
        if cell in targets:
            cap = {cell: targets.pop(cell)}
        else:
            _, cap = run_stage(fn, x_fp, batch, {cell: "out"})
        target = cap[cell]
        _set_quant(cells, names[:k], x_q is not x_fp)
        _, cap_in = run_stage(fn, x_q, batch, {cell: "in"}, stop=True)  # the pass ends at the layer
        problem = build_problem(cell, cap_in[cell], target)
        del cap, cap_in, target
        sa, sb, info = method.calibrate(cell, problem)
        a_name, b_name = operand_roles(cell)
        cell.set_scale(a_name, sa)
        cell.set_scale(b_name, sb)
        if problem.bias is not None and problem.bias is not problem.fp_bias:  # bias correction changed it
            cell.set_bias_correction(problem.fp_bias - problem.bias)
        info["seconds"] = time.time() - t0
        report[name] = info
        obj = info.get("objective")
        text = (f"{name:28s} {b_name}={_fmt(sb)} {a_name}={_fmt(sa)}"
                + (f" objective {obj[0]:.5f} -> {obj[-1]:.5f} in {info['rounds']} rounds" if obj else ""))
        if progress is not None:
            progress.layer_done(name, text, info["seconds"])
        elif log is not None:
            print(f"  {text} [{info['seconds']:.1f}s, total {time.time() - start:.0f}s]", file=log, flush=True)
    _set_quant(cells, names, True)
    return report


@contextlib.contextmanager
def calibration_session(model):
    """PYNATIVE mode (forward hooks need it), inference mode, every quantizer off; yields
    {name: quantized cell} and restores the previous execution mode afterwards."""
    prev_mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model.set_train(False)
    cells = dict(quant_cells(model))
    _set_quant(cells, cells, False)
    try:
        yield cells
    finally:
        ms.set_context(mode=prev_mode)


class CalibrationProgress:
    """What a long calibration shows: per layer, the stage it belongs to (embed, blocks.i, head),
    the elapsed time and an ETA. Once a transformer block has ended, the ETA is the mean time of
    the finished blocks (they cost alike) times the blocks still to do, plus what is left of the
    current one; before that it extrapolates from the layers done (single-layer stages, the
    embedding and the head, are cheap and not counted). quiet: one line, rewritten in place and
    ended by close(); else a line per layer. log None: nothing is shown."""

    def __init__(self, stages, log, quiet=False, start=None):
        self.log, self.quiet = log, quiet
        self.start = start or time.time()
        self.stage_of = {n: k for k, (_, _, names) in enumerate(stages) for n in names}
        self.labels = [label for label, _, _ in stages]
        self.sizes = [len(names) for _, _, names in stages]
        self.layers_done = 0
        self.block_seconds = []  # seconds of each finished multi-layer stage
        self.current, self.in_stage, self.stage_start = None, 0, self.start
        self._width = 0

    def eta(self, now):
        """Seconds left, estimated at `now` (None before any layer is done)."""
        if not self.layers_done:
            return None
        k = self.current
        if not self.block_seconds:
            return (now - self.start) / self.layers_done * (sum(self.sizes) - self.layers_done)
        per_block = sum(self.block_seconds) / len(self.block_seconds)
        later = sum(1 for size in self.sizes[k + 1:] if size > 1)
        here = max(per_block - (now - self.stage_start), 0.0) if self.in_stage < self.sizes[k] else 0.0
        return per_block * later + here

    def layer_done(self, name, text, seconds):
        now = time.time()
        k = self.stage_of.get(name, self.current or 0)
        if k != self.current:
            self.current, self.in_stage, self.stage_start = k, 0, now - seconds
        self.in_stage += 1
        self.layers_done += 1
        if self.in_stage == self.sizes[k] > 1:
            self.block_seconds.append(now - self.stage_start)
        if self.log is None:
            return
        eta = self.eta(now)
        where = f"{self.labels[k]} ({k + 1}/{len(self.sizes)})"
        clock = f"{now - self.start:.0f}s elapsed, ETA " + ("?" if eta is None else f"{eta:.0f}s")
        if self.quiet:
            line = f"calibrating {where} {name} [{self.layers_done}/{sum(self.sizes)} layers, {clock}]"
            self.log.write("\r" + line.ljust(self._width))
            self._width = len(line)
        else:
            self.log.write(f"  {text} [{seconds:.1f}s, {where}, {clock}]\n")
        self.log.flush()

    def stage_extra(self, seconds):
        """Count work done after the last layer of a finished block (e.g. block reconstruction)
        in that block's time, so the ETA includes it."""
        k = self.current
        if self.block_seconds and k is not None and self.in_stage == self.sizes[k] > 1:
            self.block_seconds[-1] += seconds

    def close(self):
        if self.log is not None and self.quiet and self._width:
            self.log.write("\n")
            self.log.flush()


def calibrate_model(model, images, qcfg, log=sys.stderr, stages=None, quiet=False):
    """Calibrate every quantized cell of `model` on images (N, C, H, W) with qcfg['method'],
    stage by stage. Leaves the model in quantized mode. Returns {layer: info}. `stages`: only
    the first that many stages of model_stages (benchmarks that time part of a model). log: the
    stream of the progress lines (None: silent); quiet: one updating line instead of a line per
    layer (CalibrationProgress)."""
    method = get_method(qcfg)
    batch = qcfg["calib_batch_size"]
    use_fp_input = qcfg.get("calib_input", "quantized") == "fp"
    report = {}
    x_fp = np.asarray(images, np.float32)
    x_q = x_fp
    start = time.time()
    todo = model_stages(model)[:stages]
    progress = CalibrationProgress(todo, log, quiet, start)
    with calibration_session(model) as cells, contextlib.closing(progress), \
            search_threads(qcfg.get("calib_threads", 0)), kept_heap_memory():
        for _, fn, names in todo:
            if hasattr(method, "before_stage"):  # e.g. vtptq_plus folds LayerNorm scales into the stage
                method.before_stage(fn, x_fp, batch)
            fp_out = []  # the FP stage output, when calibrate_stage's pass of the FP targets made it
            report.update(calibrate_stage(method, cells, fn, names, x_fp, x_q, batch, log, start, fp_out, progress))
            # advance both paths to the next stage (the FP stage is the same before and after
            # calibration: bias corrections and learned weights apply only while quantizing)
            _set_quant(cells, names, False)
            x_fp_next = fp_out[0] if fp_out else run_stage(fn, x_fp, batch)[0]
            _set_quant(cells, names, True)
            if hasattr(method, "after_stage"):  # e.g. vtptq_plus's block reconstruction (quantized input, FP output)
                t0 = time.time()
                for name, info in method.after_stage(fn, x_q, x_fp_next, None if quiet else log).items():
                    report[name].update(info)
                progress.stage_extra(time.time() - t0)
            x_q = x_fp_next if use_fp_input else run_stage(fn, x_q, batch)[0]
            x_fp = x_fp_next
    return report


def _fmt(scale):
    s = np.asarray(scale).ravel()
    return f"{s[0]:.4g}" if s.size == 1 else f"[{s.min():.3g}..{s.max():.3g}]x{s.size}"
