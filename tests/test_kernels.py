"""Speed work of issue #12 that must not move any number: the fused CPU kernels (src/kernels)
against the MindSpore chains they replace, bit for bit, and weights frozen at evaluation."""
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor

from src import kernels
from src.models.vit import GELU, divide

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="fused CPU kernels not available (no C++ compiler)")


def hostile_values(rng, n, step):
    """Normal values, many exact ties at half a step, and special values."""
    x = (rng.standard_normal(n) * 40 * step).astype(np.float32)
    x[: n // 4] = (rng.integers(-400, 400, n // 4) * 0.5 * step).astype(np.float32)  # ties of round()
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 1e-40, -1e-40, 3e38, -3e38, step / 2, -step / 2,
                        0.49999997 * step, -1e-3 * step, 127.5 * step, -128.5 * step, 255.5 * step], np.float32)
    x[n // 4: n // 4 + len(special)] = special
    return x


class Chain(nn.Cell):
    """The MindSpore chain of quantizer.fake_quant / fake_quant_asym (zp None: symmetric)."""

    def __init__(self, scale, lo, hi, zp=None):
        super().__init__()
        self.s = Parameter(Tensor(np.array([scale], np.float32)), requires_grad=False)
        self.z = None if zp is None else Parameter(Tensor(np.array([zp], np.float32)), requires_grad=False)
        self.lo, self.hi = lo, hi

    def construct(self, x):
        if self.z is None:
            return ops.clamp(ops.round(divide(x, self.s)), self.lo, self.hi) * self.s
        return (ops.clamp(ops.round(divide(x, self.s)) + self.z, self.lo, self.hi) - self.z) * self.s


class Fused(nn.Cell):
    def __init__(self, scale, lo, hi, zp=None):
        super().__init__()
        self.op = kernels.fake_quant_op()
        self.s = Parameter(Tensor(np.array([scale], np.float32)), requires_grad=False)
        self.z = Tensor(np.array([0.0 if zp is None else zp], np.float32))
        self.cfg = kernels.config(lo, hi, float(zp is not None))

    def construct(self, x):
        return self.op(x, self.s, self.z, self.cfg)


def bits(a):
    return np.asarray(a, np.float32).view(np.int32)


@pytest.mark.parametrize("mode", ["graph", "pynative"])
@pytest.mark.parametrize("lo,hi,zp", [(-128, 127, None), (-8, 7, None), (0, 15, None), (0, 255, 37.0), (0, 7, 0.0)])
def test_fused_fake_quant_bit_identical(mode, lo, hi, zp):
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        rng = np.random.default_rng(hi - lo)
        scale = 0.0371
        x = Tensor(hostile_values(rng, 200_000, scale).reshape(8, 25, 1000))
        ref, out = Chain(scale, lo, hi, zp)(x).asnumpy(), Fused(scale, lo, hi, zp)(x).asnumpy()
        assert np.array_equal(bits(ref), bits(out)), np.flatnonzero(bits(ref) != bits(out))[:10]
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


@pytest.mark.parametrize("mode", ["graph", "pynative"])
def test_fused_gelu_bit_identical(mode):
    """The fused exact GELU equals ops.gelu(approximate='none') and the RealDiv chain, bit for bit."""
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    try:
        rng = np.random.default_rng(1)
        x = np.concatenate([rng.standard_normal(300_000) * 3, rng.uniform(-12, 12, 100_000),
                            rng.standard_normal(50_000) * 1e-3]).astype(np.float32)
        x[:12] = [np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-40, -1e-40, 3e38, -3e38, 1e-30, 5.0, -5.0]
        t = Tensor(x.reshape(4, -1))
        fused = GELU()
        assert fused.fused is not None
        chain = GELU()
        chain.fused = None
        ref = ops.gelu(t, approximate="none").asnumpy()
        assert np.array_equal(bits(fused(t).asnumpy()), bits(ref))
        assert np.array_equal(bits(chain(t).asnumpy()), bits(ref))
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)


def test_fused_heads_transposition():
    op, cfg = kernels.permute0213_op(), kernels.config()
    x = np.random.default_rng(2).standard_normal((3, 197, 6, 64)).astype(np.float32)
    out = op(Tensor(x), cfg).asnumpy()
    assert out.shape == (3, 6, 197, 64)
    assert np.array_equal(out, x.transpose(0, 2, 1, 3))
    assert np.array_equal(op(Tensor(out), cfg).asnumpy(), x)


