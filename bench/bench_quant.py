"""Cost of fake quantization, in one process:

(a) images/second of the full-precision model and of a fake-quantized instance with the same
    weights (W8A8, calibrated with minmax on a few images, saved and loaded as `eval.py --ckpt`
    loads it), both in GRAPH mode on the same batch, and their ratio (quantized / FP; the target
    of issue #12 is >= 0.9x);
(b) calibration seconds of each method of src.quant.METHODS (`--skip-calib` skips it):
    deit_fmnist on `--calib-num` embedded calibration images, an ImageNet model (random
    weights) on `--calib-num` random 3x224x224 images.

The peak resident memory of the process (ru_maxrss) is printed at the end.

    python bench/bench_quant.py                                   # deit_fmnist @100, deit_small @32
    python bench/bench_quant.py --models deit_fmnist --methods minmax --iters 2
    python bench/bench_quant.py --skip-calib --json outputs/bench_quant.json

Defaults: deit_fmnist (embedded checkpoint) at batch 100 and deit_small_patch16_224 (random
weights) at batch 32; `--batch-size` overrides both. Run it on an otherwise idle machine.
"""
import argparse
import io
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import src  # noqa: E402,F401  (before numpy: its OpenBLAS settings, src/__init__.py)
import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

from src.api import (METHODS, calibrate_model, create_model, default_checkpoint, defaults,  # noqa: E402
                     evaluation_model, get_data_config, list_models, load_calibration_images, load_embedded,
                     normalize, quant_cells, quantize_model, set_quant_mode, write_bench_json)

DEFAULT_MODELS = ("deit_fmnist", "deit_small_patch16_224")
DEFAULT_BATCH = {"deit_fmnist": 100, "deit_small_patch16_224": 32}
SPEED_CALIB_NUM = 8  # images of the minmax calibration of the throughput model
TARGET_RATIO = 0.9


def csv_list(text):
    return [s for s in (t.strip() for t in text.split(",")) if s]


def build_fp(name):
    """The model with the embedded checkpoint where the repository has one, else random weights."""
    return create_model(name, checkpoint=default_checkpoint(name))


RANKING_PAIRS = 0  # set from --ranking-pairs


def bench_cfg(name, method, calib_num, bits=8):
    cfg = defaults()
    cfg.update(model=name, method=method, w_bits=bits, a_bits=bits, calib_num=calib_num, ranking_pairs=RANKING_PAIRS)
    if get_data_config(name)["dataset"] == "fmnist":  # a small model: larger calibration batches, fewer op calls
        cfg["calib_batch_size"] = 256
    return cfg


def calibration_images(name, num, seed=0):
    """Embedded calibration images for the Fashion-MNIST model, random normal images otherwise."""
    data_cfg = get_data_config(name)
    if data_cfg["dataset"] == "fmnist":
        return load_calibration_images(bench_cfg(name, "minmax", num), data_cfg)
    c, h, w = data_cfg["input_size"]
    return np.random.default_rng(seed).standard_normal((num, c, h, w)).astype(np.float32)


def bench_batch(name, batch):
    """The timed input: the first embedded test images for the Fashion-MNIST model (so that the
    FP / quantized top-1 agreement means something), random normal images otherwise."""
    data_cfg = get_data_config(name)
    if data_cfg["dataset"] == "fmnist":
        images, _ = load_embedded("test")
        idx = np.arange(batch) % len(images)
        return normalize(images[idx], data_cfg["mean"], data_cfg["std"])
    c, h, w = data_cfg["input_size"]
    return np.random.default_rng(1).standard_normal((batch, c, h, w)).astype(np.float32)


