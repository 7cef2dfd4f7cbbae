"""The embedded benchmark: top-1 of every method and of the paper's method with each of its
components switched on and off, on the embedded model and its 10,000 test images, at W8A8,
W6A6, W4A4 and W3A3, plus mixed precision at the 6-bit and 4-bit sizes, with calibration seconds;
and vtptq_plus with each of its switches alone and all of them on.

    python bench/embedded_table.py [--calib-num 32] [--bits 8,6,4,3] [--output outputs/embedded_table]

Writes OUTPUT/summary.md (rewritten after each run) and one folder per run with its
result.json, config.yaml and quantized.ckpt.
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
MP_VARIANTS = [("vtptq_mp", {"method": "vtptq", "mixed_precision": True, "mp_target": t}) for t in ("6MP", "4MP")]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-num", type=int, default=32)
    p.add_argument("--bits", default="8,6,4,3", help="uniform bit widths, comma-separated")
    p.add_argument("--no-mp", action="store_true", help="skip the mixed-precision rows")
    p.add_argument("--variants", help="comma-separated subset of: " + ", ".join(v for v, _ in VARIANTS))
    p.add_argument("--output", default=os.path.join("outputs", "embedded_table"))
    args = p.parse_args(argv)
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
                             overrides={"calib_num": args.calib_num, "calib_batch_size": 256})


if __name__ == "__main__":
    main()
