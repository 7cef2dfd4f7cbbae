"""The embedded benchmark: top-1 of every method and of the paper's method with each of its
components switched on and off, on the embedded model and its 10,000 test images, at W8A8,
W6A6, W4A4 and W3A3, plus mixed precision at the 6-bit and 4-bit sizes (the paper's criterion
and the refined one; vtptq_plus with the refined one), with calibration seconds; and
vtptq_plus with each of its switches alone and all of them on.

    python bench/embedded_table.py [--calib-num 32] [--bits 8,6,4,3] [--output outputs/embedded_table]
    python bench/embedded_table.py --plot-only [--output outputs/embedded_table]

Writes OUTPUT/summary.md (rewritten after each run), one folder per run with its
result.json, config.yaml and quantized.ckpt, and OUTPUT/accuracy_size.png: top-1 against
model size of every uniform run found under OUTPUT (one line per variant; `--bits 8,7,6,5,4,3`
gives W8 to W3) and of the mixed-precision runs (needs matplotlib; --plot-only redraws it from
the result.json files already there).
"""
import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import quant  # noqa: E402

VARIANTS = [
    ("minmax", {"method": "minmax"}),
    ("percentile", {"method": "percentile"}),
    ("easyquant", {"method": "easyquant"}),
    ("vtptq_similarity", {"method": "vtptq", "ranking_loss": False, "bias_correction": False}),
    ("vtptq_ranking", {"method": "vtptq", "ranking_loss": True, "bias_correction": False}),
    ("vtptq_biascorr", {"method": "vtptq", "ranking_loss": False, "bias_correction": True}),
    ("vtptq_all", {"method": "vtptq", "ranking_loss": True, "bias_correction": True}),
]
# vtptq_plus: each switch alone (the others off), then all on (the method's defaults)
_PLUS_OFF = {"method": "vtptq_plus", "ln_reparam": False, "softmax_quantizer": "uniform", "gelu_asymmetric": False,
             "weight_channel_search": False, "recon_iters": 0}
PLUS_VARIANTS = [
    ("plus_ln_reparam", dict(_PLUS_OFF, ln_reparam=True)),
    ("plus_softmax_auto", dict(_PLUS_OFF, softmax_quantizer="auto")),
    ("plus_gelu_asym", dict(_PLUS_OFF, gelu_asymmetric=True)),
    ("plus_channel_search", dict(_PLUS_OFF, weight_channel_search=True)),
    ("plus_recon", dict(_PLUS_OFF, recon_iters=500)),
    ("vtptq_plus", {"method": "vtptq_plus"}),
]
VARIANTS = VARIANTS + PLUS_VARIANTS
MP_VARIANTS = [(label, {"method": method, "mixed_precision": True, "mp_target": t, "mp_criterion": crit})
               for label, method, crit in (("vtptq_mp", "vtptq", "paper"), ("vtptq_mp_refined", "vtptq", "refined"),
                                           ("vtptq_plus_mp_refined", "vtptq_plus", "refined"))
               for t in ("6MP", "4MP")]  # vtptq_plus: the refined criterion only (quant.py refuses paper)
PLOT_BITS = range(2, 17)


def plot(out_root):
    """OUT_ROOT/accuracy_size.png from the result.json of every run folder under OUT_ROOT."""
    import json
    from src.api import plot_accuracy_size
    rows = []
    for label, over in VARIANTS + MP_VARIANTS:
        tags = [over["mp_target"]] if over.get("mixed_precision") else [f"w{b}a{b}" for b in PLOT_BITS]
        for tag in tags:
            path = os.path.join(out_root, f"{label}_{tag}", "result.json")
            if os.path.isfile(path):
                with open(path, encoding="utf-8") as f:
                    res = json.load(f)
                rows.append({"label": label, "tag": tag.upper() if "MP" in tag else f"W{res['w_bits']}",
                             "size_mb": res["model_size_mb"], "top1": res["top1"],
                             "mp": bool(over.get("mixed_precision"))})
    path = plot_accuracy_size(rows, os.path.join(out_root, "accuracy_size.png"),
                              title="embedded model: top-1 against model size (uniform and mixed precision)")
    if path:
        print(f"wrote {path} ({len(rows)} runs)")
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-num", type=int, default=32)
    p.add_argument("--bits", default="8,6,4,3", help="uniform bit widths, comma-separated")
    p.add_argument("--no-mp", action="store_true", help="skip the mixed-precision rows")
    p.add_argument("--variants", help="comma-separated subset of: " + ", ".join(v for v, _ in VARIANTS))
    p.add_argument("--max-images", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--output", default=os.path.join("outputs", "embedded_table"))
    p.add_argument("--plot-only", action="store_true", help="only redraw OUTPUT/accuracy_size.png")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(args.output)
        return
    variants = VARIANTS
    if args.variants:
        wanted = args.variants.split(",")
        unknown = set(wanted) - {v for v, _ in VARIANTS}
        if unknown:
            p.error(f"unknown variants {sorted(unknown)}")
        variants = [v for v in VARIANTS if v[0] in wanted]
    if not args.no_mp:
        variants = variants + MP_VARIANTS
    bits = tuple(int(b) for b in args.bits.split(","))
    quant.run_embedded_suite(args.output, variants, bits,
                             overrides={"calib_num": args.calib_num, "calib_batch_size": 256,
                                        **({"max_images": args.max_images} if args.max_images else {})})
    plot(args.output)


if __name__ == "__main__":
    main()
