"""Before an msrun launch: do NUM_WORKERS workers fit the data that ENTRY's flags name?

    python scripts/check_workers.py NUM_WORKERS ENTRY [ENTRY flags...]     (ENTRY: eval.py or quant.py)

Every worker evaluates a shard of at least one whole batch (src.api.shard_indices;
calibration shares its batches when there are enough of them, else every worker calibrates on
all images); more workers than evaluation batches, or a flag or config that ENTRY would
refuse, is one line `error: ...` and exit status 2, before msrun starts any worker (msrun
itself would end with its launcher's traceback). Used by
scripts/run_{eval,quant}_distribute_*.sh; exit 0 prints nothing.
"""
import importlib
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("GLOG_v", "3")


def check(workers, entry, argv):
    """Raise a one-line error (ValueError/ConfigError) if `workers` workers do not fit."""
    from src.api import (ConfigError, build_eval_dataset, check_config, get_data_config, quantized_checkpoint_model,
                         resolve, resolve_switches, shard_indices)
    if entry not in ("eval.py", "quant.py"):
        raise ConfigError(f"ENTRY is {entry!r}; expected eval.py or quant.py")
    module = importlib.import_module(entry[:-3])
    cfg = check_config(resolve(module.build_parser().parse_args(argv)))
    if entry == "eval.py":
        quantized_checkpoint_model(cfg)  # a quantized checkpoint names its model
    dataset = build_eval_dataset(cfg, get_data_config(cfg["model"]))
    shard_indices(len(dataset), 0, workers, cfg["batch_size"])  # more workers than batches: a one-line ValueError
    if entry == "quant.py":
        resolve_switches(cfg)  # impossible switch combinations: a one-line error


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or not argv[0].isdigit() or int(argv[0]) < 1:
        print("error: usage: python scripts/check_workers.py NUM_WORKERS ENTRY [ENTRY flags...] (NUM_WORKERS >= 1)",
              file=sys.stderr)
        return 2
    from src.api import run_cli
    return run_cli(check, int(argv[0]), argv[1], argv[2:])


if __name__ == "__main__":
    sys.exit(main())
