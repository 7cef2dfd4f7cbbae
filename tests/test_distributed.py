"""Data-parallel evaluation and calibration (src/distributed.py): sharding, the combination of
counts and predictions, rank 0's calibration on every rank, and real 2-worker msrun launches
of eval.py and quant.py compared with single-process runs."""
import csv
import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import mindspore as ms

from src import distributed
from src.config import defaults
from src.data.build import build_eval_dataset
from src.distributed import (DistContext, calibration_shard, calibration_shard_indices, gather_rows, gather_samples,
                             max_over_samples, shard_indices)
from src.sharded import calibration_state, dataset_names, evaluate_sharded, sync_calibration
from src.engine import evaluate, predict
from src.models import create_model, get_data_config
from src.quant import METHODS, calibrate_model, quantize_model, set_quant_mode
from src.quant.calibrate import AlternatingSearch, batch_bounds, is_shardable

from _helpers import randomize

ms.set_device("CPU")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_IMAGES = 101  # odd: the two shards differ in size
N_CALIB = 9  # calibration images of the sharded-calibration test: shards of 4 and 5


@pytest.fixture(scope="module", autouse=True)
def restore_mode():
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def msrun(workers, entry, args, log_dir, timeout=600):
    """Launch `entry` with msrun; returns (exit code, every worker's log text)."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    cmd = [sys.executable, "-m", "mindspore.parallel.cluster.run", f"--worker_num={workers}",
           f"--local_worker_num={workers}", f"--master_port={free_port()}", f"--log_dir={log_dir}",
           "--join=True", entry] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    logs = ""
    for path in sorted(glob.glob(os.path.join(str(log_dir), "worker_*.log"))):
        with open(path, encoding="utf-8", errors="replace") as f:
            logs += f.read()
    return proc.returncode, logs


def read_json(path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def single(entry, args):
    """The same entry point in a plain subprocess (no msrun)."""
    proc = subprocess.run([sys.executable, entry] + [str(a) for a in args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ----------------------------------------------------------------------------- sharding

@pytest.mark.parametrize("n", [1, 2, 7, 10, 101])
def test_shards_cover_every_image_once(n):
    for size in range(1, min(n, 6) + 1):
        shards = [shard_indices(n, r, size) for r in range(size)]
        np.testing.assert_array_equal(np.concatenate(shards), np.arange(n))
        lengths = [len(s) for s in shards]
        assert max(lengths) - min(lengths) <= 1 and min(lengths) >= 1


def test_more_workers_than_images_is_an_error():
    with pytest.raises(ValueError, match="3 workers for 2 images"):
        shard_indices(2, 0, 3)


def test_single_process_is_a_group_of_one(monkeypatch):
    monkeypatch.delenv("MS_WORKER_NUM", raising=False)
    ctx = distributed.init_distributed("CPU")
    assert (ctx.rank, ctx.size, ctx.is_main, ctx.enabled) == (0, 1, True, False)
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(gather_rows(rows, 3), rows)
    np.testing.assert_array_equal(distributed.all_sum([3, 4]), [3, 4])


def fake_two_ranks(monkeypatch, rank, other_rows):
    """Pretend to be `rank` of 2: all_gather stacks this rank's array with `other_rows(array)`."""
    monkeypatch.setattr(distributed, "_CONTEXT", DistContext(rank, 2))

    def gather(a):
        a = np.asarray(a, np.float32)
        other = np.asarray(other_rows(a), np.float32)
        return np.stack([a, other] if rank == 0 else [other, a])
    monkeypatch.setattr(distributed, "all_gather", gather)


def test_gather_rows_keeps_rank_order_with_unequal_lengths(monkeypatch):
    mine = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    theirs = np.array([[7, 8], [9, 10]], np.float32)

    def other(a):  # rank 1's answer to the same collective: its count, then its padded rows
        if a.shape == (1,):
            return np.array([len(theirs)], np.float32)
        out = np.zeros_like(a)
        out[:len(theirs)] = theirs
        return out
    fake_two_ranks(monkeypatch, 0, other)
    np.testing.assert_array_equal(gather_rows(mine, 2), np.concatenate([mine, theirs]))


