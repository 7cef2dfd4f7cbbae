"""The collectives of an `msrun` launch: the bottom of the project's distributed code, which
imports nothing of the project but src/utils.py.

    msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True eval.py ...

A process started by msrun (MS_WORKER_NUM / MS_ROLE in its environment) joins the
communication group in `init_distributed`; any other process is a group of one and never
touches mindspore.communication. `shard_indices` cuts a data set into contiguous runs of whole
batches, one per worker: every batch a worker forwards holds the same images, in the same
order and with the same zero padding, as the batch of a single-process run, so its logits are
the same bits even on CPUs whose kernels round differently with the batch's composition (oneDNN
on AVX2). Sharded evaluation and the synchronisation of calibration state, which combine these
collectives with the evaluation loop and the quantized cells, are in src/sharded.py.

Calibration (`calibration_shard`): with a method that can shard (`Method.shardable`), each
worker forwards only its run of whole calibration batches (the same rule), and every quantity
that a method reduces over samples goes through `gather_samples` (concatenate a per-sample
array over ranks in rank order) or `max_over_samples`; every rank then reduces the gathered
values in the single-process order, so the intervals equal the single-process ones bit for
bit. With fewer calibration batches than workers (the default 32 images in one batch of 32),
or a method that cannot shard, every rank calibrates on all images: the same intervals, no
speed-up. Outside a sharded calibration, and in a single process, both reductions are the
identity, so the single-process path is the one-rank case of the same code.

MindSpore's CPU collectives carry float32 only and reduce float32 by sum only, so
everything travels through AllGather: integers as float32 (exact below 2^24), maxima taken
from the gathered values, float64 values as four float32 words of 16 bits each (exact,
and never a NaN or denormal pattern a device might alter).
"""
import contextlib
import os
import sys

import numpy as np

from .utils import UserError

LAUNCH_ENV = "MS_WORKER_NUM"  # set by msrun for every worker
EXACT_FLOAT32 = 2 ** 24


class DistContext:
    """rank, size and whether this process writes results (rank 0)."""

    def __init__(self, rank=0, size=1):
        self.rank, self.size = int(rank), int(size)

    @property
    def is_main(self):
        return self.rank == 0

    @property
    def enabled(self):
        return self.size > 1

    def __repr__(self):
        return f"DistContext(rank={self.rank}, size={self.size})"


_CONTEXT = DistContext()


def launched_distributed():
    """True in a worker started by msrun (or any launcher that sets MS_WORKER_NUM > 1)."""
    try:
        return int(os.environ.get(LAUNCH_ENV, "1")) > 1
    except ValueError:
        return False


def init_distributed(device_target="CPU"):
    """Join the communication group when launched by msrun; returns the DistContext (also
    kept module-wide, see context()). A launch whose backend cannot start is a UserError
    (one line from the command-line tools)."""
    global _CONTEXT
    if not launched_distributed():
        _CONTEXT = DistContext()
        return _CONTEXT
    if _CONTEXT.enabled:
        return _CONTEXT
    from mindspore.communication import get_group_size, get_rank, init
    try:
        init()
    except Exception as e:  # noqa: BLE001 - MindSpore raises RuntimeError/ValueError with pages of text
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"distributed launch ({LAUNCH_ENV}={os.environ.get(LAUNCH_ENV)}) but the "
                           f"{device_target} communication backend did not start: {first}") from None
    _CONTEXT = DistContext(get_rank(), get_group_size())
    return _CONTEXT


def context():
    return _CONTEXT


