"""Experiment configuration: one flat YAML per experiment, defaults in one place.

Precedence: DEFAULTS < the YAML file given with --config < command-line flags. A key in
the YAML that is not in DEFAULTS is an error, as is a value of the wrong type. The resolved
configuration is written next to the results of every run (`config.yaml`).
"""
import argparse
import math
import os

import yaml

from .utils import atomic_write_text, short_repr

# Every key, its default and what it means. Flags are the keys with '-' for '_'.
DEFAULTS = {
    # what to run on
    "name": (None, "run name; outputs go to outputs/<name>/ unless --output is given"),
    "model": ("deit_fmnist", "registered model name (see src/models/registry.py)"),
    "ckpt": (None, "weights: .ckpt, .safetensors, .npz or .pth (None: the embedded model's checkpoint "
                   "for deit_fmnist, random weights otherwise)"),
    "num_classes": (None, "override the number of classes of the model"),
    "drop_head": (False, "load a checkpoint without its classifier head (num_classes differs)"),
    "data": ("embedded", "'embedded' (the Fashion-MNIST copy in assets/) or an ImageNet root with train/ and val/"),
    "split": (None, "evaluation split: a folder of the ImageNet root (null: val); for the embedded data test (null) "
                    "or val, 5,000 training images outside the calibration pool on which settings are chosen"),
    "batch_size": (100, "evaluation batch size"),
    "num_workers": (2, "image decoding threads"),
    "crop_pct": (None, "center-crop ratio (None: the model's default, 0.875 for DeiT at 224)"),
    "interpolation": (None, "resize filter: bicubic, bilinear, nearest, lanczos (None: the model's default)"),
    "skip_bad_images": (False, "skip unreadable images (counted in skipped_images) instead of failing"),
    "max_images": (None, "evaluate only the first N images (quick checks)"),
    "save_predictions": (None, "write per-image top-5 predictions to this CSV file"),
    # where and how
    "device_target": ("CPU", "CPU, GPU or Ascend"),
    "mode": ("graph", "graph or pynative"),
    "output": (None, "output folder for result.json and config.yaml (default outputs/<name>/)"),
    "seed": (0, "global random seed"),
    # quantization (quant.py)
    "method": ("minmax", "calibration method: minmax, percentile, easyquant, vtptq (the paper's), vtptq_plus "
                         "(vtptq with the switches below on)"),
    "w_bits": (8, "weight bit width (2..16)"),
    "a_bits": (8, "activation bit width (2..16)"),
    "weight_per_channel": (False, "one weight interval per output channel instead of per tensor"),
    "softmax_unsigned": (False, "unsigned grid [0, 2^b-1] for the softmax output (matmul2's first operand)"),
    "quantize_head": (False, "quantize the classifier head (the paper is silent; floating point by default)"),
    "quantize_patch_embed": (True, "quantize the patch-embedding projection"),
    "quantize_matmul1": (True, "quantize both operands of Q·Kᵀ"),
    "quantize_matmul2": (True, "quantize both operands of attn·V"),
    "calib_num": (32, "number of calibration images (the paper uses 1000)"),
    "calib_seed": (0, "seed of the calibration image draw"),
    "calib_split": ("train", "split the calibration images come from (ImageNet root; the embedded data has its own)"),
    "calib_batch_size": (32, "batch size of the calibration forward passes"),
    "calib_threads": (0, "threads of the interval search (candidate chunks run in parallel; 0: one per available "
                          "core, at most 8; 1: single-threaded); the intervals are the same for any number"),
    "calib_input": ("quantized", "input a layer sees during its calibration: 'quantized' (through the "
                                 "already-quantized layers) or 'fp'"),
    "percentile": (99.99, "percentile of |T| for the percentile method"),
    "search_alpha": (0.5, "interval search: lowest candidate, as a fraction of the max-based interval"),
    "search_beta": (1.2, "interval search: highest candidate, as a fraction of the max-based interval"),
    "search_candidates": (100, "interval search: number of candidates"),
    "search_rounds": (2, "interval search: alternation rounds (easyquant)"),
    "max_rounds": (20, "vtptq: at most this many rounds; stops earlier when the objective stops improving"),
    "ranking_loss": (True, "vtptq: ranking-aware loss on the attention scores of Q·Kᵀ"),
    "ranking_gamma": (0.1, "vtptq: weight γ of the ranking loss"),
    "ranking_theta": (0.2, "vtptq: margin θ of the ranking loss"),
    "ranking_pairs": (0, "vtptq: column pairs per attention row in the ranking loss (0: all T(T-1)/2; "
                         "N: a fixed seeded sample of N pairs)"),
    "mixed_precision": (False, "vtptq (vtptq_plus: with mp_criterion refined): one bit width per MSA / MLP module "
                               "chosen by the nuclear-norm-weighted error under a size target (w_bits / a_bits then "
                               "come from mp_target)"),
    "mp_target": ("6MP", "mixed-precision target: 4MP (bits 2..6, size of the uniform 4-bit model), "
                         "6MP (4..8, 6-bit size), 8MP (6..10, 8-bit size)"),
    "mp_min_bits": (None, "mixed precision, beyond the paper: leave out candidate widths below this (e.g. 3 keeps "
                          "4MP from giving a module 2 bits); None: the target's candidates"),
    "mp_criterion": ("paper", "mixed-precision criterion: 'paper' (nuclear-norm-weighted output error per module, "
                              "other modules in FP, exact knapsack) or 'refined' (beyond the paper: end-to-end KL of "
                              "the logits on the calibration set, knapsack then a local search of bit swaps); "
                              "vtptq_plus: refined only"),
    "mp_accept_z": (0.0, "refined criterion: keep a move only if its mean per-image KL gain exceeds this many "
                         "standard errors (a paired test over the calibration images; 0: any gain above a "
                         "hundredth of the loss, the rule chosen on val, docs/results.md)"),
    "bias_correction": (True, "vtptq: subtract the expected output error per channel from the bias after each round"),
    # vtptq_plus switches (src/quant/vtptq_plus.py); None: the method's default, off for vtptq, on for vtptq_plus
    "ln_reparam": (None, "vtptq_plus: fold per-channel centres and ranges of the qkv / fc1 inputs into the LayerNorm "
                         "and the next layer (one activation interval per tensor remains)"),
    "softmax_quantizer": (None, "vtptq_plus: grid of the softmax output: uniform, log2, logsqrt2, or auto (per layer, "
                                "the best of the three on the calibration objective)"),
    "gelu_asymmetric": (None, "vtptq_plus: asymmetric grid with a zero point for the post-GELU input of mlp.fc2"),
    "weight_channel_search": (None, "vtptq_plus: per-output-channel weight intervals, each searched on the layer's "
                                    "Pearson objective (implies weight_per_channel)"),
    "attn_reparam": (None, "vtptq_plus: fold per-channel factors into Q/K (Q·s, K/s) and V/attn.proj (V/t, proj·t), "
                           "each chosen per block on the calibration images; None: the method's default)"),
    "recon_iters": (None, "vtptq_plus: Adam steps of learned weight rounding per layer (AdaRound-style, layer-wise "
                          "MSE, gated by held-out calibration images; 0: off; None: 0, the default of both methods)"),
    "block_recon_iters": (None, "vtptq_plus: Adam steps of block-wise reconstruction (BRECQ-style: the rounding of a "
                                "block's four weights learned against its FP output, activations quantized, gated "
                                "by held-out calibration images; 0: off; None: 0, the default of both methods)"),
    "fp_result": (None, "reuse this result.json of an FP eval (same model, checkpoint, data) instead of "
                        "evaluating the FP model again"),
}