def test_sharded_evaluation_matches_whole_evaluation():
    """Shards of whole batches give the predictions of one process bit for bit, on any CPU (on
    AVX2, oneDNN's logits change with the batch's composition: shards cut inside a batch of the
    single-process run differed in the 7th digit of a probability)."""
    ms.set_context(mode=ms.PYNATIVE_MODE)
    cfg = dict(defaults(), max_images=101)
    data = build_eval_dataset(cfg, get_data_config("deit_fmnist"))
    model = create_model("deit_fmnist", checkpoint=os.path.join(REPO, "assets", "deit_fmnist.ckpt"))
    whole = evaluate(model, data, 32, keep_predictions=True)
    parts = [evaluate(model, data, 32, keep_predictions=True, indices=shard_indices(len(data), r, 3, 32))
             for r in range(3)]
    assert [p["num_images"] for p in parts] == [32, 32, 37]  # 4 batches: 1, 1 and 2 (the last one partial)
    assert sum(p["correct1"] for p in parts) == whole["correct1"]
    assert sum(p["correct5"] for p in parts) == whole["correct5"]
    assert [p for part in parts for p in part["predictions"]] == whole["predictions"]
    assert evaluate_sharded(model, data, 32)["top1"] == whole["top1"]  # single process: the whole set
    assert dataset_names(data)[:2] == ["test/0", "test/1"]


# ----------------------------------------------------------------------------- sharded calibration

def test_float64_travels_bit_exactly():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 63, size=(50, 3), dtype=np.int64).astype(np.uint64) * np.uint64(2)
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, 1.0, -1e308, np.pi], np.float64)
    values = np.concatenate([bits.view(np.float64).ravel(), special]).reshape(-1, 2)
    words = distributed._encode_float64(values)
    assert words.dtype == np.float32 and words.shape == (len(values), 8)
    assert np.all((words >= 0) & (words <= 0xFFFF) & (words == np.rint(words)))  # plain small integers
    np.testing.assert_array_equal(distributed._decode_float64(words).view(np.uint64), values.view(np.uint64))


def fake_gather_samples(monkeypatch, rank, theirs):
    """Pretend to be `rank` of 2 in a sharded calibration, the other rank holding `theirs`."""
    def other(a):  # the other rank's answer to the same collective: its count, or its padded rows
        if a.shape == (1,):
            return np.array([len(theirs)], np.float32)
        rows = theirs.reshape(len(theirs), -1)
        encoded = a.shape[-1] == 4 * rows.shape[1]  # float64 travels as 4 words per value
        rows = distributed._encode_float64(rows) if encoded else rows.astype(np.float32)
        out = np.zeros_like(a)
        out[:len(rows)] = rows
        return out
    fake_two_ranks(monkeypatch, rank, other)
    monkeypatch.setattr(distributed, "_SHARDED", True)


@pytest.mark.parametrize("rank", [0, 1])
def test_gather_samples_concatenates_in_rank_order(monkeypatch, rank):
    rng = np.random.default_rng(rank)
    mine, theirs = rng.standard_normal((3, 2, 2)), rng.standard_normal((5, 2, 2))
    fake_gather_samples(monkeypatch, rank, theirs)
    both = gather_samples(mine)
    want = np.concatenate([mine, theirs] if rank == 0 else [theirs, mine])
    assert both.dtype == np.float64 and both.shape == (8, 2, 2)
    np.testing.assert_array_equal(both.view(np.uint64), want.view(np.uint64))  # bit for bit
    f32 = gather_samples(mine.astype(np.float32))  # float32 travels as is
    assert f32.dtype == np.float32
    np.testing.assert_array_equal(f32, want.astype(np.float32))


def test_max_over_samples_takes_the_largest_of_the_ranks(monkeypatch):
    fake_two_ranks(monkeypatch, 1, lambda a: np.full_like(a, 2.5))
    monkeypatch.setattr(distributed, "_SHARDED", True)
    np.testing.assert_array_equal(max_over_samples(np.array([1.0, 3.0], np.float32)), [2.5, 3.0])


