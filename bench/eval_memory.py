"""Peak memory of eval.py: a quantized checkpoint against the full-precision model, one process each.

A W8A8 checkpoint of the model (random weights, minmax on a few random images) is written to a
temporary folder; then `eval.py` runs twice in a subprocess on the same JPEGs at the same batch:
the FP model (--model) and the quantized checkpoint (--ckpt). The peak resident memory of each
subprocess (ru_maxrss from wait4) and their ratio are printed; the target of issue #12 is
quantized <= 1.25x FP.

    python bench/eval_memory.py --images DIR                       # deit_small, batch 32
    python bench/eval_memory.py --images DIR --model deit_base_patch16_224 --json outputs/mem_base.json

DIR: a folder of ImageNet JPEGs named `<wnid>_*.JPEG` (e.g. an ImageNet sample); they are
linked into a temporary `val/<wnid>/` layout. Run it on an otherwise idle machine.
"""
import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("GLOG_v", "3")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

TARGET_RATIO = 1.25


def imagenet_layout(images_dir, root):
    """Link every `<wnid>_*.JPEG` of images_dir into root/val/<wnid>/; returns the count."""
    n = 0
    for name in sorted(os.listdir(images_dir)):
        wnid = name.split("_", 1)[0]
        if not (name.lower().endswith((".jpeg", ".jpg", ".png")) and wnid.startswith("n") and wnid[1:].isdigit()):
            continue
        os.makedirs(os.path.join(root, "val", wnid), exist_ok=True)
        os.symlink(os.path.join(os.path.abspath(images_dir), name), os.path.join(root, "val", wnid, name))
        n += 1
    if n == 0:
        sys.exit(f"error: {images_dir}: no ImageNet images named <wnid>_*.JPEG")
    return n


def make_checkpoint(model_name, path, calib_num=8):
    import numpy as np
    import mindspore as ms
    from src.api import (calibrate_model, create_model, defaults, get_data_config, quantize_model,
                         save_quantized_checkpoint, set_quant_mode)
    ms.set_device("CPU")
    ms.set_seed(0)
    c, h, w = get_data_config(model_name)["input_size"]
    images = np.random.default_rng(0).standard_normal((calib_num, c, h, w)).astype(np.float32)
    cfg = defaults()
    cfg.update(model=model_name, method="minmax", w_bits=8, a_bits=8, calib_num=calib_num, calib_batch_size=calib_num)
    model = create_model(model_name)
    quantize_model(model, cfg)
    calibrate_model(model, images, cfg, log=io.StringIO())
    set_quant_mode(model, "quantized")
    save_quantized_checkpoint(model, path, model_name)


def run_eval(args_list):
    """Run eval.py with args_list; (peak RSS in MB, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *args_list], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    proc.stdout.close()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"error: eval.py {' '.join(args_list)} failed:\n{out[-2000:]}")
    print("   ", out.strip().splitlines()[-1], flush=True)
    return usage.ru_maxrss / 1024, time.perf_counter() - t0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, metavar="DIR", help="folder of ImageNet JPEGs named <wnid>_*.JPEG")
    p.add_argument("--model", default="deit_small_patch16_224", help="registered ImageNet model "
                                                                       "(default deit_small_patch16_224)")
    p.add_argument("--batch-size", type=int, default=32, help="evaluation batch (default 32)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        sys.exit(f"error: --batch-size is {args.batch_size}; expected a positive number")
    from src.api import list_models
    if args.model not in list_models():
        sys.exit(f"error: unknown model '{args.model}' (known: {', '.join(list_models())})")
    with tempfile.TemporaryDirectory() as tmp:
        n = imagenet_layout(args.images, os.path.join(tmp, "data"))
        ckpt = os.path.join(tmp, "quantized.ckpt")
        print(f"eval_memory: {args.model}, batch {args.batch_size}, {n} images; load average "
              f"{os.getloadavg()[0]:.2f}; writing a W8A8 minmax checkpoint (random weights)", flush=True)
        make_checkpoint(args.model, ckpt)
        common = ["--data", os.path.join(tmp, "data"), "--batch-size", str(args.batch_size), "--num-workers", "1"]
        print(" FP:", flush=True)
        fp_mb, fp_s = run_eval(["--model", args.model, "--output", os.path.join(tmp, "fp"), *common])
        print(" quantized checkpoint:", flush=True)
        q_mb, q_s = run_eval(["--ckpt", ckpt, "--output", os.path.join(tmp, "q"), *common])
    ratio = q_mb / fp_mb
    result = {"model": args.model, "batch_size": args.batch_size, "images": n, "fp_peak_rss_mb": fp_mb,
              "quantized_peak_rss_mb": q_mb, "ratio": ratio, "fp_seconds": fp_s, "quantized_seconds": q_s,
              "load_average": os.getloadavg()[0]}
    print()
    print("| eval.py | peak RSS (MB) | seconds |")
    print("|---|---|---|")
    print(f"| FP {args.model} | {fp_mb:.0f} | {fp_s:.1f} |")
    print(f"| quantized W8A8 checkpoint | {q_mb:.0f} | {q_s:.1f} |")
    print(f"\nquantized / FP peak memory = {ratio:.2f}x (target <= {TARGET_RATIO}x: "
          f"{'ok' if ratio <= TARGET_RATIO else 'ABOVE'}); load average at the end {result['load_average']:.2f}")
    if args.json:
        from src.api import write_bench_json
        write_bench_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