CHOICES = {
    "device_target": ("CPU", "GPU", "Ascend"),
    "mode": ("graph", "pynative"),
    "interpolation": (None, "bicubic", "bilinear", "nearest", "lanczos"),
    "method": ("minmax", "percentile", "easyquant", "vtptq", "vtptq_plus"),
    "softmax_quantizer": (None, "uniform", "log2", "logsqrt2", "auto"),
    "mp_target": ("4MP", "6MP", "8MP"),
    "mp_criterion": ("paper", "refined"),
    "calib_input": ("quantized", "fp"),
}

# Inclusive bounds (None: unbounded) of numeric keys.
# Upper bounds keep one value from asking for unbounded memory or threads (a batch is
# allocated whole, each decoding thread holds images, each candidate a copy of a tensor;
# calibration images are held in memory together: ImageNet-1k's train split has 1,281,167).
RANGES = {"batch_size": (1, 65536), "max_images": (1, None), "num_workers": (0, 64), "num_classes": (1, 1_000_000),
          "w_bits": (2, 16), "a_bits": (2, 16), "calib_num": (1, 2_000_000), "calib_batch_size": (1, 65536),
          "seed": (0, 2 ** 32 - 1), "calib_seed": (0, 2 ** 32 - 1),
          "percentile": (0.0, 100.0), "search_alpha": (0.0, None), "search_beta": (0.0, None),
          "search_candidates": (1, 10000), "search_rounds": (1, 1000), "max_rounds": (1, 1000),
          "ranking_gamma": (0.0, None), "ranking_theta": (0.0, None), "ranking_pairs": (0, None), "crop_pct": (0.1, 2.0),
          "mp_min_bits": (2, 16), "calib_threads": (0, 256), "mp_accept_z": (0.0, 100.0), "recon_iters": (0, 100000),
          "block_recon_iters": (0, 100000)}

