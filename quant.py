"""Post-training quantization of a ViT/DeiT model: evaluate it in full precision, calibrate
the intervals of every quantized layer, save the quantized model, evaluate it.

With no arguments it runs the embedded default: the embedded model `deit_fmnist` at W8A8
and W4A4 with each available method, and prints a table of top-1 against full precision.

Outputs in OUTPUT (default outputs/<name>/): config.yaml, quantized.ckpt (written before the
final evaluation), result.json, and for mixed precision bits.png (needs matplotlib).

Examples:
  python quant.py
  python quant.py --config configs/deit_fmnist_easyquant_w4a4.yaml
  python quant.py --config configs/deit_fmnist_vtptq_4MP_refined.yaml   # mixed precision, refined criterion
  python quant.py --config configs/deit_small_easyquant_w6a6.yaml --data /data/imagenet --ckpt deit_small.safetensors
  python eval.py --ckpt outputs/<name>/quantized.ckpt      # re-evaluate the saved quantized model
  msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True quant.py --config CONFIG
      (data-parallel: each worker calibrates on its shard of the calibration images, the
       methods combine over workers and get the single-process intervals, each worker evaluates
       its shard; rank 0 writes quantized.ckpt and result.json)
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")  # MindSpore: warnings and errors only from its C++ side

from src.config import (ArgumentParser, ConfigError, add_arguments, check_config, defaults, output_dir,  # noqa: E402
                        resolve, save_config)

QUANT_KEYS = ["model", "ckpt", "data", "method", "w_bits", "a_bits", "calib_num", "calib_seed", "output",
              "device_target", "fp_result", "mode", "batch_size", "split", "name", "num_workers", "max_images",
              "calib_split", "calib_batch_size", "calib_threads", "calib_input", "percentile", "search_alpha",
              "search_beta",
              "search_candidates", "search_rounds", "weight_per_channel", "softmax_unsigned", "quantize_head",
              "quantize_patch_embed", "quantize_matmul1", "quantize_matmul2", "max_rounds", "ranking_loss",
              "ranking_gamma", "ranking_theta", "ranking_pairs", "bias_correction", "mixed_precision", "mp_target",
              "mp_min_bits", "mp_criterion", "mp_accept_z",
              "ln_reparam", "softmax_quantizer", "gelu_asymmetric", "weight_channel_search", "recon_iters", "attn_reparam",
              "block_recon_iters",
              "skip_bad_images", "crop_pct",
              "interpolation", "num_classes", "drop_head", "seed"]
EVAL_FIELDS = ("num_images", "skipped_images", "top1", "top5", "seconds", "images_per_second")
SUITE_BITS = (8, 4)


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of config keys (see src/config.py); flags override it")
    add_arguments(p, QUANT_KEYS)
    p.add_argument("--quiet", action="store_true",
                   help="calibration progress as one updating line (stage, elapsed, ETA) instead of a line per layer")
    return p


def run_name(cfg):
    if cfg.get("name"):
        return cfg["name"]
    if cfg.get("mixed_precision"):
        return f"{cfg['model']}_{cfg['method']}_{cfg['mp_target']}"
    return f"{cfg['model']}_{cfg['method']}_w{cfg['w_bits']}a{cfg['a_bits']}"


def mixed_precision_bits(cfg, calib_images, build_model):
    """Search one bit width per MSA/MLP module with cfg['mp_criterion']: 'paper'
    (src/quant/mixed_precision.py) or 'refined' (src/quant/mp_refined.py). Returns
    (layer_bits for quantize_model, the search report, size target in MB)."""
    from src.quant import model_size_mb, quantize_model, set_quant_mode
    from src.quant.mixed_precision import layer_bits_from_modules, search_bits
    from src.quant.mp_refined import refined_search
    model = build_model()
    quantize_model(model, cfg)
    set_quant_mode(model, "quantized")
    target_mb = model_size_mb(model)  # the uniform model at the nominal width
    if cfg.get("mp_criterion", "paper") == "refined":
        report = refined_search(build_model, calib_images, cfg)
    else:
        report = search_bits(model, calib_images, cfg)
    print(f"mixed precision {cfg['mp_target']} ({cfg.get('mp_criterion', 'paper')}): "
          + ", ".join(f"{k}={v}" for k, v in report["modules"].items()) + f" [{report['seconds']:.1f}s]", flush=True)
    return layer_bits_from_modules(model, report["modules"]), report, target_mb


LAST_FP = {}  # the FP predictions of the last FP evaluation of this process (run_embedded_suite reuses them)


def fp_reference(cfg, dataset, model_fn):
    """FP metrics: from cfg['fp_result'] (checked to be the same model, checkpoint and data) or
    by evaluating the FP model."""
    from src.data.build import data_description
    from src.engine import resolve_checkpoint
    from src.sharded import evaluate_sharded
    if cfg.get("fp_result"):
        path = cfg["fp_result"]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: fp_result file not found")
        with open(path, encoding="utf-8") as f:
            try:
                fp = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not a JSON result file ({e})") from None
        if not isinstance(fp, dict) or not all(isinstance(fp.get(k), (int, float)) for k in ("top1", "top5")):
            raise ValueError(f"{path}: fp_result is not the result.json of an evaluation (no numeric top1/top5)")
        want = {"model": cfg["model"], "checkpoint": resolve_checkpoint(cfg), "data": data_description(cfg),
                "num_images": len(dataset)}
        for key, value in want.items():
            if fp.get(key) != value:
                raise ValueError(f"{path}: fp_result has {key} {fp.get(key)!r}, this run has {value!r}")
        out = {k: fp[k] for k in ("top1", "top5")}
        preds = fp.get("top1_predictions")
        if isinstance(preds, dict) and all(isinstance(v, int) for v in preds.values()):
            out["top1_predictions"] = preds
        return out
    res = evaluate_sharded(model_fn(), dataset, cfg["batch_size"], num_workers=cfg["num_workers"],
                           keep_predictions=True, desc="FP eval")
    res["top1_predictions"] = LAST_FP["top1_predictions"] = top1_predictions(res.pop("predictions"))
    print(f"full precision: top-1 {res['top1']:.2f}%  top-5 {res['top5']:.2f}%", flush=True)
    return res


def top1_predictions(predictions):
    """{image name: predicted class} of an evaluation's predictions."""
    return {name: int(top[0]) for name, _, top, _ in predictions}


