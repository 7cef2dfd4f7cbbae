"""The interval search's candidate chunks on several threads (calib_threads): every score, and
so every interval, bias correction and objective, is the same as on one thread; the chunks do
run at the same time; an error in a chunk reaches the caller."""
import io
import threading

import numpy as np
import pytest
from _helpers import randomize

import mindspore as ms

from src.config import defaults
from src.models.vit import VisionTransformer
from src.quant import calibrate_model, quant_cells, quantize_model, search, vtptq
from src.quant.quantizer import fake_quant_np
from src.quant.search import (LayerProblem, candidate_grid, for_each_chunk, score_candidates, search_threads,
                              set_search_threads)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of a few candidates, so that every search has several to share out."""
    monkeypatch.setattr(search, "CHUNK_ELEMS", 1 << 11)


def scores_on(threads, *args, **kw):
    with search_threads(threads):
        return score_candidates(*args, **kw)


def test_dense_input_and_weight_searches_equal_on_1_and_3_threads(small_chunks):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 5, 16)).astype(np.float32)
    w = rng.standard_normal((24, 16)).astype(np.float32)
    target = x @ w.T
    prob = LayerProblem(x, w, target, bias=rng.standard_normal(24).astype(np.float32))
    w_hat = np.ascontiguousarray(fake_quant_np(w, np.float32(np.abs(w).max() / 7), 4, True).T)
    x_hat = fake_quant_np(x, np.float32(np.abs(x).max() / 7), 4, True)
    cands_x = candidate_grid(np.float32(np.abs(x).max() / 7), 0.5, 1.2, 30)
    cands_w = candidate_grid(np.float32(np.abs(w).max() / 7), 0.5, 1.2, 30)
    for which, cands in (("a", cands_x), ("b", cands_w)):
        one = scores_on(1, prob, which, cands, x_hat, w_hat, 4, True, "pearson")
        three = scores_on(3, prob, which, cands, x_hat, w_hat, 4, True, "pearson")
        assert np.array_equal(one, three), which


def test_attention_scores_with_ranking_loss_equal_on_1_and_3_threads(small_chunks):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((4, 2, 9, 8)).astype(np.float32)
    k = rng.standard_normal((4, 2, 9, 8)).astype(np.float32)
    target = np.matmul(q, np.swapaxes(k, -1, -2))
    prob = LayerProblem(q, k, target, transpose_b=True, b_shared=False)
    k_hat = np.swapaxes(fake_quant_np(k, np.float32(np.abs(k).max() / 7), 4, True), -1, -2)
    pairs = vtptq.sample_pairs(9, 12, seed=0)

    def loss(out, sl):
        return 0.1 * vtptq.ranking_loss(target[sl], out, theta=0.2, pairs=pairs)
    cands = candidate_grid(np.float32(np.abs(q).max() / 7), 0.5, 1.2, 25)
    one = scores_on(1, prob, "a", cands, None, k_hat, 4, True, "pearson", extra_loss=loss)
    three = scores_on(3, prob, "a", cands, None, k_hat, 4, True, "pearson", extra_loss=loss)
    assert np.array_equal(one, three)


def calibrated(threads):
    cfg = defaults()
    cfg.update(method="vtptq", calib_num=8, search_candidates=20, max_rounds=2, w_bits=4, a_bits=4, ranking_pairs=8,
               calib_threads=threads)
    mode = ms.get_context("mode")
    try:
        model = randomize(VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32,
                                            depth=1, num_heads=2), seed=3)
        quantize_model(model, cfg)
        x = np.random.default_rng(5).standard_normal((8, 1, 28, 28)).astype(np.float32)
        calibrate_model(model, x, cfg, log=io.StringIO())
    finally:
        ms.set_context(mode=mode)
    return {name: {op: np.asarray(cell.get_scale(op)).copy() for op in cell.operands}
            for name, cell in quant_cells(model)}


def test_calibration_equal_on_1_and_2_threads(small_chunks):
    one, two = calibrated(1), calibrated(2)
    assert one.keys() == two.keys()
    for name in one:
        for op in one[name]:
            assert np.array_equal(one[name][op], two[name][op]), (name, op)


def test_chunks_run_at_the_same_time():
    """Two chunks wait for each other at a barrier: on one thread this would time out."""
    barrier = threading.Barrier(2, timeout=20)
    names = set()

    def fn(start):
        names.add(threading.current_thread().name)
        barrier.wait()
    with search_threads(2):
        for_each_chunk(fn, [0, 1])
    assert len(names) == 2


def test_chunk_error_reaches_the_caller_and_threads_restore():
    def fn(start):
        if start == 2:
            raise KeyError("chunk 2")
    before = set_search_threads(1)
    with pytest.raises(KeyError, match="chunk 2"):
        with search_threads(3) as n:
            assert n == 3
            for_each_chunk(fn, range(5))
    assert search._THREADS[0] == before
    assert set_search_threads(0) >= 1  # 0: one per available core
    set_search_threads(before)


def test_openblas_on_one_thread_while_the_pool_runs():
    """While the chunks run on the pool, numpy's OpenBLAS runs its products on one thread (each
    chunk takes a core); its thread count is back afterwards, also after an error."""
    blas = search._openblas()
    if blas is None:
        pytest.skip("numpy's BLAS here is not a bundled OpenBLAS")
    get, _ = blas
    before = get()
    seen = []

    def fn(start):
        seen.append(get())
        if start == 3:
            raise ValueError("chunk 3")
    with search_threads(2), pytest.raises(ValueError):
        for_each_chunk(fn, range(4))
    assert seen and set(seen) == {1}
    assert get() == before
    with search_threads(1):  # one thread: no pool, OpenBLAS as it was
        seen.clear()
        for_each_chunk(fn, range(3))
    assert set(seen) == {before}


@pytest.mark.parametrize("threads,chunks,sets", [(3, 10, 3), (3, 2, 2), (1, 5, 1)])
def test_work_buffers_one_set_per_thread_from_the_caller(threads, chunks, sets):
    """The chunks' work buffers (search.WorkBuffers): made by the calling thread, a set per
    thread that runs chunks (no more), and never lent to two chunks at once."""
    made, in_use, lent = [], set(), []
    lock = threading.Lock()

    def make():
        made.append(threading.current_thread())
        return np.empty(4)

    def fn(start):
        with work.lend() as buf:
            with lock:
                assert id(buf) not in in_use
                in_use.add(id(buf))
                lent.append(id(buf))
            threading.Event().wait(0.01)
            with lock:
                in_use.discard(id(buf))
    with search_threads(threads):
        work = search.WorkBuffers(make, chunks)
        for_each_chunk(fn, range(chunks))
    assert made == [threading.current_thread()] * sets
    assert len(lent) == chunks and len(set(lent)) <= sets and not in_use


def test_kept_heap_memory_yields_and_restores():
    """kept_heap_memory: the allocator settings apply inside (True with glibc) and an error
    inside the block still leaves it (the memory is given back)."""
    with search.kept_heap_memory() as ok:
        big = np.ones(1 << 23)  # 64 MB: from the heap, not a mapping, while it applies
        assert big.sum() == 1 << 23
    assert ok == (search._libc() is not None)
    with pytest.raises(ValueError, match="inside"):
        with search.kept_heap_memory():
            raise ValueError("inside")