def num_batches(num_items, batch_size):
    return -(-int(num_items) // int(batch_size))


def shard_indices(num_items, rank, size, batch_size=1):
    """Indices of the images worker `rank` of `size` takes: a contiguous run of whole batches of
    `batch_size`, cut where one process cuts range(num_items), so every batch a worker forwards
    holds the same images, in the same order and with the same padding, as in one process (and
    its logits are the same bits, even where a kernel depends on the batch's composition).
    Workers' batch counts differ by at most one; fewer batches than workers is a ValueError."""
    batches = num_batches(num_items, batch_size)
    if size > batches:
        raise ValueError(f"{size} workers for {num_items} images in {batches} batch{'es' if batches != 1 else ''} of "
                         f"{batch_size}: every worker needs at least one whole batch; launch at most {batches} "
                         f"workers{' or lower the batch size' if batch_size > 1 else ''}")
    first, stop = batches * rank // size, batches * (rank + 1) // size
    return np.arange(first * batch_size, min(stop * batch_size, num_items))


def all_gather(array):
    """AllGather of a float32 array of the same shape on every rank: (size,) + shape."""
    from mindspore import Tensor, ops
    a = np.ascontiguousarray(array, np.float32)
    if not _CONTEXT.enabled:
        return a[None]
    out = ops.AllGather()(Tensor(a.reshape((1,) + a.shape))).asnumpy()
    return out.reshape((_CONTEXT.size,) + a.shape)


def barrier():
    """Wait until every rank gets here (an AllGather of one number)."""
    if _CONTEXT.enabled:
        all_gather(np.zeros(1, np.float32))


def all_sum(values):
    """Sum over ranks of a vector of non-negative integers (exact: checked below 2^24)."""
    v = np.asarray(values, np.float64)
    if not _CONTEXT.enabled:
        return v.astype(np.int64)
    total = all_gather(v).astype(np.float64).sum(axis=0)
    if np.any(total >= EXACT_FLOAT32):
        raise OverflowError("a distributed count reached 2^24; float32 collectives cannot carry it exactly")
    return np.rint(total).astype(np.int64)


def gather_rows(rows, width):
    """AllGather of per-rank float32 tables (n_r, width) with different n_r; concatenated in rank order."""
    rows = np.asarray(rows, np.float32).reshape(-1, width)
    counts = all_gather(np.array([len(rows)], np.float32))[:, 0].astype(np.int64)
    longest = int(counts.max())
    padded = np.zeros((max(longest, 1), width), np.float32)
    padded[:len(rows)] = rows
    table = all_gather(padded)
    return np.concatenate([table[r, :counts[r]] for r in range(len(counts))])


# ----------------------------------------------------------------------------- sharded calibration
_SHARDED = False  # True while a sharded calibration runs (calibration_shard)
_SHARD_START = 0  # index of this rank's first calibration image then


def _encode_float64(values):
    """float64 (n, m) -> float32 (n, 4m): the 64 bits of each value as four 16-bit integers."""
    bits = np.ascontiguousarray(values, np.float64).view(np.uint64)
    words = np.stack([(bits >> np.uint64(s)) & np.uint64(0xFFFF) for s in (48, 32, 16, 0)], axis=-1)
    return words.reshape(len(bits), 4 * bits.shape[1]).astype(np.float32)


def _decode_float64(words):
    """Inverse of _encode_float64."""
    words = np.asarray(words, np.float64)
    w = np.rint(words).astype(np.uint64).reshape(len(words), words.shape[1] // 4, 4)
    bits = (w[..., 0] << np.uint64(48)) | (w[..., 1] << np.uint64(32)) | (w[..., 2] << np.uint64(16)) | w[..., 3]
    return bits.view(np.float64)


def sharding_calibration():
    """True while this process calibrates on its shard together with other ranks."""
    return _SHARDED and _CONTEXT.enabled


def calibration_offset():
    """Index of this rank's first calibration image in a sharded calibration (else 0): the
    calibration forwards its shard in batches cut where one process cuts all the images."""
    return _SHARD_START if sharding_calibration() else 0


def gather_samples(array):
    """Concatenate a per-sample array (axis 0 = samples; same trailing shape and dtype on every
    rank, any number of samples) over the ranks of a sharded calibration, in rank order: the
    array a single process would have computed on all the images. float64 travels bit-exactly
    (four 16-bit words per value), anything else as float32 (ints exact below 2^24, float32
    as is). The identity outside a sharded calibration."""
    a = np.asarray(array)
    if not sharding_calibration():
        return a
    dtype, tail = a.dtype, a.shape[1:]
    flat = a.reshape(len(a), int(np.prod(tail, dtype=np.int64)))
    rows = _encode_float64(flat) if dtype == np.float64 else flat.astype(np.float32)
    table = gather_rows(rows, rows.shape[1])
    out = _decode_float64(table) if dtype == np.float64 else table.astype(dtype)
    return out.reshape((len(table),) + tail)


def max_over_samples(value):
    """Elementwise maximum over the ranks of a sharded calibration of a float32 array (this
    rank's maximum over its samples); exact. The identity outside a sharded calibration."""
    v = np.asarray(value, np.float32)
    if not sharding_calibration():
        return v
    return all_gather(v).max(axis=0)


@contextlib.contextmanager
def local_reductions():
    """Inside, gather_samples and max_over_samples are the identity: for arrays that already
    hold every rank's samples (gathered once, e.g. vtptq_plus's learned rounding)."""
    global _SHARDED
    was = _SHARDED
    _SHARDED = False
    try:
        yield
    finally:
        _SHARDED = was


@contextlib.contextmanager
def calibration_shard(images, shardable=True, log=None, batch_size=None):
    """Yield the calibration images this rank forwards: under msrun, when `shardable` and there
    are at least as many batches of `batch_size` as workers, its run of whole batches
    (calibration_shard_indices; gather_samples / max_over_samples then combine over ranks until
    the block ends), else all of them. Each rank logs its shard (or why it has all images)."""
    global _SHARDED, _SHARD_START
    ctx, log = _CONTEXT, log or sys.stdout
    if not ctx.enabled:
        yield images
        return
    batch_size = int(batch_size or len(images))
    idx = calibration_shard_indices(len(images), ctx.rank, ctx.size, batch_size) if shardable else None
    if idx is None:
        why = ("this method cannot shard its calibration yet" if not shardable else
               f"{len(images)} images make {num_batches(len(images), batch_size)} batch(es) of {batch_size} for "
               f"{ctx.size} workers (a shard is whole batches; a smaller calib_batch_size shards them)")
        print(f"calibration shard: {why}; every rank calibrates on all {len(images)} images", file=log, flush=True)
        yield images
        return
    print(f"calibration shard: images {idx[0]}-{idx[-1]} of {len(images)}", file=log, flush=True)
    _SHARDED, _SHARD_START = True, int(idx[0])
    try:
        yield images[idx[0]:idx[-1] + 1]
    finally:
        _SHARDED, _SHARD_START = False, 0


def calibration_shard_indices(num_images, rank, size, batch_size):
    """shard_indices of the calibration images in batches of `batch_size`, or None when there
    are fewer batches than workers (every rank then calibrates on all images: the same
    batches as one process, so the same intervals, without the speed-up)."""
    if size > num_batches(num_images, batch_size):
        return None
    return shard_indices(num_images, rank, size, batch_size)


def gather_counts(count):
    """[count of rank 0, count of rank 1, ...] (a non-negative integer per rank); [count] in a single process."""
    if not _CONTEXT.enabled:
        return [int(count)]
    return [int(c) for c in np.rint(all_gather(np.array([count], np.float32))[:, 0])]