def test_fused_split_heads():
    op, cfg = kernels.split_heads_op(), kernels.config()
    x = np.random.default_rng(3).standard_normal((2, 197, 3, 6, 64)).astype(np.float32)
    q, k, v = (t.asnumpy() for t in op(Tensor(x), cfg))
    for i, t in enumerate((q, k, v)):
        assert t.shape == (2, 6, 197, 64)
        assert np.array_equal(t, x[:, :, i].transpose(0, 2, 1, 3))


def _embedded_logits(freeze, env):
    """Quantized (W4A4 minmax, per-channel weights) embedded model logits in a subprocess with env."""
    code = f"""
import io, sys, numpy as np, mindspore as ms
sys.path.insert(0, {ROOT!r})
from src.config import defaults
from src.models import create_model
from src.models.registry import default_checkpoint
from src.quant import calibrate_model, quantize_model, set_quant_mode
from src.quant.convert import freeze_weights
from src.data.fmnist import load_embedded, normalize
ms.set_device("CPU")
x = normalize(load_embedded("test")[0][:64], (0.5,), (0.5,))
cfg = defaults(); cfg.update(model="deit_fmnist", method="minmax", w_bits=4, a_bits=4, calib_num=32,
                             weight_per_channel=True)
m = create_model("deit_fmnist", checkpoint=default_checkpoint("deit_fmnist"))
quantize_model(m, cfg); calibrate_model(m, x[:32], cfg, log=io.StringIO()); set_quant_mode(m, "quantized")
if {freeze}: freeze_weights(m)
ms.set_context(mode=ms.GRAPH_MODE); m.set_train(False)
sys.stdout.buffer.write(m(ms.Tensor(x)).asnumpy().tobytes())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, env={**os.environ, **env}, check=True)
    return np.frombuffer(out.stdout, np.float32)


def test_embedded_model_same_logits_with_and_without_kernels_and_freezing():
    """The quantized embedded model gives bit-identical logits with the fused kernels on or off,
    with or without frozen weights."""
    ref = _embedded_logits(False, {"VTPTQ_CPU_KERNELS": "0"})
    assert ref.size == 64 * 10
    assert np.array_equal(ref, _embedded_logits(True, {}))
    assert np.array_equal(ref, _embedded_logits(False, {}))


def test_frozen_weight_is_final():
    from src.quant.layers import QuantDense
    cell = QuantDense(8, 4, w_bits=4, a_bits=4)
    cell.set_scale("w", [0.05])
    cell.set_quant(weight=True, act=True)
    w_fp = cell.weight.asnumpy().copy()
    cell.freeze_weight()
    assert cell.w_frozen
    codes = cell.weight.asnumpy() / 0.05
    assert np.allclose(codes, np.round(codes), atol=1e-4) and np.abs(np.round(codes)).max() <= 8
    with pytest.raises(RuntimeError, match="frozen"):
        cell.set_scale("w", [0.1])
    cell.set_quant(weight=False)
    assert np.array_equal(cell.weight.asnumpy(), w_fp)  # FP mode restores the FP weight


def test_kernels_switch_off(monkeypatch):
    monkeypatch.setenv("VTPTQ_CPU_KERNELS", "0")
    assert not kernels.enabled() and kernels.fake_quant_op() is None and kernels.gelu_op() is None


def _library_path_in(env):
    code = f"import sys; sys.path.insert(0, {ROOT!r}); from src import kernels; print(kernels.library_path())"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert p.returncode == 0, p.stderr
    return p.stdout.strip(), p.stderr


def test_kernel_cache_rebuilds_a_bad_file(tmp_path):
    cache = tmp_path / "cache"
    path, _ = _library_path_in({"VTPTQ_KERNEL_CACHE": str(cache)})
    assert os.path.dirname(path) == str(cache) and os.path.isfile(path)
    assert os.stat(cache).st_mode & 0o777 == 0o700 and os.stat(path).st_mode & 0o777 == 0o700
    index = cache / (kernels.library_name() + kernels.HASH_SUFFIX)
    assert os.stat(index).st_mode & 0o777 == 0o600
    assert _library_path_in({"VTPTQ_KERNEL_CACHE": str(cache)})[0] == path  # reused as it is
    with open(path, "r+b") as f:  # a truncated or foreign file where the library was
        f.write(b"not a library")
    again, _ = _library_path_in({"VTPTQ_KERNEL_CACHE": str(cache)})
    assert again != path and kernels._has_symbols(again)  # rebuilt under a new name
    assert sorted(os.listdir(cache)) == sorted([os.path.basename(again), index.name])  # nothing else left


def test_no_compiler_means_no_kernels(tmp_path):
    bare = tmp_path / "bin"
    bare.mkdir()
    os.symlink(sys.executable, bare / "python")
    path, err = _library_path_in({"VTPTQ_KERNEL_CACHE": str(tmp_path / "cache"), "CXX": "", "PATH": str(bare)})
    assert path == "None" and "no C++ compiler" in err


@pytest.mark.parametrize("c,n,h,t,ties", [(3, 2, 2, 7, False), (5, 2, 3, 17, True), (2, 1, 5, 40, False),
                                          (4, 3, 1, 33, True), (1, 1, 1, 2, True)])
def test_rank_hinge_kernel_bit_identical(c, n, h, t, ties, monkeypatch):
    """vtptq's all-pairs ranking loss through the compiled kernel (RankHingeAllPairs) and
    through numpy's passes: the same bits, ties of the FP scores and of the quantized scores
    included, row counts that do and do not fill the kernel's 16 lanes."""
    from src.quant.vtptq import _hinge_sums_kernel, ranking_loss_all_pairs
    rng = np.random.default_rng(t)
    fp = rng.standard_normal((n, h, t, t)).astype(np.float32)
    q = (fp[None] + 0.05 * rng.standard_normal((c, n, h, t, t))).astype(np.float32)
    if ties:
        fp = np.round(fp * 2) / 2
        q[..., ::3] = np.round(q[..., ::3] * 4) / 4
        q[..., 1, :] = 0.0
    order = np.zeros((n, h * t, t), np.int64)
    assert _hinge_sums_kernel(q.reshape(c, n, -1, t), order, fp.reshape(n, -1, t), 0.2) is not None  # the kernel ran
    got = ranking_loss_all_pairs(fp, q, 0.2)
    monkeypatch.setenv("VTPTQ_CPU_KERNELS", "0")
    ref = ranking_loss_all_pairs(fp, q, 0.2)
    assert got.shape == ref.shape == (c, n)
    assert got.tobytes() == ref.tobytes()


