"""Scaling of sharded calibration: quant.py in one process and under msrun with 2 workers,
one thread each (numpy/BLAS and MindSpore's CPU kernels), on the same config.

Prints the calibration seconds of each rank (`calib_seconds` of result.json: the
calibration, with the mixed-precision search when there is one), the speed-up, and checks
that the sharded run equals the single-process one: `calib_shards`, `calib_images_per_rank`,
the largest relative difference of any interval, and top-1. Writes OUT/summary.json.

    python bench/calib_scaling.py                         # vtptq W4A4, 64 calibration images, embedded
    python bench/calib_scaling.py --workers 2 --max-images 1000 -- --method easyquant --w-bits 8 --a-bits 8

Extra quant.py flags go after `--`. On a machine whose cores are busy with other work the
seconds are under load; the speed-up needs one free core per worker.
"""
import argparse
import glob
import json
import os
import socket
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER_ENV = "CALIB_SCALING_WORKER"  # set for the quant.py processes this script starts
THREAD_ENV = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def worker(argv):
    """quant.py with MindSpore's CPU kernels on one thread (BLAS: THREAD_ENV)."""
    sys.path.insert(0, REPO)
    os.chdir(REPO)
    from mindspore.device_context.cpu.op_tuning import threads_num
    threads_num(1)
    import quant
    return quant.cli(argv)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(workers, quant_args, out, log_dir):
    env = dict(os.environ, **THREAD_ENV,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    env[WORKER_ENV] = "1"
    entry = [os.path.abspath(__file__)] + quant_args + ["--output", out]
    if workers == 1:
        cmd = [sys.executable] + entry
    else:
        cmd = [sys.executable, "-m", "mindspore.parallel.cluster.run", f"--worker_num={workers}",
               f"--local_worker_num={workers}", f"--master_port={free_port()}", f"--log_dir={log_dir}",
               "--join=True"] + entry
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        logs = "".join(open(p, encoding="utf-8", errors="replace").read()
                       for p in sorted(glob.glob(os.path.join(log_dir, "worker_*.log"))))
        sys.exit(f"error: {workers}-worker run failed (exit {proc.returncode}):\n{(proc.stderr + logs)[-3000:]}")
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        return json.load(f), wall


def interval_rel_diff(a, b):
    worst = 0.0
    for name, layer in a["layers"].items():
        for op, info in layer.items():
            if isinstance(info, dict) and "scale" in info:
                x, y = info["scale"], b["layers"][name][op]["scale"]
                x, y = (x, y) if isinstance(x, list) else ([x], [y])
                for u, v in zip(x, y):
                    worst = max(worst, abs(u - v) / max(abs(u), 1e-30))
    return worst


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if os.environ.get(WORKER_ENV):
        return worker(argv)
    extra = []
    if "--" in argv:
        argv, extra = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", type=int, default=2, help="workers of the sharded run (default 2)")
    p.add_argument("--calib-num", type=int, default=64)
    p.add_argument("--max-images", type=int, default=None, help="evaluation images (default: all)")
    p.add_argument("--out", default="outputs/calib_scaling")
    args = p.parse_args(argv)
    quant_args = ["--method", "vtptq", "--w-bits", "4", "--a-bits", "4", "--calib-num", str(args.calib_num)]
    if args.max_images:
        quant_args += ["--max-images", str(args.max_images)]
    quant_args += extra
    out = os.path.abspath(args.out)
    one, wall1 = launch(1, quant_args, os.path.join(out, "w1"), os.path.join(out, "logs1"))
    many, wall2 = launch(args.workers, quant_args, os.path.join(out, f"w{args.workers}"),
                         os.path.join(out, f"logs{args.workers}"))
    per_rank = many["calib_seconds_per_rank"]
    summary = {"quant_args": quant_args, "workers": args.workers, "calib_seconds_1": one["calib_seconds"],
               f"calib_seconds_per_rank_{args.workers}": per_rank, "speedup": one["calib_seconds"] / max(per_rank),
               "wall_seconds_1": wall1, f"wall_seconds_{args.workers}": wall2,
               "calib_shards": many["calib_shards"], "calib_images_per_rank": many["calib_images_per_rank"],
               "interval_max_rel_diff": interval_rel_diff(one, many), "top1_1": one["top1"],
               f"top1_{args.workers}": many["top1"], "same_top1": one["top1"] == many["top1"],
               "calibration_rank_max_diff": many["calibration_rank_max_diff"]}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1)
    print(f"quant.py {' '.join(quant_args)}, one thread per worker")
    print(f"  1 worker : calibration {one['calib_seconds']:.1f} s, top-1 {one['top1']:.2f}")
    print(f"  {args.workers} workers: calibration " + ", ".join(f"rank {r} {s:.1f} s" for r, s in enumerate(per_rank))
          + f", top-1 {many['top1']:.2f}; speed-up {summary['speedup']:.2f}x")
    print(f"  calib_shards {many['calib_shards']}, calib_images_per_rank {many['calib_images_per_rank']}, "
          f"interval max relative difference {summary['interval_max_rel_diff']:.3g}, "
          f"same top-1: {summary['same_top1']}  -> {out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
