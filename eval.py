"""Evaluate a ViT/DeiT model (full precision or a quantized checkpoint) on ImageNet or on the
embedded Fashion-MNIST test split.

With no arguments it evaluates the embedded model `deit_fmnist` on the 10,000 embedded test
images. Results go to OUTPUT/result.json next to the resolved OUTPUT/config.yaml.

Examples:
  python eval.py
  python eval.py --config configs/deit_small_fp.yaml --data /data/imagenet --ckpt deit_small.safetensors
  python eval.py --model deit_base_patch16_224 --ckpt deit_base.ckpt --data /data/imagenet --batch-size 64
  python eval.py --ckpt outputs/<run>/quantized.onnx       # an exported model (export.py), onnxruntime
  msrun --worker_num=2 --local_worker_num=2 --master_port=8118 --join=True eval.py --max-images 1000
      (data-parallel: each worker evaluates a shard; rank 0 writes the result)
"""
import argparse
import os
import sys

os.environ.setdefault("GLOG_v", "3")  # MindSpore: warnings and errors only from its C++ side

from src.config import ArgumentParser, add_arguments, output_dir, resolve, save_config  # noqa: E402

EVAL_KEYS = ["model", "ckpt", "data", "split", "batch_size", "device_target", "mode", "output", "name",
             "num_classes", "drop_head", "num_workers", "crop_pct", "interpolation", "skip_bad_images",
             "max_images", "save_predictions", "seed"]


def build_parser():
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML file of config keys (see src/config.py); flags override it")
    add_arguments(p, EVAL_KEYS)
    return p


def main(cfg):
    """Evaluate per the resolved config dict; writes result.json and config.yaml; returns the result."""
    from src.data.build import build_eval_dataset, check_output_location, data_description
    from src.distributed import init_distributed, shard_indices
    from src.engine import (build_model, quantized_checkpoint_model, resolve_checkpoint, setup_context,
                            write_predictions_csv)
    from src.models import get_data_config
    from src.run_folder import RunOutput
    from src.sharded import evaluate_sharded
    from src.utils import atomic_write_json, check_writable_file

    quantized_checkpoint_model(cfg)  # a quantized checkpoint (or an exported model) names its model
    check_output_location(cfg, output_dir(cfg, "eval"))  # not inside the data, not over the --ckpt
    setup_context(cfg["device_target"], cfg["mode"], cfg["seed"])  # an unavailable device: an error now
    dist = init_distributed(cfg["device_target"])  # msrun workers: rank, size; else a group of one
    if dist.is_main:
        check_writable_file(cfg.get("save_predictions"), "--save-predictions")
    # the data first: a model/data mismatch or a missing folder fails before a large model is built
    dataset = build_eval_dataset(cfg, get_data_config(cfg["model"]))
    shard_indices(len(dataset), dist.rank, dist.size, cfg["batch_size"])  # more workers than batches: an error now
    # the run is written into a new folder beside OUTPUT and swapped in when it ends well
    # (rank 0 only); a failure leaves OUTPUT as it was (src.run_folder.RunOutput)
    with RunOutput(output_dir(cfg, "eval"), enabled=dist.is_main) as out:
        if dist.is_main:
            save_config(cfg, out.path("config.yaml"))
        if resolve_checkpoint(cfg) is None and dist.is_main:
            print(f"warning: no --ckpt given: {cfg['model']} is evaluated with random weights", file=sys.stderr)
        model = build_model(cfg)
        workers = f", {dist.size} workers (this is rank {dist.rank})" if dist.enabled else ""
        print(f"evaluating {cfg['model']} on {data_description(cfg)}: {len(dataset)} images, "
              f"batch {cfg['batch_size']}, {cfg['device_target']} {cfg['mode']} mode{workers}", flush=True)
        res = evaluate_sharded(model, dataset, cfg["batch_size"], num_workers=cfg["num_workers"],
                               keep_predictions=bool(cfg.get("save_predictions")))
        predictions = res.pop("predictions", None)
        result = {"model": cfg["model"], "checkpoint": resolve_checkpoint(cfg), "data": data_description(cfg),
                  **res, "batch_size": cfg["batch_size"], "device_target": cfg["device_target"], "mode": cfg["mode"]}
        result["num_shards"] = dist.size
        if not dist.is_main:  # rank 0 writes the files
            return result
        if predictions is not None:
            result["predictions_file"] = cfg["save_predictions"]
        # the result first: a predictions file that cannot be written does not lose it
        atomic_write_json(out.path("result.json"), result)
        if predictions is not None:
            write_predictions_csv(out.redirect(cfg["save_predictions"]), predictions)
    print(f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  on {result['num_images']} images "
          f"({result['skipped_images']} skipped), {result['images_per_second']:.1f} img/s -> "
          f"{out.final_path('result.json')}")
    return result


def cli(argv=None):
    from src.utils import run_cli
    return run_cli(lambda: main(resolve(build_parser().parse_args(argv))))


if __name__ == "__main__":
    sys.exit(cli())