def quantized_model(name, method, images, bits=8, log=None, weights_of=None):
    """A fresh instance of `name`, fake-quantized at W{bits}A{bits} and calibrated with `method`
    on `images`, in quantized mode. weights_of: a model whose weights it takes (the FP model of
    a comparison; random weights differ between instances). Returns (model, calibration seconds)."""
    cfg = bench_cfg(name, method, len(images), bits)
    model = build_fp(name)
    if weights_of is not None:
        copy_weights(weights_of, model)
    quantize_model(model, cfg)
    t0 = time.perf_counter()
    calibrate_model(model, images, cfg, log=log if log is not None else io.StringIO())
    seconds = time.perf_counter() - t0
    set_quant_mode(model, "quantized")
    return model, seconds


def copy_weights(src, dst):
    params = dict(src.parameters_and_names())
    for name, p in dst.parameters_and_names():
        p.set_data(ms.Tensor(params[name].asnumpy()))


def timed_rate(model, t, iters):
    start = time.perf_counter()
    for _ in range(iters):
        model(t).asnumpy()
    return iters * t.shape[0] / (time.perf_counter() - start)


def bench_speed(name, batch, iters, warmup, repeats, log):
    """images/s of FP and fake-quantized W8A8 in GRAPH mode on the same batch, the same weights.
    The quantized model is the one `eval.py --ckpt` builds from its checkpoint (weights frozen).
    The two models are timed alternately, `repeats` times; the median of each is reported."""
    ms.set_context(mode=ms.GRAPH_MODE)
    t = ms.Tensor(bench_batch(name, batch))
    fp = build_fp(name)
    fp.set_train(False)
    qm, _ = quantized_model(name, "minmax", calibration_images(name, SPEED_CALIB_NUM), log=log, weights_of=fp)
    qm = evaluation_model(qm, name)
    ms.set_context(mode=ms.GRAPH_MODE)  # calibrate_model restores it; kept explicit
    qm.set_train(False)
    n_quant = len(quant_cells(qm))
    compile_s = {}
    for key, m in (("fp", fp), ("quant", qm)):
        t0 = time.perf_counter()
        for _ in range(warmup):
            m(t).asnumpy()
        compile_s[key] = time.perf_counter() - t0
    rates = {"fp": [], "quant": []}
    for _ in range(repeats):
        rates["fp"].append(timed_rate(fp, t, iters))
        rates["quant"].append(timed_rate(qm, t, iters))
    fp_out, q_out = fp(t).asnumpy(), qm(t).asnumpy()
    agree = float((fp_out.argmax(1) == q_out.argmax(1)).mean())
    fp_rate, q_rate = statistics.median(rates["fp"]), statistics.median(rates["quant"])
    return {"model": name, "checkpoint": default_checkpoint(name), "batch_size": batch, "iters": iters,
            "repeats": repeats, "quant_layers": n_quant,
            "fp_images_per_second": fp_rate, "quant_images_per_second": q_rate, "ratio": q_rate / fp_rate,
            "fp_rates": rates["fp"], "quant_rates": rates["quant"], "warmup_seconds": compile_s,
            "top1_agreement": agree}


def bench_calib(name, methods, calib_num, log):
    images = calibration_images(name, calib_num)
    out = []
    for method in methods:
        _, seconds = quantized_model(name, method, images, log=log)
        out.append({"model": name, "method": method, "calib_num": calib_num, "seconds": seconds})
        print(f"  calibration {name} {method:10s} {calib_num} images: {seconds:8.2f} s", flush=True)
    return out


