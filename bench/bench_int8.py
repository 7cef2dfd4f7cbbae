"""Real integer inference: onnxruntime int8 against onnxruntime FP32, in one process.

One model (default deit_small_patch16_224, random weights), quantized W8A8 (`--bits`) and calibrated
with minmax on a few random images, is exported twice with src.export.onnx.export_onnx:
the QDQ graph (int8) and the plain float graph of the same weights (quantized=False). Both
run in onnxruntime (CPU, ORT_ENABLE_ALL, `--threads` intra-op threads) on the same batch,
timed alternately; the median images/second of each and their ratio (int8 / FP32; the
target is >= 1.5x) are reported, with MindSpore's FP and fake-quantized GRAPH-mode
images/second, timed in the same rounds, and their ratios (MindSpore FP / onnxruntime FP32,
target >= 0.6x; fake-quant / MindSpore FP, target >= 0.9x; `--skip-mindspore` skips them).
The fake-quantized model is the one `eval.py --ckpt quantized.ckpt` builds: saved with
save_quantized_checkpoint and loaded (weights frozen). onnxruntime's optimized int8
graph is inspected: every quantized product must have become an integer kernel
(MatMulIntegerToFloat, QLinearMatMul, ...); the count is printed.

    python bench/bench_int8.py                               # deit_small, batch 32, 2 threads
    python bench/bench_int8.py --per-channel --skip-mindspore
    python bench/bench_int8.py --json outputs/bench_int8.json --keep-dir outputs/onnx

Needs onnx and onnxruntime (requirements-dev.txt). Run it on an otherwise idle machine: the
load average is printed with the figures.
"""
import argparse
import collections
import io
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import src  # noqa: E402,F401  (before numpy: its OpenBLAS settings, src/__init__.py)
import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

from src.api import (calibrate_model, create_model, default_checkpoint, defaults, evaluation_model,  # noqa: E402
                     export_onnx, get_data_config, list_models, quant_cells, quantize_model, set_quant_mode,
                     write_bench_json)

TARGET_RATIO = 1.5
TARGET_MS_FP = 0.6  # MindSpore FP GRAPH / onnxruntime FP32 (issue #12)
TARGET_MS_FAKE_QUANT = 0.9  # MindSpore fake-quant W8A8 / MindSpore FP (issue #12)
INTEGER_OPS = ("MatMulIntegerToFloat", "QLinearMatMul", "MatMulInteger", "QGemm", "DynamicQuantizeMatMul",
               "QAttention")
FLOAT_PRODUCTS = ("MatMul", "FusedMatMul", "Gemm")


def session(path, threads, optimized_path=None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3  # no warning about serializing the optimized model
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def op_census(path):
    import onnx
    return collections.Counter(n.op_type for n in onnx.load(path).graph.node)


def timed_rate(fn, batch, iters):
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return iters * batch / (time.perf_counter() - start)


def alternate(fns, batch, iters, warmup, repeats):
    """Warm each callable up, then time them in turn `repeats` times; median images/s of each
    and the warm-up seconds (graph compile / session first run)."""
    warm = {}
    for key, fn in fns.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            fn()
        warm[key] = time.perf_counter() - t0
    rates = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            rates[key].append(timed_rate(fn, batch, iters))
    return {key: statistics.median(r) for key, r in rates.items()}, rates, warm


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224",
                   help="registered model (random weights unless the repository carries a checkpoint) "
                        "(default deit_small_patch16_224)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default 2)")
    p.add_argument("--iters", type=int, default=3, help="timed forward passes per repeat (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed passes per runtime (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timing rounds (default 3)")
    p.add_argument("--calib-num", type=int, default=8, help="random calibration images (default 8)")
    p.add_argument("--bits", type=int, default=8, choices=range(2, 9), metavar="B",
                   help="weight and activation bits (default 8: uint8 x uint8 kernels; at most 6: uint8 x int8)")
    p.add_argument("--per-channel", action="store_true", help="per-output-channel weight intervals")
    p.add_argument("--skip-mindspore", action="store_true", help="skip the MindSpore GRAPH-mode reference")
    p.add_argument("--keep-dir", metavar="DIR", help="keep the .onnx files (and onnxruntime's optimized int8 "
                                                     "graph) in DIR instead of a temporary folder")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    return p


def check_args(args):
    """Exit with a one-line error for an unknown model or a non-positive count; returns onnxruntime."""
    if args.model not in list_models():
        sys.exit(f"error: unknown model '{args.model}' (known: {', '.join(list_models())})")
    for flag in ("batch_size", "threads", "iters", "repeats", "calib_num"):
        if getattr(args, flag) < 1:
            sys.exit(f"error: --{flag.replace('_', '-')} is {getattr(args, flag)}; expected a positive number")
    try:
        import onnxruntime as ort
    except ImportError:
        sys.exit("error: bench_int8 needs onnxruntime and onnx (pip install -r requirements-dev.txt)")
    return ort


