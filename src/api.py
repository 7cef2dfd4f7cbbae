"""The public API for scripts (bench/, scripts/, notebooks): everything a script needs to build a
full-precision model, load calibration images, quantize, calibrate and evaluate it, and save,
load and export the result, without reaching into the modules that implement it. bench/ and
scripts/ import from src/ only this module (tests/test_layers.py checks it); the names below
keep their meaning across refactors of the modules behind them.

    from src.api import create_model, default_checkpoint, defaults, quantize_model, calibrate_model, \\
        load_calibration_images, get_data_config, set_quant_mode, evaluation_model

    cfg = dict(defaults(), model="deit_fmnist", method="vtptq", w_bits=6, a_bits=6)
    model = create_model(cfg["model"], checkpoint=default_checkpoint(cfg["model"]))
    quantize_model(model, cfg)
    calibrate_model(model, load_calibration_images(cfg, get_data_config(cfg["model"])), cfg)
    set_quant_mode(model, "quantized")
"""
# configuration: the schema's defaults, YAML files, checked values
from .config import ConfigError, check_config, defaults, load_yaml, resolve
# files and the command-line wrapper of the entry points
from .utils import (UserError, atomic_save_npz, atomic_write_json, atomic_write_text, run_cli, save_checkpoint_atomic,
                    write_bench_json)
# full-precision models
from .models import create_model, get_data_config, list_models, register_model
from .models.registry import default_checkpoint
from .models.weights import save_mindspore_checkpoint
# data: the embedded Fashion-MNIST set, calibration images, evaluation data sets
from .data.build import build_eval_dataset, load_calibration_images
from .data.fmnist import (FMNIST_SYSTEM_DIR, VAL_IMAGES, VAL_SEED, embedded_path, load_embedded, load_idx_split,
                          normalize, val_indices)
# quantization and calibration
from .quant import (METHODS, calibrate_model, layer_report, model_size_mb, quant_cells, quantize_model,
                    register_method, set_quant_mode, size_breakdown, stored_size_mb)
from .quant.calibrate import model_stages
from .quant.search import set_search_threads
from .quant.vtptq import ranking_loss, ranking_loss_all_pairs, ranking_loss_reference, sample_pairs
from .quant.vtptq_plus import SWITCHES, resolve_switches
# save, load and export
from .quant.convert import evaluation_model, load_quantized_checkpoint, save_quantized_checkpoint
from .export.onnx import export_onnx
from .export.mindir import export_mindir
from .export.ort_run import run_on_cpu
# evaluation: device set-up, the evaluation loop, models from a run's config, msrun workers
from .engine import build_model, evaluate, predict, quantized_checkpoint_model, resolve_checkpoint, setup_context
from .distributed import init_distributed, shard_indices
from .sharded import evaluate_sharded
# figures
from .plots import plot_accuracy_size, plot_bits, plot_pair_grid

__all__ = [
    "ConfigError", "check_config", "defaults", "load_yaml", "resolve",
    "UserError", "atomic_save_npz", "atomic_write_json", "atomic_write_text", "run_cli", "save_checkpoint_atomic",
    "write_bench_json",
    "create_model", "get_data_config", "list_models", "register_model", "default_checkpoint",
    "save_mindspore_checkpoint",
    "build_eval_dataset", "load_calibration_images", "FMNIST_SYSTEM_DIR", "VAL_IMAGES", "VAL_SEED", "embedded_path",
    "load_embedded", "load_idx_split", "normalize", "val_indices",
    "METHODS", "calibrate_model", "layer_report", "model_size_mb", "quant_cells", "quantize_model",
    "set_search_threads",
    "register_method", "set_quant_mode", "size_breakdown", "stored_size_mb", "model_stages", "ranking_loss", "ranking_loss_all_pairs", "ranking_loss_reference",
    "sample_pairs", "SWITCHES", "resolve_switches",
    "evaluation_model", "load_quantized_checkpoint", "save_quantized_checkpoint", "export_onnx", "export_mindir",
    "run_on_cpu",
    "build_model", "evaluate", "predict", "quantized_checkpoint_model", "resolve_checkpoint", "setup_context",
    "init_distributed", "shard_indices", "evaluate_sharded",
    "plot_accuracy_size", "plot_bits", "plot_pair_grid",
]