def fp_agreement(fp_top1, predictions):
    """Top-1 agreement with the FP model, in %: the share of images whose predicted class is the
    FP model's (None without the FP predictions). The criterion every choice on the embedded val
    split is made by: it needs no labels (the model was trained on those images)."""
    if not fp_top1:
        return None
    ours = top1_predictions(predictions)
    common = [n for n in ours if n in fp_top1]
    return 100.0 * sum(ours[n] == fp_top1[n] for n in common) / len(common) if common else None


def main(cfg):
    """Quantize per the resolved config dict; returns the result dict (also OUTPUT/result.json)."""
    from src.data.build import build_eval_dataset, check_output_location, load_calibration_images
    from src.distributed import init_distributed, shard_indices
    from src.engine import quantized_checkpoint_model, setup_context
    from src.models import get_data_config
    from src.quant.calibrate import METHODS, is_shardable
    from src.quant.vtptq_plus import resolve_switches
    from src.run_folder import RunOutput

    check_config(cfg)  # also for configs built in code (run_embedded_suite, benchmarks)
    resolve_switches(cfg)  # null switches -> the method's default; impossible combinations: exit 2
    # quant.py needs full-precision weights: a quantized checkpoint is an error (naming both
    # models when another model was given), before anything is built or written
    qmodel = quantized_checkpoint_model(cfg)
    if qmodel is not None:
        raise ValueError(f"{cfg['ckpt']}: already a quantized checkpoint (model '{qmodel}'); quant.py "
                         "takes full-precision weights (evaluate it with eval.py --ckpt)")
    if cfg.get("mixed_precision"):
        from src.quant.mixed_precision import MP_CRITERION_METHODS, MP_METHODS, MP_TARGETS
        if cfg["method"] not in MP_METHODS:
            raise ConfigError(f"mixed_precision needs method {' or '.join(MP_METHODS)}; method is {cfg['method']!r}")
        crit = cfg.get("mp_criterion", "paper")
        if cfg["method"] not in MP_CRITERION_METHODS[crit]:
            raise ConfigError(f"mp_criterion is {crit!r}, which does not work with method {cfg['method']!r} (its "
                              "LayerNorm folds are per block); use mp_criterion 'refined'")
        nominal = MP_TARGETS[cfg["mp_target"]][0]
        if cfg.get("mp_min_bits") is not None and cfg["mp_min_bits"] > nominal:
            raise ConfigError(f"mp_min_bits is {cfg['mp_min_bits']}; {cfg['mp_target']} needs candidates at or "
                              f"below {nominal} bits")
        cfg["w_bits"] = cfg["a_bits"] = nominal
    cfg["name"] = run_name(cfg)
    check_output_location(cfg, output_dir(cfg, "quant"))  # not inside the data
    setup_context(cfg["device_target"], cfg["mode"], cfg["seed"])  # an unavailable device: an error now
    dist = init_distributed(cfg["device_target"])  # msrun workers: rank, size; else a group of one
    data_cfg = get_data_config(cfg["model"])
    dataset = build_eval_dataset(cfg, data_cfg)
    shard_indices(len(dataset), dist.rank, dist.size, cfg["batch_size"])  # more workers than batches: an error now
    shardable = is_shardable(METHODS[cfg["method"]])
    if cfg.get("mixed_precision"):
        from src.quant.mixed_precision import is_shardable as mp_shardable
        shardable = shardable and mp_shardable(cfg)
    # the run is written into a new folder beside OUTPUT and swapped in when it ends well
    # (rank 0 only); a failure leaves OUTPUT as it was (src.run_folder.RunOutput)
    with RunOutput(output_dir(cfg, "quant"), enabled=dist.is_main) as out:
        calib_images = load_calibration_images(cfg, data_cfg)
        return _quantize(cfg, dataset, calib_images, shardable, dist, out)


