"""The embedded benchmark: top-1 of every method and of the paper's method with each of its
components switched on and off, on the embedded model, at W8A8, W6A6, W4A4 and W3A3, plus mixed
precision at the 6-bit and 4-bit sizes (the paper's criterion and the refined one; vtptq_plus
with the refined one), with calibration seconds; vtptq_plus with each of its switches alone and
all of them on; and, with --pairs, a grid of weight and activation widths.

    python bench/embedded_table.py [--calib-num 32] [--bits 8,6,4,3] [--output outputs/embedded_table]
    python bench/embedded_table.py --seeds 0-4 --splits val,test --variants vtptq_all,vtptq_plus --bits 4,3 --no-mp
    python bench/embedded_table.py --pairs [--quick] --seeds 0-4 --output outputs/pairs
    python bench/embedded_table.py --bit-pairs W2A4,W4A3 --variants vtptq_plus,plus_with_block_recon --seeds 0-4
    python bench/embedded_table.py --plot-only [--output outputs/embedded_table]

Protocol. Settings are chosen on the embedded val split (5,000 training images outside the
calibration pool, `--splits val`); the test split (10,000 images) is reported, never used to
choose. The model saw the val images in training, so a choice on val is made by the top-1
agreement with the full-precision model (`val agree`: the share of val images whose predicted
class is the FP model's), which needs no labels; the labels' top-1 is printed beside it.
`--seeds A-B` calibrates every row once per calibration draw (`calib_seed` A..B: another 32
of the 4,096 calibration images each time) and reports mean ± standard deviation over the
draws: one draw of 32 images moves top-1 by a few tenths, so a single draw is never the claim.

Each calibration is evaluated on the first split of --splits by quant.py (its run folder
OUTPUT/<variant>_<bits>[_s<seed>]/ holds result.json, config.yaml and quantized.ckpt); its
quantized.ckpt is then evaluated on the other splits in this process. OUTPUT/summary.md and
OUTPUT/summary.json (every run's figures and the means) are rewritten after each run.
OUTPUT/accuracy_size.png plots top-1 against model_size_mb of every uniform and
mixed-precision run found under OUTPUT; with --pairs, OUTPUT/pairs.png is a heat map per method
and split of the gap to full precision (needs matplotlib; --plot-only redraws from the files).
"""
import argparse
import json
import os
import re
import sys

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import src  # noqa: E402,F401  (before numpy: its OpenBLAS settings, src/__init__.py)
import numpy as np  # noqa: E402

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
    # each default switch off in turn (the others at vtptq_plus's defaults), and the two built but off
    ("plus_no_ln_reparam", {"method": "vtptq_plus", "ln_reparam": False}),
    ("plus_softmax_uniform", {"method": "vtptq_plus", "softmax_quantizer": "uniform"}),
    ("plus_no_gelu_asym", {"method": "vtptq_plus", "gelu_asymmetric": False}),
    ("plus_no_channel_search", {"method": "vtptq_plus", "weight_channel_search": False}),
    ("plus_with_recon", {"method": "vtptq_plus", "recon_iters": 500}),
    ("plus_with_attn_reparam", {"method": "vtptq_plus", "attn_reparam": True}),
    ("plus_with_block_recon", {"method": "vtptq_plus", "block_recon_iters": 300}),
]
VARIANTS = VARIANTS + PLUS_VARIANTS
DEFAULT_VARIANTS = [v for v, _ in VARIANTS if not v.startswith(("plus_no_", "plus_softmax_uniform", "plus_with_"))]
MP_TARGETS = ("6MP", "4MP")
MP_VARIANTS = [(label, dict({"method": method, "mixed_precision": True, "mp_target": t, "mp_criterion": crit}, **extra))
               for label, method, crit, extra in (("vtptq_mp", "vtptq", "paper", {}),
                                                  ("vtptq_mp_refined", "vtptq", "refined", {}),
                                                  ("vtptq_plus_mp_refined", "vtptq_plus", "refined", {}),
                                                  # the refined criterion's paired-test acceptance rule (mp_accept_z)
                                                  ("vtptq_mp_refined_z1", "vtptq", "refined", {"mp_accept_z": 1.0}))
               for t in MP_TARGETS]  # vtptq_plus: the refined criterion only (quant.py refuses paper)
