"""Helpers shared by the test files (importable because pytest puts tests/ on sys.path)."""
import contextlib
import math

import numpy as np
from mindspore import Tensor

FMNIST_DATA_CFG = dict(input_size=(1, 28, 28), mean=(0.5,), std=(0.5,), crop_pct=1.0, interpolation="bicubic",
                       dataset="fmnist")


@contextlib.contextmanager
def registered_vit(name, arch, data_cfg=FMNIST_DATA_CFG):
    """Register a VisionTransformer with the given architecture under `name` for the block."""
    from src.models import registry

    def factory(**kw):
        return registry.VisionTransformer(**{**arch, **kw})
    factory.__name__ = name
    registry.register_model(data_cfg)(factory)
    try:
        yield name
    finally:
        registry._MODELS.pop(name, None)
        registry._DATA_CFGS.pop(name, None)


def randomize(model, seed=0):
    """Seeded random weights of a useful scale, set from numpy (the default init gives
    near-zero logits, and numpy makes two calls with one seed equal whatever MindSpore's RNG
    state). Intervals of quantized cells are left alone."""
    rng = np.random.default_rng(seed)
    for name, p in model.parameters_and_names():
        leaf, shape = name.rsplit(".", 1)[-1], tuple(p.shape)
        if leaf in ("w_scale", "a_scale", "b_scale", "a_zero_point"):
            continue
        if leaf == "weight":
            v = rng.standard_normal(shape) / math.sqrt(np.prod(shape[1:]))
        elif leaf == "gamma":
            v = 1.0 + 0.1 * rng.standard_normal(shape)
        elif leaf in ("cls_token", "pos_embed"):
            v = 0.5 * rng.standard_normal(shape)
        else:  # bias, beta
            v = 0.1 * rng.standard_normal(shape)
        p.set_data(Tensor(v.astype(np.float32)))
    return model
