"""Build the evaluation data set and calibration images named by a config."""
import os

from .fmnist import EmbeddedFMNIST


def data_transform_config(cfg, model_data_cfg):
    """The model's preprocessing with the config's overrides (crop_pct, interpolation)."""
    out = dict(model_data_cfg)
    for key in ("crop_pct", "interpolation"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    return out


def is_embedded(cfg):
    return cfg.get("data") in (None, "", "embedded")


def eval_split(cfg):
    """The evaluation split: cfg['split'], else 'test' for the embedded data and 'val' for an
    ImageNet root. The embedded data has 'test' (10,000 images, reported) and 'val' (5,000
    training images outside the calibration pool, on which settings are chosen)."""
    split = cfg.get("split")
    if not is_embedded(cfg):
        return split or "val"
    split = split or "test"
    if split not in ("test", "val"):
        raise ValueError(f"split is {split!r}; the embedded data has the splits 'test' and 'val'")
    return split


def build_eval_dataset(cfg, model_data_cfg):
    """The evaluation split named by cfg['data'] / cfg['split'] (eval_split) with the model's
    preprocessing.

    'embedded' gives a Fashion-MNIST split carried in assets/ (only for models whose data config
    says dataset 'fmnist'); anything else is an ImageNet root."""
    tcfg = data_transform_config(cfg, model_data_cfg)
    if is_embedded(cfg):
        if tcfg.get("dataset") != "fmnist":
            raise ValueError(f"data 'embedded' is Fashion-MNIST, which model "
                             f"'{cfg['model']}' does not take; give --data IMAGENET_ROOT")
        return EmbeddedFMNIST(eval_split(cfg), tcfg["mean"], tcfg["std"], max_images=cfg.get("max_images"))
    from .imagenet import ImageFolderDataset, build_eval_transform
    if tcfg.get("dataset") != "imagenet":
        raise ValueError(f"model '{cfg['model']}' takes the embedded Fashion-MNIST data, not an "
                         f"ImageNet folder ({cfg['data']})")
    transform = build_eval_transform(tcfg["input_size"], tcfg["mean"], tcfg["std"],
                                     crop_pct=tcfg["crop_pct"], interpolation=tcfg["interpolation"])
    ds = ImageFolderDataset(cfg["data"], eval_split(cfg), transform=transform,
                            skip_bad_images=cfg.get("skip_bad_images", False))
    if cfg.get("max_images") is not None:
        ds.samples = ds.samples[:cfg["max_images"]]
    return ds


def data_description(cfg):
    if is_embedded(cfg):
        return f"embedded:fmnist_{eval_split(cfg)}"
    return os.path.join(cfg["data"], eval_split(cfg))


def load_calibration_images(cfg, model_data_cfg):
    """cfg['calib_num'] images drawn with cfg['calib_seed'] through the evaluation transform:
    float32 (N, C, H, W). The embedded data draws from its calibration split (training images);
    an ImageNet root from cfg['calib_split'] (default train)."""
    import numpy as np
    tcfg = data_transform_config(cfg, model_data_cfg)
    num, seed = cfg["calib_num"], cfg["calib_seed"]
    if is_embedded(cfg):
        ds = EmbeddedFMNIST("calib", tcfg["mean"], tcfg["std"])
        if num > len(ds):
            raise ValueError(f"calib_num is {num}; the embedded calibration split ({ds.root}) has {len(ds)} images")
        idx = np.sort(np.random.default_rng(seed).choice(len(ds), num, replace=False))
        return ds.arrays(idx)[0]
    from .imagenet import build_eval_transform, calibration_subset
    transform = build_eval_transform(tcfg["input_size"], tcfg["mean"], tcfg["std"],
                                     crop_pct=tcfg["crop_pct"], interpolation=tcfg["interpolation"])
    images, _ = calibration_subset(cfg["data"], split=cfg["calib_split"], num=num, seed=seed, transform=transform,
                                   skip_bad_images=cfg.get("skip_bad_images", False),
                                   num_workers=cfg.get("num_workers", 2))
    return images


def check_output_location(cfg, output):
    """Outputs that would harm an input, refused before any work (a UserError):
    - the run folder `output` or the --save-predictions file inside the ImageNet root (the run's
      folder would become a class folder of the data set, and every later run on it fail);
    - a --ckpt inside `output` (the run replaces that folder, the checkpoint with it)."""
    from ..utils import UserError, is_inside
    root = None if is_embedded(cfg) else cfg["data"]
    for what, path in (("--output", output), ("--save-predictions", cfg.get("save_predictions"))):
        if root and path and is_inside(path, root):
            raise UserError(f"{what} {path} is inside the data root {root}; it would become part of the data set: "
                            "give a path outside it")
    if cfg.get("ckpt") and output and is_inside(cfg["ckpt"], output):
        raise UserError(f"--output {output} holds the --ckpt {cfg['ckpt']}, and the run replaces that folder whole; "
                        "give another --output")