DEFAULT_MP_VARIANTS = ("vtptq_mp", "vtptq_mp_refined", "vtptq_plus_mp_refined")
PLOT_BITS = range(2, 17)
PAIR_W, PAIR_A = (2, 3, 4, 6, 8), (3, 4, 6, 8)
PAIR_METHODS = ("minmax", "vtptq_all", "vtptq_plus")
QUICK_PAIRS = ((4, 8), (8, 4), (4, 4), (3, 3), (2, 4))


def parse_bit_pairs(text):
    """'W2A4,W3A3' -> [(2, 4), (3, 3)]."""
    pairs = []
    for part in text.split(","):
        m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", part.strip())
        if not m or not all(2 <= int(b) <= 16 for b in m.groups()):
            raise ValueError(f"--bit-pairs {text!r}: expected a comma-separated list like W2A4,W3A3 (2 to 16 bits)")
        pairs.append((int(m.group(1)), int(m.group(2))))
    return pairs


def parse_seeds(text):
    """'0-4' -> [0, 1, 2, 3, 4]; '0,2' -> [0, 2]."""
    seeds = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        seeds += list(range(int(lo), int(hi or lo) + 1))
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: expected A-B or a comma-separated list of non-negative integers")
    return seeds


def mean_sd(values):
    """(mean, sample standard deviation or None) of the non-None values, or (None, None)."""
    v = [x for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


def fmt(values, digits=2):
    m, sd = mean_sd(values)
    if m is None:
        return ""
    return f"{m:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None else "")


class Splits:
    """The full-precision reference of each split (top-1, predictions), and evaluation of a
    saved quantized checkpoint on a split with its agreement with the FP model."""

    def __init__(self, base):
        self.base, self.fp = base, {}

    def _evaluate(self, cfg):
        from src.api import build_eval_dataset, build_model, evaluate, get_data_config
        dataset = build_eval_dataset(cfg, get_data_config(cfg["model"]))
        return evaluate(build_model(cfg), dataset, cfg["batch_size"], keep_predictions=True,
                        desc=f"eval {cfg['split']}")

    def reference(self, split, from_run=None):
        """FP top-1 and predictions on `split`: those quant.py measured (from_run, its FP
        evaluation of this split), else an FP evaluation here."""
        if split not in self.fp:
            if from_run is not None and quant.LAST_FP.get("top1_predictions"):
                self.fp[split] = {"top1": from_run["fp_top1"], "predictions": quant.LAST_FP["top1_predictions"]}
            else:
                res = self._evaluate(dict(self.base, split=split, ckpt=None))
                self.fp[split] = {"top1": res["top1"], "predictions": quant.top1_predictions(res["predictions"])}
        return self.fp[split]

    def evaluate_checkpoint(self, ckpt, split):
        """{top1, agreement} of quantized.ckpt on `split`."""
        res = self._evaluate(dict(self.base, split=split, ckpt=ckpt))
        fp = self.reference(split)
        return {"top1": res["top1"], "agreement": quant.fp_agreement(fp["predictions"], res["predictions"])}


def resumed_runs(out_root, splits, ref):
    """The runs of OUT_ROOT/summary.json (from an earlier, interrupted table with the same
    splits) and the FP result file of its first split; ([], None) when there is none."""
    summary = os.path.join(out_root, "summary.json")
    fp_result = os.path.join(out_root, f"fp_result_{splits[0]}.json")
    if not os.path.isfile(summary) or not os.path.isfile(fp_result):
        return [], None
    with open(summary, encoding="utf-8") as f:
        data = json.load(f)
    if data.get("splits") != splits:
        raise SystemExit(f"error: {summary}: its splits are {data.get('splits')}, this table's {splits}; "
                         "resume with the same --splits or use another --output")
    with open(fp_result, encoding="utf-8") as f:
        fp = json.load(f)
    ref.fp[splits[0]] = {"top1": fp["top1"], "predictions": fp["top1_predictions"]}
    return data["runs"], fp_result


def run_table(out_root, variants, bits_list, seeds, splits, overrides, pairs=None, resume=False):
    """Calibrate every (variant, widths, seed), evaluate on every split; write
    OUT_ROOT/summary.{md,json} after each run. pairs: [(w, a)] instead of bits_list. resume:
    keep the runs of OUT_ROOT/summary.json and do only the others (a long table that stopped
    part-way, e.g. on a MindSpore graph-compilation error after many runs in one process)."""
    from src.api import atomic_write_json, atomic_write_text, defaults
    base = dict(defaults(), **overrides)
    ref = Splits(base)
    os.makedirs(out_root, exist_ok=True)
    runs, fp_result = resumed_runs(out_root, splits, ref) if resume else ([], None)
    done = {(r["variant"], r["w_bits"], r["a_bits"], r["seed"], r["mp"]) for r in runs}
    done_mp = {(r["variant"], r["bits"], r["seed"]) for r in runs if r["mp"]}
    widths = [(w, a) for w, a in pairs] if pairs else [(b, b) for b in bits_list]
    for label, over in variants:
        for w, a in ([(None, None)] if over.get("mixed_precision") else widths):
            tag = over["mp_target"] if w is None else f"w{w}a{a}"
            for seed in seeds:
                name = f"{label}_{tag}" + (f"_s{seed}" if len(seeds) > 1 or seed else "")
                if (label, w, a, seed, False) in done or w is None and (label, tag, seed) in done_mp:
                    continue
                cfg = dict(base, **over, name=name, output=os.path.join(out_root, name), calib_seed=seed,
                           split=splits[0], fp_result=fp_result)
                if w is not None:
                    cfg.update(w_bits=w, a_bits=a)
                res = quant.main(cfg)
                if fp_result is None:  # evaluate FP once per split, reuse it for the other runs
                    ref.reference(splits[0], from_run=res)
                    fp_result = os.path.join(out_root, f"fp_result_{splits[0]}.json")
                    atomic_write_json(fp_result, {"model": res["model"], "checkpoint": res["checkpoint"],
                                                  "data": res["data"], "num_images": res["num_images"],
                                                  "top1": res["fp_top1"], "top5": res["fp_top5"],
                                                  "top1_predictions": ref.fp[splits[0]]["predictions"]})
                run = {"variant": label, "bits": res.get("mp_target") or f"W{res['w_bits']}A{res['a_bits']}",
                       "w_bits": res["w_bits"], "a_bits": res["a_bits"], "seed": seed,
                       "model_size_mb": res["model_size_mb"], "stored_size_mb": res.get("stored_size_mb"),
                       "calib_seconds": res["calib_seconds"], "mp": bool(over.get("mixed_precision")),
                       splits[0]: {"top1": res["top1"], "agreement": res.get("fp_agreement")}}
                for split in splits[1:]:
                    run[split] = ref.evaluate_checkpoint(res["quantized_checkpoint"], split)
                runs.append(run)
                write_summary(out_root, runs, splits, ref)
    return runs


def summarize(runs, splits):
    """Rows of mean ± sd over the seeds of each (variant, bits)."""
    groups = {}
    for r in runs:
        groups.setdefault((r["variant"], r["bits"]), []).append(r)
    rows = []
    for (variant, bits), rs in groups.items():
        row = {"variant": variant, "bits": bits, "w_bits": rs[0]["w_bits"], "a_bits": rs[0]["a_bits"],
               "seeds": [r["seed"] for r in rs], "mp": rs[0]["mp"], "model_size_mb": rs[0]["model_size_mb"],
               "stored_size_mb": rs[0]["stored_size_mb"], "calib_seconds": mean_sd([r["calib_seconds"] for r in rs])}
        for split in splits:
            for key in ("top1", "agreement"):
                row[f"{split}_{key}"] = mean_sd([r[split][key] for r in rs])
        rows.append(row)
    return rows


def write_summary(out_root, runs, splits, ref):
    from src.api import atomic_write_json, atomic_write_text
    rows = summarize(runs, splits)
    fp = {s: ref.fp[s]["top1"] for s in splits if s in ref.fp}
    head = ["variant", "bits", "draws"]
    for s in splits:
        head += [f"{s} agree", f"{s} top-1", f"{s} Δ FP"]
    head += ["model MB", "stored MB", "calib s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = [row["variant"], row["bits"], str(len(row["seeds"]))]
        for s in splits:
            group = [r[s] for r in runs if (r["variant"], r["bits"]) == (row["variant"], row["bits"])]
            cells += [fmt([g["agreement"] for g in group]), fmt([g["top1"] for g in group]),
                      fmt([g["top1"] - fp[s] for g in group]) if s in fp else ""]
        cells += [f"{row['model_size_mb']:.3f}", f"{row['stored_size_mb']:.3f}" if row["stored_size_mb"] else "",
                  fmt([r["calib_seconds"] for r in runs if (r["variant"], r["bits"]) == (row["variant"], row["bits"])],
                      1)]
        lines.append("| " + " | ".join(cells) + " |")
    fp_line = ", ".join(f"{s} {v:.2f}" for s, v in fp.items())
    text = "\n".join(lines) + f"\n\nFP top-1: {fp_line}; mean ± sample standard deviation over the draws.\n"
    atomic_write_text(os.path.join(out_root, "summary.md"), text)
    atomic_write_json(os.path.join(out_root, "summary.json"), {"splits": splits, "fp_top1": fp, "rows": rows,
                                                               "runs": runs})
    print("\n" + text, flush=True)


def plot(out_root):
    """OUT_ROOT/accuracy_size.png from the result.json of every run folder under OUT_ROOT, and
    OUT_ROOT/pairs.png from OUT_ROOT/summary.json when it holds a pair grid."""
    from src.api import plot_accuracy_size, plot_pair_grid
    summary, data = os.path.join(out_root, "summary.json"), None
    if os.path.isfile(summary):
        with open(summary, encoding="utf-8") as f:
            data = json.load(f)
    rows = []
    if data:  # the means over the draws, on the first split
        split = data["splits"][0]
        rows = [{"label": r["variant"], "tag": r["bits"] if r["mp"] else f"W{r['w_bits']}",
                 "size_mb": r["model_size_mb"], "top1": r[f"{split}_top1"][0], "mp": r["mp"]}
                for r in data["rows"] if r["mp"] or r["w_bits"] == r["a_bits"]]
    for label, over in ([] if data else VARIANTS + MP_VARIANTS):  # an older output: its result.json files
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
    if path and rows:
        print(f"wrote {path} ({len(rows)} runs)")
    if data:
        pair_rows = [r for r in data["rows"] if not r["mp"] and r["w_bits"] != r["a_bits"]]
        if pair_rows:
            panels = []
            for s in data["splits"]:
                for method in dict.fromkeys(r["variant"] for r in data["rows"] if not r["mp"]):
                    cells = {(r["w_bits"], r["a_bits"]): r[f"{s}_top1"][0] - data["fp_top1"][s]
                             for r in data["rows"] if r["variant"] == method and r[f"{s}_top1"][0] is not None}
                    panels.append((f"{method}, {s}: top-1 − FP", cells))
            path = plot_pair_grid(panels, PAIR_W, PAIR_A, os.path.join(out_root, "pairs.png"),
                                  title="embedded model: gap to full precision per bit pair (mean over draws)")
            if path:
                print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib-num", type=int, default=32)
    p.add_argument("--bits", default="8,6,4,3", help="uniform bit widths, comma-separated (default 8,6,4,3)")
    p.add_argument("--no-mp", action="store_true", help="skip the mixed-precision rows")
    p.add_argument("--mp-variants", help="comma-separated mixed-precision rows, of: "
                   + ", ".join(dict(MP_VARIANTS)) + f" (default: {', '.join(DEFAULT_MP_VARIANTS)}); given without "
                   "--variants, only these rows run")
    p.add_argument("--mp-targets", default=",".join(MP_TARGETS),
                   help=f"mixed-precision size targets, comma-separated (default {','.join(MP_TARGETS)})")
    p.add_argument("--variants", help="comma-separated subset of: " + ", ".join(v for v, _ in VARIANTS)
                   + f" (default: {', '.join(DEFAULT_VARIANTS)}; with --pairs: {', '.join(PAIR_METHODS)})")
    p.add_argument("--seeds", default="0", help="calibration draws (calib_seed), e.g. 0-4 (default 0)")
    p.add_argument("--splits", default="test",
                   help="evaluation splits, comma-separated: test, val (default test; choices are made on val)")
    p.add_argument("--pairs", action="store_true",
                   help=f"the grid of weight bits {PAIR_W} x activation bits {PAIR_A} (no mixed precision)")
    p.add_argument("--quick", action="store_true",
                   help="with --pairs: only " + ", ".join(f"W{w}A{a}" for w, a in QUICK_PAIRS))
    p.add_argument("--bit-pairs", help="weight and activation widths, comma-separated, e.g. W2A4,W3A3 (instead of "
                   "--bits and --pairs; no mixed precision)")
    p.add_argument("--max-images", type=int, default=None, help="first N images of each split (default: all)")
    p.add_argument("--output", default=os.path.join("outputs", "embedded_table"))
    p.add_argument("--plot-only", action="store_true", help="only redraw the plots from OUTPUT")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already in OUTPUT/summary.json and do only the missing ones")
    args = p.parse_args(argv)
    if args.plot_only:
        plot(args.output)
        return 0
    try:
        seeds = parse_seeds(args.seeds)
    except ValueError as e:
        p.error(str(e))
    splits = args.splits.split(",")
    if not splits or set(splits) - {"test", "val"} or len(set(splits)) != len(splits):
        p.error(f"--splits {args.splits!r}: expected test, val or both, each once")
    known = dict(VARIANTS)
    wanted = args.variants.split(",") if args.variants else (
        list(PAIR_METHODS) if args.pairs else [] if args.mp_variants else DEFAULT_VARIANTS)
    mp_wanted = args.mp_variants.split(",") if args.mp_variants else list(DEFAULT_MP_VARIANTS)
    mp_targets = args.mp_targets.split(",")
    if set(mp_wanted) - set(dict(MP_VARIANTS)) or set(mp_targets) - set(MP_TARGETS):
        p.error(f"--mp-variants {args.mp_variants!r} / --mp-targets {args.mp_targets!r}: expected a subset of "
                f"{', '.join(dict(MP_VARIANTS))} / of {', '.join(MP_TARGETS)}")
    unknown = set(wanted) - set(known)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    variants = [(v, known[v]) for v in wanted]
    pairs = None
    if args.bit_pairs and args.pairs:
        p.error("--bit-pairs and --pairs: give one of them")
    if args.bit_pairs:
        try:
            pairs = parse_bit_pairs(args.bit_pairs)
        except ValueError as e:
            p.error(str(e))
    elif args.pairs:
        pairs = QUICK_PAIRS if args.quick else [(w, a) for w in PAIR_W for a in PAIR_A]
    elif not args.no_mp:
        by_key = {(v, over["mp_target"]): over for v, over in MP_VARIANTS}
        variants = variants + [(v, by_key[v, t]) for t in mp_targets for v in mp_wanted]
    bits = tuple(int(b) for b in args.bits.split(","))
    overrides = {"calib_num": args.calib_num, "calib_batch_size": 256,
                 **({"max_images": args.max_images} if args.max_images else {})}
    run_table(args.output, variants, bits, seeds, splits, overrides, pairs, resume=args.resume)
    plot(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