# Keys whose lower bound is excluded (a value must be above it).
OPEN_LOW = {"percentile", "search_alpha"}

# Largest YAML config file read (a config is a few hundred bytes).
MAX_CONFIG_BYTES = 1 << 20

# Keys whose default is None but which hold a given type when set.
TYPES = {"ckpt": str, "split": str, "num_classes": int, "name": str, "crop_pct": float, "interpolation": str,
         "max_images": int, "save_predictions": str, "output": str, "fp_result": str,
         "mp_min_bits": int, "ln_reparam": bool, "softmax_quantizer": str, "gelu_asymmetric": bool,
         "weight_channel_search": bool, "recon_iters": int,
         "attn_reparam": bool, "block_recon_iters": int}


class ConfigError(ValueError):
    """A bad configuration value; the message names the file or flag, the key and what is allowed."""


def defaults():
    return {k: v for k, (v, _) in DEFAULTS.items()}


def _expected_type(key):
    if key in TYPES:
        return TYPES[key]
    default = DEFAULTS[key][0]
    return type(default) if default is not None else None


def check_value(key, value, source):
    """Type, finiteness, choice and range check of one value; ints are accepted where floats
    are expected. Messages are one line (a long value is shortened)."""
    if key not in DEFAULTS:
        raise ConfigError(f"{source}: unknown key {short_repr(key)} (known keys: {', '.join(sorted(DEFAULTS))})")
    if value is None:
        return value
    typ = _expected_type(key)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if typ is not None and not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise ConfigError(f"{source}: key '{key}' expects {typ.__name__}, got {short_repr(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{key}' is {value!r}; expected a finite number")
    if key in CHOICES and value not in CHOICES[key]:
        allowed = ", ".join(str(c) for c in CHOICES[key] if c is not None)
        raise ConfigError(f"{source}: key '{key}' is {short_repr(value)}; expected one of {allowed}")
    if key in RANGES:
        low, high = RANGES[key]
        open_low = key in OPEN_LOW
        if (low is not None and (value <= low if open_low else value < low)) or (high is not None and value > high):
            first = f"> {low}" if open_low else f">= {low}"
            bounds = (f"{first} and <= {high}" if open_low else f"from {low} to {high}") if high is not None else first
            raise ConfigError(f"{source}: key '{key}' is {value!r}; expected a value {bounds}")
    return value