def test_combination_is_the_identity_outside_a_sharded_calibration(monkeypatch):
    def no_collective(a):
        raise AssertionError("no collective outside a sharded calibration")
    monkeypatch.setattr(distributed, "_CONTEXT", DistContext(1, 2))
    monkeypatch.setattr(distributed, "all_gather", no_collective)
    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    assert gather_samples(x) is x or np.array_equal(gather_samples(x), x)
    np.testing.assert_array_equal(max_over_samples(np.float32(2)), 2)
    with calibration_shard(x, shardable=False, log=open(os.devnull, "w")) as mine:  # all images, no gather
        assert mine is x and not distributed.sharding_calibration()


def test_local_reductions_gather_nothing_and_restore_the_shard(monkeypatch):
    """vtptq_plus's learned rounding gathers its arrays once, then reduces them locally."""
    theirs = np.ones((2, 3))
    fake_gather_samples(monkeypatch, 0, theirs)
    mine = np.zeros((1, 3))
    with distributed.local_reductions():
        assert gather_samples(mine) is mine and not distributed.sharding_calibration()
    assert distributed.sharding_calibration() and gather_samples(mine).shape == (3, 3)


def test_calibration_shard_yields_this_ranks_images(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "_CONTEXT", DistContext(1, 2))
    x = np.arange(9)
    with calibration_shard(x, batch_size=3) as mine:  # batches 0-2 | 3-5, 6-8
        np.testing.assert_array_equal(mine, [3, 4, 5, 6, 7, 8])
        assert distributed.sharding_calibration() and distributed.calibration_offset() == 3
    assert not distributed.sharding_calibration()
    assert capsys.readouterr().out == "calibration shard: images 3-8 of 9\n"


def test_fewer_calibration_batches_than_workers_calibrate_everywhere(monkeypatch, capsys):
    monkeypatch.setattr(distributed, "_CONTEXT", DistContext(1, 3))
    x = np.arange(32)
    assert calibration_shard_indices(32, 1, 3, 16) is None and calibration_shard_indices(2, 0, 3, 1) is None
    with calibration_shard(x, batch_size=16) as mine:  # one process forwards 2 batches: 3 workers cannot share them
        assert mine is x and not distributed.sharding_calibration()
    assert capsys.readouterr().out == ("calibration shard: 32 images make 2 batch(es) of 16 for 3 workers (a shard "
                                       "is whole batches; a smaller calib_batch_size shards them); every rank "
                                       "calibrates on all 32 images\n")


@pytest.mark.parametrize("n,batch,size", [(64, 32, 2), (101, 32, 2), (101, 32, 4), (9, 4, 2), (10, 3, 4), (7, 1, 3)])
def test_shards_are_whole_batches_of_one_process(n, batch, size):
    whole = batch_bounds(n, batch)
    got, counts = [], []
    for r in range(size):
        idx = shard_indices(n, r, size, batch)
        np.testing.assert_array_equal(idx, np.arange(idx[0], idx[-1] + 1))
        bounds = [(int(idx[0]) + a, int(idx[0]) + b) for a, b in batch_bounds(len(idx), batch, int(idx[0]))]
        got += bounds
        counts.append(len(bounds))
    assert got == whole  # the same batches, each on one worker, in order
    assert max(counts) - min(counts) <= 1


def test_more_workers_than_batches_is_an_error():
    with pytest.raises(ValueError, match=r"^3 workers for 64 images in 2 batches of 32: every worker needs at least "
                                         r"one whole batch; launch at most 2 workers or lower the batch size$"):
        shard_indices(64, 0, 3, 32)


def test_shardable_is_declared_per_class():
    assert all(is_shardable(METHODS[m]) for m in ("minmax", "percentile", "easyquant", "vtptq", "vtptq_plus"))

    class Derived(AlternatingSearch):  # may reduce over samples in its own way: not shardable unless it says so
        name = "derived"
    assert not is_shardable(Derived) and not is_shardable(Derived(defaults()))
    from src.quant import mixed_precision
    assert mixed_precision.is_shardable(defaults()) and mixed_precision.is_shardable({"mp_criterion": "paper"})
    assert mixed_precision.is_shardable({"mp_criterion": "refined"})
    assert not mixed_precision.is_shardable({"mp_criterion": "another"})


