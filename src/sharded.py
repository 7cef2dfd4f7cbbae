"""The work of an msrun launch split over its workers, at the level of src/engine.py: sharded
evaluation (`evaluate_sharded`: each worker evaluates a contiguous run of whole batches, counts
and predictions combined so that every number is that of a single-process run) and the
synchronisation of calibration state (`sync_calibration`: every rank takes rank 0's bits,
intervals and bias corrections). The collectives themselves are in src/distributed.py; they
are called through the module (dist.all_gather, dist.context()) so that a test can stand in
for another rank."""
import sys

import numpy as np

from . import distributed as dist
from .engine import evaluate
from .quant.convert import quant_cells


def evaluate_sharded(model, dataset, batch_size, num_workers=2, keep_predictions=False, desc="eval"):
    """src.engine.evaluate over this rank's shard, combined over ranks (see the module doc).
    Single process: evaluate on the whole data set."""
    ctx = dist.context()
    if not ctx.enabled:
        return evaluate(model, dataset, batch_size, num_workers=num_workers, keep_predictions=keep_predictions,
                        desc=desc)
    shard = dist.shard_indices(len(dataset), ctx.rank, ctx.size, batch_size)
    local = evaluate(model, dataset, batch_size, num_workers=num_workers, keep_predictions=keep_predictions,
                     desc=f"{desc} [rank {ctx.rank}/{ctx.size}: images {shard[0]}-{shard[-1]}]", indices=shard,
                     allow_empty=True)
    counts = dist.all_sum([local["num_images"], local["skipped_images"], local["correct1"], local["correct5"]])
    count, skipped, correct1, correct5 = (int(c) for c in counts)
    seconds = float(dist.all_gather(np.array([local["seconds"]]))[:, 0].max())
    if count == 0:
        raise ValueError("no images were evaluated (all skipped or an empty data set)")
    result = dict(num_images=count, skipped_images=skipped, top1=100.0 * correct1 / count,
                  top5=100.0 * correct5 / count, correct1=correct1, correct5=correct5, seconds=seconds,
                  images_per_second=count / seconds if seconds > 0 else None, num_shards=ctx.size)
    if keep_predictions:
        result["predictions"] = _gather_predictions(local["predictions"], dataset)
    return result


def _gather_predictions(preds, dataset):
    """[(name, label, top-k, probs)] of every rank, in data set order (shards are contiguous)."""
    index = {name: i for i, name in enumerate(dataset_names(dataset))}
    k = len(preds[0][2]) if preds else 0
    k = int(max(dist.all_gather(np.array([k], np.float32))[:, 0]))
    rows = np.zeros((len(preds), 2 + 2 * k), np.float32)
    for r, (name, label, top, probs) in enumerate(preds):
        rows[r, 0], rows[r, 1] = index[name], label
        rows[r, 2:2 + k], rows[r, 2 + k:] = top, probs
    table = dist.gather_rows(rows, 2 + 2 * k)
    names = dataset_names(dataset)
    return [(names[int(row[0])], int(row[1]), [int(v) for v in row[2:2 + k]], [float(p) for p in row[2 + k:]])
            for row in table]


def dataset_names(dataset):
    """The name iter_batches gives each sample, by sample index."""
    if hasattr(dataset, "samples"):  # ImageFolderDataset: path relative to the root
        return [s[0] for s in dataset.samples]
    return [f"{dataset.split}/{j}" for j in range(len(dataset))]  # EmbeddedFMNIST


def calibration_state(model):
    """Bits, intervals, biases and bias corrections of the quantized cells, flattened (float32) in a fixed order."""
    parts = []
    for _, cell in quant_cells(model):
        for op in cell.operands:
            q = getattr(cell, f"{op}_q")
            parts += [np.array([q.bits, q.signed], np.float32), cell.get_scale(op).ravel()]
        if getattr(cell, "has_bias", False):
            parts.append(cell.bias.asnumpy().ravel())
        if cell.bias_corr is not None:
            parts.append(cell.bias_corr.ravel())
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros(0, np.float32)


def sync_calibration(model):
    """Give every rank rank 0's calibration state; returns the largest absolute difference
    between this rank's own state and rank 0's (0.0 when they already agreed, or single process)."""
    if not dist.context().enabled:
        return 0.0
    mine = calibration_state(model)
    ref = dist.all_gather(mine)[0]
    diff = float(np.abs(ref - mine).max()) if mine.size else 0.0
    if diff == 0.0:
        return diff
    pos = 0
    for _, cell in quant_cells(model):
        for op in cell.operands:
            bits, signed = int(ref[pos]), bool(ref[pos + 1])
            pos += 2
            n = cell.get_scale(op).size
            cell.set_bits(op, bits, signed)
            cell.set_scale(op, ref[pos:pos + n])
            pos += n
        if getattr(cell, "has_bias", False):
            pos += int(np.prod(cell.bias.shape))  # follows from the FP bias and the correction
        if cell.bias_corr is not None:
            n = cell.bias_corr.size
            cell.set_bias_correction(ref[pos:pos + n])
            pos += n
    print(f"warning: rank {dist.context().rank} calibrated differently from rank 0 (max abs difference {diff:.3g}); "
          "using rank 0's intervals", file=sys.stderr, flush=True)
    return diff