@pytest.mark.parametrize("c,n,h,t,num,chunk", [(5, 3, 2, 23, 40, None), (2, 4, 3, 9, 36, 64), (3, 2, 1, 5, 2, 1)])
def test_rank_hinge_pairs_kernel_bit_identical(c, n, h, t, num, chunk, monkeypatch):
    """vtptq's ranking loss over sampled pairs through the compiled kernel (RankHingePairs) and
    through numpy's gathers: the same bits, with ties, a NaN score and sample chunks."""
    from src.quant import vtptq
    if chunk:
        monkeypatch.setattr(vtptq, "ROW_CHUNK_ELEMS", chunk)
    rng = np.random.default_rng(num)
    fp = np.round(rng.standard_normal((n, h, t, t)) * 2).astype(np.float32) / 2
    q = (fp[None] + 0.05 * rng.standard_normal((c, n, h, t, t))).astype(np.float32)
    q[0, 0, 0, 0, 1] = np.nan
    pairs = vtptq.sample_pairs(t, num, seed=1)
    assert vtptq._pair_hinge_kernel() is not None  # the kernel runs
    got = vtptq.ranking_loss(fp, q, 0.2, pairs=pairs)
    monkeypatch.setenv("VTPTQ_CPU_KERNELS", "0")
    assert vtptq._pair_hinge_kernel() is None
    ref = vtptq.ranking_loss(fp, q, 0.2, pairs=pairs)
    assert got.shape == ref.shape == (c, n)
    assert got.tobytes() == ref.tobytes()