def test_msrun_sharded_calibration_equals_single_process(tmp_path):
    """Each of 2 msrun workers calibrates a tiny ViT on its shard (4 and 5 of 9 images); every
    method (vtptq_plus with its default switches, and with attn_reparam, recon_iters and block_recon_iters on), and
    the mixed-precision searches (paper and refined), give the single-process results bit for bit."""
    methods = "minmax,percentile,easyquant,vtptq,vtptq_plus,vtptq_plus_all,minmax_unshardable"
    single("tests/_msrun_calib.py", [tmp_path / "one.npz", N_CALIB, methods, "--mp"])
    rc, logs = msrun(2, "tests/_msrun_calib.py", [tmp_path / "two.npz", N_CALIB, methods, "--mp"], tmp_path / "logs")
    assert rc == 0, logs[-3000:]
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    for key in methods.split(",") + ["mp_omega", "mp_sensitivity", "refined_omega", "refined_objective"]:
        np.testing.assert_array_equal(two[key], one[key], err_msg=key)
    c1, c2 = json.loads(str(one["counts"])), json.loads(str(two["counts"]))
    assert c1["vtptq"] == [N_CALIB]
    assert c2["vtptq"] == c2["minmax"] == c2["percentile"] == c2["vtptq_plus"] == c2["vtptq_plus_all"] == [4, 5]
    assert c2["minmax_unshardable"] == [N_CALIB, N_CALIB]  # cannot shard: all images on every rank
    assert c1["mp_modules"] == c2["mp_modules"]
    assert c1["refined_modules"] == c2["refined_modules"] and c1["refined_passes"] == c2["refined_passes"]
    assert "calibration shard: images 0-3 of 9" in logs and "calibration shard: images 4-8 of 9" in logs
    assert "this method cannot shard its calibration yet; every rank calibrates on all 9 images" in logs


# ----------------------------------------------------------------------------- calibration sync

def tiny_calibrated(seed_images, bits=8, corr=None):
    model = randomize(create_model("deit_fmnist"), seed=0)
    quantize_model(model, dict(defaults(), w_bits=bits, a_bits=bits))
    x = np.random.default_rng(seed_images).standard_normal((8, 1, 28, 28)).astype(np.float32)
    calibrate_model(model, x, dict(defaults(), method="minmax", w_bits=bits, a_bits=bits, calib_batch_size=8),
                    log=open(os.devnull, "w"))
    cells = dict(model.cells_and_names())
    if corr is not None:
        fc2 = cells["blocks.0.mlp.fc2"]
        fc2.set_bias_correction(np.full(fc2.bias.shape, corr, np.float32))
    set_quant_mode(model, "quantized")
    return model


def test_every_rank_takes_rank_zeros_calibration(monkeypatch):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    ref = tiny_calibrated(seed_images=1, corr=0.25)
    dict(ref.cells_and_names())["blocks.1.attn.qkv"].set_bits("w", 6)
    mine = tiny_calibrated(seed_images=2, corr=-0.5)  # other images, other bits: another calibration
    ref_state = calibration_state(ref)
    assert not np.array_equal(ref_state, calibration_state(mine))
    fake_two_ranks(monkeypatch, 1, lambda a: ref_state)
    diff = sync_calibration(mine)
    assert diff > 0
    np.testing.assert_array_equal(calibration_state(mine), ref_state)
    assert dict(mine.cells_and_names())["blocks.1.attn.qkv"].w_q.bits == 6
    x = np.random.default_rng(5).standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(predict(mine, x, 4), predict(ref, x, 4))
    set_quant_mode(mine, "fp")  # the FP bias comes back when quantization is off
    set_quant_mode(ref, "fp")
    np.testing.assert_array_equal(predict(mine, x, 4), predict(ref, x, 4))


def test_agreeing_ranks_change_nothing(monkeypatch):
    ms.set_context(mode=ms.PYNATIVE_MODE)
    model = tiny_calibrated(seed_images=1)
    state = calibration_state(model)
    fake_two_ranks(monkeypatch, 1, lambda a: a)
    assert sync_calibration(model) == 0.0
    np.testing.assert_array_equal(calibration_state(model), state)


