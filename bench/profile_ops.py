"""Per-operation profile of one GRAPH-mode forward pass: the FP model and the quantized model
that `eval.py --ckpt` builds (W8A8 minmax checkpoint, random weights), on the same batch.

MindSpore's Profiler records one forward pass after two warm-up passes; the time of each
operation type (summed over its launches), its share, and the wall time of the pass are
printed as a table per model. Each model is profiled in its own subprocess.

    python bench/profile_ops.py                          # deit_small_patch16_224, batch 32
    python bench/profile_ops.py --model deit_tiny_patch16_224 --batch-size 8 --json outputs/profile.json

Run it on an otherwise idle machine.
"""
import argparse
import csv
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GLOG_v", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def profile_one(what, model_name, batch, out_dir):
    """In this process: build the FP model (what == 'fp') or load the checkpoint `what`, time two
    passes, profile a third; {op type: [count, ms]} and the wall seconds of the timed passes."""
    import numpy as np
    import mindspore as ms
    from mindspore import Profiler
    from src.api import create_model, get_data_config
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    if what == "fp":
        model = create_model(model_name)
    else:
        from src.api import load_quantized_checkpoint
        model = load_quantized_checkpoint(what, model_name)[0]
    model.set_train(False)
    c, h, w = get_data_config(model_name)["input_size"]
    x = ms.Tensor(np.random.default_rng(0).standard_normal((batch, c, h, w)).astype(np.float32))
    model(x).asnumpy()
    walls = []
    for _ in range(2):
        t0 = time.perf_counter()
        model(x).asnumpy()
        walls.append(time.perf_counter() - t0)
    prof = Profiler(output_path=out_dir)
    model(x).asnumpy()
    prof.analyse()
    ops = {}
    for path in glob.glob(os.path.join(out_dir, "**", "cpu_op_detail_info_*.csv"), recursive=True):
        with open(path) as f:
            for row in csv.DictReader(f):
                key = op_kind(row["op_type"], row["full_op_name"])
                count, ms_ = ops.get(key, [0, 0.0])
                ops[key] = [count + int(row["op_occurrences"]), ms_ + float(row["op_total_time(ms)"])]
    return {"ops": ops, "wall_seconds": walls}


def op_kind(op_type, full_name):
    """The operation type; the fused kernels of src/kernels (all 'Custom') by their scope."""
    if op_type != "Custom":
        return op_type
    if "GELU" in full_name:
        return "Custom: GELU (fused)"
    if "Quant" in full_name:
        return "Custom: fake quantizer (fused)"
    return "Custom: Q, K, V split, heads transposition (fused)"


def make_checkpoint(model_name, path):
    from bench.eval_memory import make_checkpoint as make
    make(model_name, path)


def print_table(title, prof):
    ops = sorted(prof["ops"].items(), key=lambda kv: -kv[1][1])
    total = sum(v[1] for _, v in ops) or 1.0
    print(f"\n{title}: wall {min(prof['wall_seconds']):.2f} s per pass (best of 2), operations {total / 1000:.2f} s")
    print("| operation | launches | ms | share |")
    print("|---|---|---|---|")
    for name, (count, ms_) in ops:
        if ms_ >= 0.5:
            print(f"| {name} | {count} | {ms_:.0f} | {100 * ms_ / total:.1f}% |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224", help="registered model (random weights) "
                                                                       "(default deit_small_patch16_224)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", metavar="FILE", help="also write the profiles to FILE")
    p.add_argument("--child", nargs=2, metavar=("WHAT", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as tmp:
            prof = profile_one(args.child[0], args.model, args.batch_size, tmp)
        with open(args.child[1], "w") as f:
            json.dump(prof, f)
        return prof
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size is {args.batch_size}; expected a positive number")
    from src.api import list_models
    if args.model not in list_models():
        sys.exit(f"error: unknown model '{args.model}' (known: {', '.join(list_models())})")
    print(f"profile_ops: {args.model}, batch {args.batch_size}, GRAPH mode, load average {os.getloadavg()[0]:.2f}",
          flush=True)
    result = {"model": args.model, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = os.path.join(tmp, "quantized.ckpt")
        make_checkpoint(args.model, ckpt)
        for key, what in (("fp", "fp"), ("quantized", ckpt)):
            out = os.path.join(tmp, f"{key}.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--model", args.model, "--batch-size",
                            str(args.batch_size), "--child", what, out], check=True, cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(out) as f:
                result[key] = json.load(f)
    print_table(f"FP {args.model}", result["fp"])
    print_table("quantized W8A8 checkpoint (as eval.py --ckpt loads it)", result["quantized"])
    result["load_average"] = os.getloadavg()[0]
    print(f"\nload average at the end: {result['load_average']:.2f}")
    if args.json:
        from src.api import write_bench_json
        write_bench_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