@pytest.mark.parametrize("x_shape,s_shape", [
    ((1, 3, 40, 96), (7, 1, 1, 1)),     # the search's input candidates: one interval per candidate
    ((40, 96), ()),                     # one interval
    ((1, 40, 96), (5, 40, 1)),          # per-channel weight candidates, (out, in) layout
    ((96, 40), (5, 1, 40)),             # per-channel weight candidates, transposed (b_right) layout
    ((2, 40, 96), (3, 2, 1, 1)),        # two candidate axes
    ((40, 96), (40, 96)),               # a scale per element
    ((1, 2, 40, 97), (3, 1, 1, 1)),     # a length that does not fill the 8 lanes
    ((1, 2, 40, 96), (3, 1, 40, 1)),    # a scale per row of every sample
    ((2, 40, 96), (2, 1, 96)),          # scales over two axes apart (numpy's path)
    ((40, 1), (3, 1, 96)),              # x broadcast along its own last axis (numpy's path)
])
@pytest.mark.parametrize("bits_,signed", [(8, True), (4, True), (4, False), (2, True), (16, False)])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's path on ±3e38
def test_fake_quant_candidates_kernel_bit_identical(x_shape, s_shape, bits_, signed, monkeypatch):
    """The interval search's fake quantizer (quantizer.fake_quant_np) through the compiled kernel
    (FakeQuantCandidates) and through numpy's passes: the same bits for every broadcast of the
    candidates' intervals, ties of round(), NaN, infinities, signed zeros and denormals."""
    from src.quant import quantizer
    monkeypatch.setattr(quantizer, "KERNEL_MIN_ELEMS", 1)
    rng = np.random.default_rng(len(x_shape) * 100 + bits_)
    step = 0.05
    x = hostile_values(rng, int(np.prod(x_shape)), step).reshape(x_shape)
    scale = (step * (0.5 + rng.random(s_shape))).astype(np.float32)
    if scale.ndim:
        scale.flat[0] = step  # exact ties at half a step
    layout = quantizer._fake_quant_layout(x.shape, np.shape(scale))
    ran = layout is not None and quantizer._fq_kernel() is not None
    assert ran == (s_shape not in ((2, 1, 96), (3, 1, 96)))
    got = quantizer.fake_quant_np(x, scale, bits_, signed)
    got64 = np.full(got.shape, 7.0)  # into a float64 buffer: the float32 results converted
    assert quantizer.fake_quant_np(x, scale, bits_, signed, out=got64) is got64
    monkeypatch.setenv("VTPTQ_CPU_KERNELS", "0")
    assert quantizer._fq_kernel() is None
    ref = quantizer.fake_quant_np(x, scale, bits_, signed)
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32
    assert got.tobytes() == ref.tobytes()
    assert got64.tobytes() == ref.astype(np.float64).tobytes()
    ref64 = np.full(got.shape, 7.0)
    assert quantizer.fake_quant_np(x, scale, bits_, signed, out=ref64).tobytes() == got64.tobytes()


@pytest.mark.parametrize("x_shape,c", [((1, 3, 40, 96), 7), ((2, 17, 128), 5), ((1, 1, 197, 20), 3), ((1, 4, 9, 8), 2)])
@pytest.mark.parametrize("bits_,signed", [(8, True), (4, False), (3, True)])
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # numpy's path on ±3e38
def test_fake_quant_row_sums_kernel_bit_identical(x_shape, c, bits_, signed, monkeypatch):
    """The input search's fake quantizer with its sums over tokens (quantizer.fake_quant_row_sums_np)
    through the compiled kernel (FakeQuantRowSums) and through numpy (fake_quant_np, then
    .sum(axis=-2, dtype=np.float64)): the same bits, NaN, infinities and signed zeros included,
    widths that do and do not fill the 8 lanes."""
    from src.quant import quantizer
    monkeypatch.setattr(quantizer, "KERNEL_MIN_ELEMS", 1)
    rng = np.random.default_rng(c)
    step = 0.05
    x = hostile_values(rng, int(np.prod(x_shape)), step).reshape(x_shape)
    x[..., 1, :3] = -0.0  # a column of negative zeros in some samples
    x[..., :, 5] = -0.0
    scale = (step * (0.5 + rng.random(c))).astype(np.float32).reshape((c,) + (1,) * len(x_shape))
    assert quantizer._row_sums_kernel() is not None
    got, got_sums = quantizer.fake_quant_row_sums_np(x, scale, bits_, signed)
    buf = np.empty(got.shape, np.float32)
    got2, _ = quantizer.fake_quant_row_sums_np(x, scale, bits_, signed, out=buf)
    assert got2 is buf
    monkeypatch.setenv("VTPTQ_CPU_KERNELS", "0")
    assert quantizer._row_sums_kernel() is None
    ref = quantizer.fake_quant_np(x, scale, bits_, signed)
    ref_sums = ref.sum(axis=-2, dtype=np.float64)
    assert got.shape == ref.shape and got_sums.shape == ref_sums.shape
    assert got.tobytes() == ref.tobytes() == buf.tobytes()
    assert got_sums.tobytes() == ref_sums.tobytes()