def _quantize(cfg, dataset, calib_images, shardable, dist, out):
    """The work of main() once everything is checked: FP reference, calibration (of this rank's
    shard when `shardable`), checkpoint, quantized evaluation; files go to `out` (a RunOutput)."""
    import numpy as np
    from src.data.build import data_description
    from src.distributed import all_gather, calibration_shard, gather_counts, sharding_calibration
    from src.engine import build_model, resolve_checkpoint
    from src.quant import (calibrate_model, layer_report, model_size_mb, quantize_model, save_quantized_checkpoint,
                           size_breakdown)
    from src.quant.convert import freeze_weights
    from src.quant.vtptq_plus import SWITCHES
    from src.sharded import evaluate_sharded, sync_calibration
    from src.utils import atomic_write_json
    if dist.is_main:
        save_config(cfg, out.path("config.yaml"))
    workers = f", {dist.size} workers (this is rank {dist.rank})" if dist.enabled else ""
    print(f"{cfg['name']}: {cfg['model']} {cfg['method']} W{cfg['w_bits']}A{cfg['a_bits']}, "
          f"{len(calib_images)} calibration images, {len(dataset)} evaluation images{workers}", flush=True)
    fp = fp_reference(cfg, dataset, lambda: build_model(cfg))

    t0, cpu0 = time.time(), time.process_time()
    layer_bits, mp_report, mp_target_mb = None, None, None
    with calibration_shard(calib_images, shardable, batch_size=cfg["calib_batch_size"]) as my_images:
        sharded = sharding_calibration()  # under msrun: this rank's whole calibration batches
        if cfg.get("mixed_precision"):
            layer_bits, mp_report, mp_target_mb = mixed_precision_bits(cfg, my_images, lambda: build_model(cfg))
        model = build_model(cfg)  # a fresh instance: the FP one may hold a compiled graph
        fp_size = model_size_mb(model, quantized=False)
        quantize_model(model, cfg, layer_bits)
        calib_report = calibrate_model(model, my_images, cfg, log=sys.stderr, quiet=bool(cfg.get("quiet")))
    calib_per_rank = gather_counts(len(my_images))  # the images each rank forwarded
    sync_diff = sync_calibration(model)  # every rank evaluates rank 0's calibration
    calib_seconds = time.time() - t0
    calib_cpu_seconds = time.process_time() - cpu0
    print(f"calibrated in {calib_seconds:.1f}s", flush=True)
    ckpt_path = out.final_path("quantized.ckpt")
    if dist.is_main:
        save_quantized_checkpoint(model, out.path("quantized.ckpt"), cfg["model"], extra_meta={
            "method": cfg["method"], "w_bits": cfg["w_bits"], "a_bits": cfg["a_bits"]})
    freeze_weights(model)  # the intervals are final: quantize the weights once for the evaluation
    res = evaluate_sharded(model, dataset, cfg["batch_size"], num_workers=cfg["num_workers"], keep_predictions=True,
                           desc="quantized eval")
    agreement = fp_agreement(fp.get("top1_predictions"), res.pop("predictions"))
    layers, sizes = layer_report(model), size_breakdown(model)
    for name, info in calib_report.items():
        layers[name]["calibration"] = info
    result = {"model": cfg["model"], "checkpoint": resolve_checkpoint(cfg), "data": data_description(cfg),
              **{k: res[k] for k in EVAL_FIELDS}, "device_target": cfg["device_target"], "mode": cfg["mode"],
              "method": cfg["method"], "w_bits": cfg["w_bits"], "a_bits": cfg["a_bits"],
              "fp_top1": fp["top1"], "fp_top5": fp["top5"], "fp_agreement": agreement, "calib_num": len(calib_images),
              "calib_shards": dist.size if sharded else 1, "calib_images_per_rank": calib_per_rank,
              "calib_seconds": calib_seconds, "calib_cpu_seconds": calib_cpu_seconds,
              "model_size_mb": model_size_mb(model), "fp_model_size_mb": fp_size,
              "stored_size_mb": sum(sizes.values()) / 1e6, "size_breakdown": sizes,
              "quantized_checkpoint": ckpt_path, **{k: cfg[k] for k in SWITCHES},
              "weight_per_channel": cfg["weight_per_channel"], "layers": layers}
    if mp_report is not None:
        result.update(mp_target=cfg["mp_target"], mp_target_mb=mp_target_mb,
                      mp_criterion=cfg.get("mp_criterion", "paper"), mp_bits=mp_report["modules"])
        if "swaps_accepted" in mp_report:
            result.update(mp_swaps_accepted=mp_report["swaps_accepted"], mp_accept_z=cfg.get("mp_accept_z", 0.0))
        result["mixed_precision"] = mp_report
    if dist.enabled:
        result.update(num_shards=dist.size, calibration_rank_max_diff=sync_diff,
                      calib_seconds_per_rank=[float(v) for v in all_gather(np.array([calib_seconds]))[:, 0]])
    if not dist.is_main:  # rank 0 writes the files
        return result
    atomic_write_json(out.path("result.json"), result)
    if mp_report is not None:
        from src.plots import plot_bits
        plot_bits(mp_report, out.path("bits.png"), title=f"{cfg['name']}: top-1 {result['top1']:.2f}%")
    print(f"{cfg['method']} W{cfg['w_bits']}A{cfg['a_bits']}: top-1 {result['top1']:.2f}% "
          f"(FP {fp['top1']:.2f}%), {result['model_size_mb']:.2f} MB (FP {fp_size:.2f} MB) -> "
          f"{out.final_path('result.json')}", flush=True)
    return result