def peak_rss_mb():
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == "darwin" else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=csv_list, default=list(DEFAULT_MODELS),
                   help=f"comma-separated model names (default {','.join(DEFAULT_MODELS)})")
    p.add_argument("--batch-size", type=int, default=None,
                   help="batch of the throughput runs (default 100 for deit_fmnist, 32 otherwise)")
    p.add_argument("--iters", type=int, default=5, help="timed forward passes per repeat (default 5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed passes (graph compile) (default 2)")
    p.add_argument("--repeats", type=int, default=3, help="alternating FP/quant timing rounds (default 3)")
    p.add_argument("--skip-speed", action="store_true", help="skip the throughput part (a)")
    p.add_argument("--skip-calib", action="store_true", help="skip the calibration part (b)")
    p.add_argument("--methods", type=csv_list, default=list(METHODS),
                   help=f"comma-separated calibration methods (default {','.join(METHODS)})")
    p.add_argument("--calib-num", type=int, default=32, help="calibration images of part (b) (default 32)")
    p.add_argument("--ranking-pairs", type=int, default=0,
                   help="vtptq: column pairs per attention row in the ranking loss (0: all; default 0)")
    p.add_argument("--device-target", default="CPU", choices=("CPU", "GPU", "Ascend"))
    p.add_argument("--verbose", action="store_true", help="show the per-layer calibration log")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    return p


def main(argv=None):
    global RANKING_PAIRS
    args = build_parser().parse_args(argv)
    RANKING_PAIRS = args.ranking_pairs
    known = set(list_models())
    for name in args.models:
        if name not in known:
            sys.exit(f"error: unknown model '{name}' (known: {', '.join(sorted(known))})")
    for method in args.methods:
        if method not in METHODS:
            sys.exit(f"error: unknown method '{method}' (known: {', '.join(METHODS)})")
    for flag in ("batch_size", "iters", "warmup", "repeats", "calib_num"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "warmup" else 1):
            sys.exit(f"error: --{flag.replace('_', '-')} is {value}; expected a positive number")
    ms.set_device(args.device_target)
    ms.set_seed(0)
    log = sys.stderr if args.verbose else None
    threads = os.cpu_count()
    print(f"bench_quant: mindspore {ms.__version__}, {args.device_target}, {threads} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    result = {"device_target": args.device_target, "mindspore": ms.__version__, "cpu_count": threads,
              "speed": [], "calibration": []}

    if not args.skip_speed:
        print("(a) throughput, GRAPH mode, fake-quantized W8A8 (minmax) vs full precision", flush=True)
        for name in args.models:
            batch = args.batch_size or DEFAULT_BATCH.get(name, 32)
            r = bench_speed(name, batch, args.iters, args.warmup, args.repeats, log)
            result["speed"].append(r)
            weights = "embedded checkpoint" if r["checkpoint"] else "random weights"
            print(f"  {name} ({weights}) batch {batch}: FP {r['fp_images_per_second']:.1f} img/s, "
                  f"W8A8 {r['quant_images_per_second']:.1f} img/s ({r['quant_layers']} quantized layers), "
                  f"FP/W8A8 top-1 agreement {100 * r['top1_agreement']:.0f}%", flush=True)

    if not args.skip_calib:
        print(f"(b) calibration time, W8A8, {args.calib_num} images, PYNATIVE mode", flush=True)
        for name in args.models:
            result["calibration"].extend(bench_calib(name, args.methods, args.calib_num, log))

    result["peak_rss_mb"] = peak_rss_mb()
    print()
    if result["speed"]:
        print("| model | batch | FP img/s | W8A8 img/s | W8A8 / FP | target |")
        print("|---|---|---|---|---|---|")
        for r in result["speed"]:
            ok = "ok" if r["ratio"] >= TARGET_RATIO else "BELOW"
            print(f"| {r['model']} | {r['batch_size']} | {r['fp_images_per_second']:.1f} | "
                  f"{r['quant_images_per_second']:.1f} | {r['ratio']:.2f}x | >= {TARGET_RATIO}x {ok} |")
        print()
    if result["calibration"]:
        print("| model | method | calib images | seconds |")
        print("|---|---|---|---|")
        for r in result["calibration"]:
            print(f"| {r['model']} | {r['method']} | {r['calib_num']} | {r['seconds']:.2f} |")
        print()
    print(f"peak resident memory: {result['peak_rss_mb']:.0f} MB (ru_maxrss)")
    if args.json:
        write_bench_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
