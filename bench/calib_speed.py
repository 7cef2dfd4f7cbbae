"""Time a DeiT-S calibration (vtptq by default) as bench_quant.py's calibration part runs it
(random weights, random images), over the first `--stages` stages (1: the patch embedding,
2: and block 0, ...; 0: all), and extrapolate to the whole model: every block stage has the
same shapes, so whole = embedding + 12 x the mean block (+ the head, not quantized by
default). `--save FILE` writes every interval and bias correction (npz); `--compare FILE`
checks that they are bit for bit those of a saved run (e.g. of another checkout, `--root`).

    python bench/calib_speed.py --stages 2 --ranking-pairs 256 --verbose
    python bench/calib_speed.py --stages 2 --ranking-pairs 256 --root /path/to/old/checkout --save old.npz
    python bench/calib_speed.py --stages 2 --ranking-pairs 256 --compare old.npz
    python bench/calib_speed.py --stages 0 --ranking-pairs 256 --json deit_s_vtptq_w8a8.json   # a whole run

`--json FILE` writes, per timed run: the settings, wall seconds, CPU seconds of the process
(user + system, all threads) during the calibration, and the process's peak resident memory.
"""
import argparse
import io
import os
import resource
import sys
import time


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--method", default="vtptq")
    p.add_argument("--stages", type=int, default=2, help="stages to calibrate (0: all; default 2)")
    p.add_argument("--calib-num", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--ranking-pairs", type=int, default=256, help="vtptq ranking pairs per row (0: all; default 256)")
    p.add_argument("--bits", type=int, default=8, help="weight and activation bits (default 8, as bench_quant)")
    p.add_argument("--root", default=None, help="checkout whose src/ and bench/ to run (default this one)")
    p.add_argument("--save", metavar="FILE", help="write the intervals and bias corrections (npz)")
    p.add_argument("--compare", metavar="FILE", help="compare them bit for bit with a saved run")
    p.add_argument("--threads", default="0",
                   help="calib_threads of the search, comma-separated to time each in turn in this process "
                        "(e.g. 1,0: one thread, then one per core; the ratio and the bit-identity of their "
                        "intervals are printed; default 0)")
    p.add_argument("--json", metavar="FILE", help="write settings, wall and CPU seconds and peak memory of each run")
    p.add_argument("--verbose", action="store_true", help="per-layer calibration log")
    return p.parse_args(argv)


def main(argv=None):
    args = parse(argv)
    root = os.path.abspath(args.root or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.path[:0] = [root, os.path.join(root, "bench")]
    os.environ.setdefault("GLOG_v", "3")
    import src  # noqa: F401  (the checkout's package first: its settings made before numpy loads)
    import numpy as np
    import bench_quant

    bench_quant.RANKING_PAIRS = args.ranking_pairs
    images = bench_quant.calibration_images(args.model, args.calib_num)
    cfg = bench_quant.bench_cfg(args.model, args.method, len(images), args.bits)
    threads = [int(t) for t in args.threads.split(",")]
    runs = [calibrate_once(args, cfg, images, root, t) for t in threads]
    scales = runs[0][1]
    if len(runs) > 1:
        first = runs[0]
        for (secs, other, t, _), t_label in zip(runs[1:], threads[1:]):
            same = scales.keys() == other.keys() and all(scales[k].tobytes() == other[k].tobytes() for k in scales)
            print(f"  calib_threads {threads[0]} / calib_threads {t_label} ({t} thread{'s' if t > 1 else ''}): "
                  f"{first[0]:.1f} s / "
                  f"{secs:.1f} s = {first[0] / secs:.2f}x; intervals and bias corrections "
                  + ("bit-identical" if same else "DIFFERENT") + f" ({len(scales)} arrays)")
    if args.json:
        write_json(args.json, {"runs": [r[3] for r in runs]})
    if args.save:
        np.savez(args.save, **scales)
    if args.compare:
        ref = np.load(args.compare)
        bad = sorted(k for k in set(ref.files) | set(scales)
                     if k not in ref.files or k not in scales or ref[k].tobytes() != scales[k].tobytes())
        print(f"  intervals and bias corrections vs {args.compare}: "
              + ("bit-identical" if not bad else f"DIFFERENT: {', '.join(bad)}") + f" ({len(scales)} arrays)")
        return 1 if bad else 0
    return 0


def calibrate_once(args, cfg, images, root, threads):
    """Calibrate a fresh model (the same random weights every time) with calib_threads
    `threads`; print the times. Returns (seconds, {array name: interval or bias correction},
    the number of search threads used)."""
    import numpy as np
    import mindspore as ms
    import bench_quant
    import src.api as api
    from src.api import calibrate_model, model_stages, quant_cells, quantize_model
    cfg = dict(cfg, calib_threads=threads)
    ms.set_seed(0)  # the same random weights in every run (and checkout)
    np.random.seed(0)
    model = bench_quant.build_fp(args.model)
    quantize_model(model, cfg)
    log = sys.stdout if args.verbose else io.StringIO()
    t0, cpu0 = time.perf_counter(), time.process_time()
    report = calibrate_model(model, images, cfg, log=log, stages=args.stages or None)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    stage_names = [name for name, _, _ in model_stages(model)]
    blocks = [s for s in stage_names if s.startswith("blocks.")]
    def stage_of(layer):
        return "embed" if layer.startswith("patch_embed") else ".".join(layer.split(".")[:2])
    per_stage = {s: sum(info["seconds"] for layer, info in report.items() if stage_of(layer) == s)
                 for s in stage_names}
    done = [s for s in blocks if any(k.startswith(s + ".") for k in report)]
    used = api.set_search_threads(threads) if hasattr(api, "set_search_threads") else 1  # a checkout before threads
    print(f"{args.model} {args.method} W{args.bits}A{args.bits}, {len(images)} images, ranking_pairs "
          f"{args.ranking_pairs}, calib_threads {threads} ({used} thread{'s' if used > 1 else ''}), code {root}: "
          f"{seconds:.1f} s for {len(set(stage_names[:args.stages or None]))} "
          f"stages (load average {os.getloadavg()[0]:.2f}; peak resident memory "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GB)")
    if not args.stages:
        print(f"  the whole model, measured: {seconds:.1f} s ({seconds / 60:.1f} min)")
    elif done:
        mean_block = sum(per_stage[s] for s in done) / len(done)
        # the layer seconds leave out the passes that advance to the next stage: scale them in
        other = max(0.0, seconds - sum(info["seconds"] for info in report.values())) / max(1, len(done))
        whole = per_stage["embed"] + len(blocks) * (mean_block + other)
        print(f"  embedding {per_stage['embed']:.1f} s, mean block {mean_block + other:.1f} s over {len(done)} -> "
              f"whole model about {whole:.0f} s ({whole / 60:.1f} min; an extrapolation, not a full run)")
    scales = {}
    for name, cell in quant_cells(model):
        if name not in report:
            continue
        for op in cell.operands:
            scales[f"{name}.{op}"] = np.asarray(cell.get_scale(op), np.float32)
        if cell.bias_corr is not None:
            scales[f"{name}.bias_corr"] = np.asarray(cell.bias_corr, np.float32)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    record = {"model": args.model, "method": args.method, "w_bits": args.bits, "a_bits": args.bits,
              "calib_images": len(images), "ranking_pairs": args.ranking_pairs,
              "stages": args.stages or len(stage_names), "whole_model": not args.stages,
              "calib_threads": threads, "search_threads": used, "wall_seconds": round(seconds, 1),
              "cpu_seconds": round(cpu, 1), "peak_rss_gb": round(peak, 2), "cpus": os.cpu_count(),
              "load_average_1min_at_end": round(os.getloadavg()[0], 2)}
    print(f"  CPU time {cpu:.1f} s ({cpu / max(seconds, 1e-9):.2f} cores busy on average)")
    return seconds, scales, used, record


def write_json(path, data):
    """`data` as JSON at `path`, written to a temporary name and renamed."""
    import json
    import tempfile
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".calib_speed.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


if __name__ == "__main__":
    sys.exit(main())
