"""Model registry: `register_model` decorator, `create_model(name, ...)` factory, and the
per-model data configuration (input size, normalization, crop ratio, interpolation)."""
import os

from .vit import VisionTransformer

_MODELS = {}
_DATA_CFGS = {}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INCEPTION_MEAN = (0.5, 0.5, 0.5)
INCEPTION_STD = (0.5, 0.5, 0.5)
FMNIST_MEAN = (0.2860,)
FMNIST_STD = (0.3530,)


def register_model(data_cfg):
    """Register a model factory under its function name, with its evaluation data config."""

    def wrap(fn):
        _MODELS[fn.__name__] = fn
        _DATA_CFGS[fn.__name__] = dict(data_cfg)
        return fn

    return wrap


def list_models():
    return sorted(_MODELS)


def get_data_config(name):
    """Evaluation preprocessing of a registered model: dict with input_size (C, H, W), mean,
    std, crop_pct, interpolation, dataset."""
    _check_name(name)
    return dict(_DATA_CFGS[name])


def _check_name(name):
    if name not in _MODELS:
        raise ValueError(f"unknown model '{name}'; expected one of: {', '.join(list_models())}")


def create_model(name, num_classes=None, checkpoint=None, drop_head=False, **kwargs):
    """Build a registered model; optionally load weights.

    num_classes: None keeps the model's default (1000 for ImageNet models); a different
    value than the checkpoint's head is an error unless `drop_head` is set, in which case
    the head stays freshly initialized.
    checkpoint: path of a .ckpt, .safetensors, .npz or .pth file (see src.models.weights).
    """
    _check_name(name)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = _MODELS[name](**kwargs)
    model.model_name = name
    if checkpoint:
        from .weights import load_checkpoint_into
        load_checkpoint_into(model, checkpoint, drop_head=drop_head)
    return model


def _deit_cfg(size=224, crop_pct=0.875):
    return dict(input_size=(3, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                crop_pct=crop_pct, interpolation="bicubic", dataset="imagenet")


def _vit_cfg(size=224, crop_pct=0.9):
    return dict(input_size=(3, size, size), mean=INCEPTION_MEAN, std=INCEPTION_STD,
                crop_pct=crop_pct, interpolation="bicubic", dataset="imagenet")


@register_model(_deit_cfg())
def deit_tiny_patch16_224(**kw):
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, embed_dim=192, depth=12, num_heads=3), **kw})


@register_model(_deit_cfg())
def deit_small_patch16_224(**kw):
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6), **kw})


@register_model(_deit_cfg())
def deit_base_patch16_224(**kw):
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kw})


@register_model(_deit_cfg(384, 1.0))
def deit_base_patch16_384(**kw):
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kw})


@register_model(_vit_cfg())
def vit_base_patch16_224(**kw):
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kw})


@register_model(_vit_cfg(384, 1.0))
def vit_base_patch16_384(**kw):
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, embed_dim=768, depth=12, num_heads=12), **kw})


@register_model(_vit_cfg())
def vit_large_patch16_224(**kw):
    return VisionTransformer(**{**dict(img_size=224, patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kw})


@register_model(_vit_cfg(384, 1.0))
def vit_large_patch16_384(**kw):
    return VisionTransformer(**{**dict(img_size=384, patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kw})


@register_model(dict(input_size=(1, 28, 28), mean=FMNIST_MEAN, std=FMNIST_STD, crop_pct=1.0,
                     interpolation="bicubic", dataset="fmnist"))
def deit_fmnist(**kw):
    """The embedded default: a DeiT-style ViT for 28x28 Fashion-MNIST (patch 7, 16 tokens + cls)."""
    return VisionTransformer(**{**dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=128,
                                       depth=4, num_heads=4), **kw})


_ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "assets")
_DEFAULT_CHECKPOINTS = {"deit_fmnist": "deit_fmnist.ckpt"}


def default_checkpoint(name):
    """Path of the checkpoint the repository carries for `name` (the embedded model), else None."""
    fname = _DEFAULT_CHECKPOINTS.get(name)
    return None if fname is None else os.path.join(_ASSETS, fname)
