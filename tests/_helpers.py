"""Helpers shared by the test files (importable because pytest puts tests/ on sys.path)."""
import math

import numpy as np
from mindspore import Tensor


def randomize(model, seed=0):
    """Seeded random weights of a useful scale, set from numpy (the default init gives
    near-zero logits, and numpy makes two calls with one seed equal whatever MindSpore's RNG
    state). Intervals of quantized cells are left alone."""
    rng = np.random.default_rng(seed)
    for name, p in model.parameters_and_names():
        leaf, shape = name.rsplit(".", 1)[-1], tuple(p.shape)
        if leaf in ("w_scale", "a_scale", "b_scale"):
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