def check_config(cfg):
    """Checks that involve several keys, run on the resolved config before any work."""
    if cfg.get("search_alpha") is not None and cfg.get("search_beta") is not None \
            and not cfg["search_alpha"] < cfg["search_beta"]:
        raise ConfigError(f"search_alpha ({cfg['search_alpha']}) must be below search_beta ({cfg['search_beta']}): "
                          "the candidates span [search_alpha, search_beta] times the max-based interval")
    return cfg


class _NoAliases(yaml.SafeLoader):
    """safe_load without anchors and aliases: a flat config never needs them, and a few
    hundred bytes of nested aliases expand to gigabytes (a 'billion laughs')."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.YAMLError(f"aliases (*name) are not allowed, line {mark.line + 1}")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        """A key given twice is an error naming both lines (PyYAML would keep the last value)."""
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                try:
                    if key in seen:
                        raise DuplicateKeyError(key, seen[key], line)
                    seen[key] = line
                except TypeError:  # an unhashable key: the base class reports it
                    continue
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.YAMLError):
    def __init__(self, key, first, second):
        super().__init__(f"key {short_repr(key)} is given twice (lines {first} and {second})")
        self.key, self.first, self.second = key, first, second


def load_yaml(path):
    """Read a flat YAML mapping and check every key against DEFAULTS."""
    if not os.path.isfile(path):
        raise ConfigError(f"{path}: config file not found")
    size = os.path.getsize(path)
    if size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {size} bytes; a config file is a flat mapping of at most {MAX_CONFIG_BYTES} bytes")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.load(f, Loader=_NoAliases)  # noqa: S506 - a SafeLoader without aliases
    except DuplicateKeyError as e:
        raise ConfigError(f"{path}: {e}; give each key once") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({short_repr(str(e).strip().splitlines()[0], 200)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply for a flat config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a flat mapping of keys to values, got {type(data).__name__}")
    return {k: check_value(k, v, path) for k, v in data.items()}


class ArgumentParser(argparse.ArgumentParser):
    """A bad flag (unknown flag, wrong type, unknown choice) is reported like a bad value: a
    ConfigError, printed by run_cli as one 'error: ...' line with exit status 2, instead of
    argparse's usage text and SystemExit."""

    def error(self, message):
        raise ConfigError(message)


def add_arguments(parser, keys):
    """Add a --flag for each key (defaults None so that only given flags override)."""
    for key in keys:
        default, help_text = DEFAULTS[key]
        flag = "--" + key.replace("_", "-")
        typ = _expected_type(key)
        if typ is bool:
            parser.add_argument(flag, dest=key, action=argparse.BooleanOptionalAction, default=None,
                                help=f"{help_text} (default {default})")
        else:
            choices = [c for c in CHOICES.get(key, ()) if c is not None] or None
            parser.add_argument(flag, dest=key, type=typ or str, default=None, choices=choices,
                                metavar=None if choices else key.upper(), help=f"{help_text} (default {default})")


def resolve(args):
    """DEFAULTS < YAML (args.config) < flags given on the command line."""
    cfg = defaults()
    given = set()
    if getattr(args, "config", None):
        from_yaml = load_yaml(args.config)
        cfg.update(from_yaml)
        given.update(from_yaml)
        cfg["config_file"] = args.config
    for key in DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            cfg[key] = check_value(key, value, "--" + key.replace("_", "-"))
            given.add(key)
    cfg["given_keys"] = sorted(given)  # keys set by the YAML or a flag (not saved with the config)
    return check_config(cfg)


def output_dir(cfg, kind):
    """The run's output folder: cfg['output'] or outputs/<name or model_kind>/ (not created:
    src.run_folder.RunOutput writes the run beside it and swaps it in at the end)."""
    return cfg.get("output") or os.path.join("outputs", cfg.get("name") or f"{cfg['model']}_{kind}")


def save_config(cfg, path):
    """Write the resolved config (only schema keys, in schema order) as YAML."""
    body = {k: cfg[k] for k in DEFAULTS if k in cfg}
    atomic_write_text(path, yaml.safe_dump(body, sort_keys=False))