def run_embedded_suite(out_root="outputs/embedded_suite", variants=None, bits_list=None, overrides=None):
    """Run quant.main on the embedded model for each variant and bit width; FP is evaluated
    once and reused. variants: [(label, {config overrides})], default every method; a variant
    with mixed_precision runs once (its widths come from mp_target). Prints and writes a
    markdown table (OUT_ROOT/summary.md, rewritten after every run). Returns the results."""
    from src.distributed import barrier, context
    from src.quant import METHODS
    from src.utils import atomic_write_json, atomic_write_text
    if variants is None:
        variants = [(m, {"method": m}) for m in METHODS]
    bits_list = SUITE_BITS if bits_list is None else bits_list
    base = dict(defaults(), **(overrides or {}))
    os.makedirs(out_root, exist_ok=True)
    rows, fp_result = [], None
    lines = ["| variant | bits | top-1 | FP top-1 | delta | size MB | calib s |", "|---|---|---|---|---|---|---|"]
    for label, over in variants:
        for bits in ([None] if over.get("mixed_precision") else bits_list):
            tag = over["mp_target"] if bits is None else f"w{bits}a{bits}"
            cfg = dict(base, **over, name=f"{label}_{tag}", output=os.path.join(out_root, f"{label}_{tag}"),
                       fp_result=fp_result)
            if bits is not None:
                cfg.update(w_bits=bits, a_bits=bits)
            res = main(cfg)
            if fp_result is None:  # evaluate FP once, reuse it for the other runs
                fp_result = os.path.join(out_root, "fp_result.json")
                if context().is_main:
                    atomic_write_json(fp_result, {"model": res["model"], "checkpoint": res["checkpoint"],
                                                  "data": res["data"], "num_images": res["num_images"],
                                                  "top1": res["fp_top1"], "top5": res["fp_top5"],
                                                  "top1_predictions": LAST_FP.get("top1_predictions")})
                barrier()  # the other ranks read it in the next run
            rows.append(res)
            bits_txt = res.get("mp_target") or f"W{res['w_bits']}A{res['a_bits']}"
            lines.append(f"| {label} | {bits_txt} | {res['top1']:.2f} | {res['fp_top1']:.2f} | "
                         f"{res['top1'] - res['fp_top1']:+.2f} | {res['model_size_mb']:.3f} | "
                         f"{res['calib_seconds']:.1f} |")
            if context().is_main:
                atomic_write_text(os.path.join(out_root, "summary.md"), "\n".join(lines) + "\n")
    table = "\n".join(lines)
    print("\n" + table + f"\n\n(written to {out_root}/summary.md)")
    return rows


def cli(argv=None):
    from src.utils import run_cli
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        return run_cli(run_embedded_suite)
    def run():
        args = build_parser().parse_args(argv)
        cfg = resolve(args)
        cfg["quiet"] = args.quiet  # a display setting: not a config key, not saved
        return main(cfg)
    return run_cli(run)


if __name__ == "__main__":
    sys.exit(cli())