# ----------------------------------------------------------------------------- msrun launches

def test_msrun_eval_equals_single_process(tmp_path):
    args = ["--max-images", N_IMAGES, "--batch-size", 32]
    single("eval.py", args + ["--output", tmp_path / "one", "--save-predictions", tmp_path / "one" / "p.csv"])
    rc, logs = msrun(2, "eval.py", args + ["--output", tmp_path / "two", "--save-predictions",
                                          tmp_path / "two" / "p.csv"], tmp_path / "logs")
    assert rc == 0, logs[-3000:]
    one, two = read_json(tmp_path / "one" / "result.json"), read_json(tmp_path / "two" / "result.json")
    for key in ("num_images", "top1", "top5", "correct1", "correct5"):
        assert one[key] == two[key], key
    assert (one["num_shards"], two["num_shards"], two["num_images"]) == (1, 2, N_IMAGES)
    assert read_rows(tmp_path / "one" / "p.csv") == read_rows(tmp_path / "two" / "p.csv")
    assert "2 workers (this is rank 1)" in logs  # both workers ran
    assert sorted(os.listdir(tmp_path / "two")) == ["config.yaml", "p.csv", "result.json", "run_manifest.json"]


def test_msrun_quant_equals_single_process(tmp_path):
    args = ["--config", "configs/deit_fmnist_minmax_w8a8.yaml", "--max-images", N_IMAGES, "--calib-num", 32,
            "--batch-size", 32, "--calib-batch-size", 16]  # shards of 16 images: one batch each, as in one process
    single("quant.py", args + ["--output", tmp_path / "one"])
    rc, logs = msrun(2, "quant.py", args + ["--output", tmp_path / "two"], tmp_path / "logs")
    assert rc == 0, logs[-3000:]
    one, two = read_json(tmp_path / "one" / "result.json"), read_json(tmp_path / "two" / "result.json")
    for key in ("num_images", "top1", "top5", "fp_top1", "fp_top5", "model_size_mb"):
        assert one[key] == two[key], key
    assert two["num_shards"] == 2 and two["calibration_rank_max_diff"] == 0.0
    assert (one["calib_shards"], one["calib_images_per_rank"]) == (1, [32])
    assert (two["calib_shards"], two["calib_images_per_rank"]) == (2, [16, 16])
    assert "calibration shard: images 0-15 of 32" in logs and "calibration shard: images 16-31 of 32" in logs
    for name, layer in one["layers"].items():
        for op in ("w", "a", "b"):
            if op in layer:
                assert layer[op]["scale"] == two["layers"][name][op]["scale"], (name, op)
    assert sorted(os.listdir(tmp_path / "two")) == ["config.yaml", "quantized.ckpt", "result.json", "run_manifest.json"]


def test_msrun_with_more_workers_than_batches_fails_cleanly(tmp_path):
    rc, logs = msrun(2, "quant.py", ["--calib-num", 1, "--max-images", 10, "--output", tmp_path / "out"],
                     tmp_path / "logs")
    assert rc != 0
    errors = {ln for ln in logs.splitlines() if ln.startswith("error:")}
    assert errors == {"error: 2 workers for 10 images in 1 batch of 100: every worker needs at least one whole batch; "
                      "launch at most 1 workers or lower the batch size"}, logs[-2000:]
    assert "full precision" not in logs and not os.path.exists(tmp_path / "out" / "result.json")


def test_missing_communication_backend_is_one_line(tmp_path):
    """A worker environment whose scheduler never answers: one error line, exit 2, no result."""
    env = dict(os.environ, MS_WORKER_NUM="2", MS_ROLE="MS_WORKER", MS_SCHED_HOST="127.0.0.1",
               MS_SCHED_PORT=str(free_port()), MS_NODE_ID="0", MS_TOPO_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "eval.py", "--max-images", "10", "--output", str(tmp_path / "out")],
                          cwd=REPO, env={k: str(v) for k, v in env.items()}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "communication backend did not start" in errors[0], proc.stderr[-2000:]
    assert not os.path.exists(tmp_path / "out" / "result.json")