def quantized_pair(args):
    """(FP model, the same weights quantized WbAb and calibrated with minmax on a few random
    images, the timed batch)."""
    c, h, w = get_data_config(args.model)["input_size"]
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((args.calib_num, c, h, w)).astype(np.float32)
    x = rng.standard_normal((args.batch_size, c, h, w)).astype(np.float32)
    cfg = defaults()
    cfg.update(model=args.model, method="minmax", w_bits=args.bits, a_bits=args.bits, calib_num=args.calib_num,
               calib_batch_size=args.calib_num, weight_per_channel=args.per_channel)
    fp = create_model(args.model, checkpoint=default_checkpoint(args.model))
    model = create_model(args.model)
    fp_params = dict(fp.parameters_and_names())
    for name, p in model.parameters_and_names():  # the same (random) weights in both
        p.set_data(ms.Tensor(fp_params[name].asnumpy()))
    quantize_model(model, cfg)
    t0 = time.perf_counter()
    calibrate_model(model, calib, cfg, log=io.StringIO())
    print(f"calibrated {len(quant_cells(model))} layers on {args.calib_num} images in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    set_quant_mode(model, "quantized")
    return fp, model, x


def export_both(model, args, out_dir):
    """The int8 QDQ and FP32 ONNX graphs of `model` in out_dir, an onnxruntime session of each,
    and what the int8 graph became: {paths, sessions, kernels (class -> count), census (op ->
    count of the optimized graph), integer, float (product counts)}."""
    paths = {k: os.path.join(out_dir, f"{args.model}_{k}.onnx") for k in ("fp32", "int8")}
    proto = export_onnx(model, paths["int8"])
    kernels = collections.Counter(v["kernel"] for v in json.loads(
        {m.key: m.value for m in proto.metadata_props}["integer_products"]).values())
    export_onnx(model, paths["fp32"], quantized=False)
    opt_path = os.path.join(out_dir, f"{args.model}_int8.optimized.onnx")
    sessions = {"fp32": session(paths["fp32"], args.threads), "int8": session(paths["int8"], args.threads, opt_path)}
    census = op_census(opt_path)
    return dict(paths=paths, sessions=sessions, kernels=kernels, census=census,
                integer=sum(census[op] for op in INTEGER_OPS), float=sum(census[op] for op in FLOAT_PRODUCTS))


def mindspore_figures(rate, rates, warm, ort_out, ort_rate, fp, ms_model, t):
    """The MindSpore part of the result: rates and ratios, and the agreement of the fake-quantized
    model's logits with onnxruntime's int8 ones."""
    ms_rate = {k: rate[f"ms_{k}"] for k in ("fp", "fake_quant")}
    fq, fp_out = ms_model(t).asnumpy(), fp(t).asnumpy()
    diff = np.abs(ort_out["int8"] - fq)
    top2 = np.sort(fq, axis=1)[:, -2:]
    flipped = ort_out["int8"].argmax(1) != fq.argmax(1)
    return dict(logit_scale=float(np.abs(fq).max()),
                fp32_vs_ms_fp_max_abs_diff=float(np.abs(ort_out["fp32"] - fp_out).max()),
                ms_fp_images_per_second=ms_rate["fp"], ms_fake_quant_images_per_second=ms_rate["fake_quant"],
                ms_rates={k: rates[f"ms_{k}"] for k in ("fp", "fake_quant")},
                ms_warmup_seconds={k: warm[f"ms_{k}"] for k in ("fp", "fake_quant")},
                ms_fp_vs_ort_fp32=ms_rate["fp"] / ort_rate["fp32"],
                ms_fake_quant_vs_ms_fp=ms_rate["fake_quant"] / ms_rate["fp"],
                int8_vs_fake_quant_max_abs_diff=float(diff.max()),
                # the fake-quant top-1 - top-2 logit gap of the images whose top-1 differs
                flipped_top1_margin_max=float((top2[:, 1] - top2[:, 0])[flipped].max()) if flipped.any() else None,
                median_top1_margin=float(np.median(top2[:, 1] - top2[:, 0])),
                int8_vs_fake_quant_top1_agreement=float((ort_out["int8"].argmax(1) == fq.argmax(1)).mean()))


def print_report(result, args, ort):
    n_int, n_quant = result["integer_products"], result["quant_layers"]
    print()
    print("| runtime | graph | images/s |")
    print("|---|---|---|")
    print(f"| onnxruntime {ort.__version__} ({args.threads} threads) | FP32 | "
          f"{result['ort_fp32_images_per_second']:.1f} |")
    print(f"| onnxruntime {ort.__version__} ({args.threads} threads) | int8 QDQ (W{args.bits}A{args.bits}"
          f"{', per-channel' if args.per_channel else ''}) | {result['ort_int8_images_per_second']:.1f} |")
    if not args.skip_mindspore:
        print(f"| MindSpore {ms.__version__} GRAPH | FP32 | {result['ms_fp_images_per_second']:.1f} |")
        print(f"| MindSpore {ms.__version__} GRAPH | fake-quant W{args.bits}A{args.bits} | {result['ms_fake_quant_images_per_second']:.1f} |")
    ok = "ok" if result["ratio"] >= TARGET_RATIO else "BELOW"
    print(f"\n{args.model}, batch {args.batch_size}: onnxruntime int8 / FP32 = {result['ratio']:.2f}x "
          f"(target >= {TARGET_RATIO}x: {ok}); {n_int}/{n_quant} quantized products run as integer kernels")
    if not args.skip_mindspore:
        ok_fp = "ok" if result["ms_fp_vs_ort_fp32"] >= TARGET_MS_FP else "BELOW"
        ok_fq = "ok" if result["ms_fake_quant_vs_ms_fp"] >= TARGET_MS_FAKE_QUANT else "BELOW"
        print(f"MindSpore FP / onnxruntime FP32 = {result['ms_fp_vs_ort_fp32']:.2f}x (target >= {TARGET_MS_FP}x: "
              f"{ok_fp}); MindSpore fake-quant W{args.bits}A{args.bits} / MindSpore FP = {result['ms_fake_quant_vs_ms_fp']:.2f}x "
              f"(target >= {TARGET_MS_FAKE_QUANT}x: {ok_fq})")
        print(f"onnxruntime int8 vs MindSpore fake-quant on this batch: top-1 agreement "
              f"{100 * result['int8_vs_fake_quant_top1_agreement']:.1f}%, max |logit diff| "
              f"{result['int8_vs_fake_quant_max_abs_diff']:.3g} (largest |logit| {result['logit_scale']:.3g}; "
              f"top-1/top-2 gap: median {result['median_top1_margin']:.3g}"
              + (f", at most {result['flipped_top1_margin_max']:.3g} where the top-1 differs"
                 if result["flipped_top1_margin_max"] is not None else "") + "); "
              f"onnxruntime FP32 vs MindSpore FP: max |logit diff| {result['fp32_vs_ms_fp_max_abs_diff']:.3g}")
    print(f"load average at the end: {result['load_average']:.2f}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    ort = check_args(args)
    ms.set_device("CPU")
    ms.set_seed(0)
    print(f"bench_int8: mindspore {ms.__version__}, onnxruntime {ort.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    fp, model, x = quantized_pair(args)
    # MindSpore's fake-quant model: the one `eval.py --ckpt quantized.ckpt` builds (weights frozen)
    ms_model = None if args.skip_mindspore else evaluation_model(model, args.model)

    tmp = None if args.keep_dir else tempfile.TemporaryDirectory()
    out_dir = args.keep_dir or tmp.name
    os.makedirs(out_dir, exist_ok=True)
    onnx_ = export_both(model, args, out_dir)
    sessions, census, n_int, n_float = onnx_["sessions"], onnx_["census"], onnx_["integer"], onnx_["float"]
    n_quant = len(quant_cells(model))
    print(f"optimized int8 graph: {n_int} integer products ({', '.join(f'{census[op]} {op}' for op in INTEGER_OPS if census[op])}) "
          f"for {n_quant} quantized layers, {n_float} float products left; kernel classes {dict(onnx_['kernels'])}",
          flush=True)

    feeds = {"input": x}
    fns = {f"ort_{k}": (lambda s=s: s.run(None, feeds)) for k, s in sessions.items()}
    if not args.skip_mindspore:  # timed in the same rounds as onnxruntime, so each ratio is from one run
        ms.set_context(mode=ms.GRAPH_MODE)
        fp.set_train(False)
        ms_model.set_train(False)
        t = ms.Tensor(x)
        fns.update(ms_fp=lambda: fp(t).asnumpy(), ms_fake_quant=lambda: ms_model(t).asnumpy())
    rate, rates, warm = alternate(fns, args.batch_size, args.iters, max(args.warmup, 1), args.repeats)
    ort_rate = {k: rate[f"ort_{k}"] for k in sessions}
    ort_out = {k: s.run(None, feeds)[0] for k, s in sessions.items()}
    result = {"model": args.model, "batch_size": args.batch_size, "threads": args.threads, "iters": args.iters,
              "repeats": args.repeats, "bits": args.bits, "per_channel": args.per_channel,
              "kernel_classes": dict(onnx_["kernels"]), "onnxruntime": ort.__version__,
              "mindspore": ms.__version__, "cpu_count": os.cpu_count(), "quant_layers": n_quant,
              "integer_products": n_int, "float_products_left": n_float, "int8_graph_ops": dict(census),
              "ort_fp32_images_per_second": ort_rate["fp32"], "ort_int8_images_per_second": ort_rate["int8"],
              "ratio": ort_rate["int8"] / ort_rate["fp32"], "ort_rates": {k: rates[f"ort_{k}"] for k in sessions},
              "ort_warmup_seconds": {k: warm[f"ort_{k}"] for k in sessions},
              "file_mb": {k: os.path.getsize(p) / 1e6 for k, p in onnx_["paths"].items()}}
    if not args.skip_mindspore:
        result.update(mindspore_figures(rate, rates, warm, ort_out, ort_rate, fp, ms_model, t))
    result["load_average"] = os.getloadavg()[0]
    print_report(result, args, ort)
    if args.json:
        write_bench_json(args.json, result)
    if tmp is not None:
        tmp.cleanup()
    return result


if __name__ == "__main__":
    main()
