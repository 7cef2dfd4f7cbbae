"""Worker of tests/test_distributed.py: calibrates a tiny ViT with each given method on this
rank's shard (whole batches) of the calibration images (src.distributed.calibration_shard) and, on rank 0,
saves each method's calibration state and the mixed-precision reports (the paper's criterion
and `refined`) to OUT (.npz). A METHOD may be a variant of VARIANTS (a method with switches).

    msrun ... tests/_msrun_calib.py OUT NUM_IMAGES METHOD[,METHOD...] [--mp]
    python tests/_msrun_calib.py OUT NUM_IMAGES METHODS [--mp]        (one process: all images)
"""
import io
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

from src.config import defaults  # noqa: E402
from src.distributed import calibration_shard, gather_counts, init_distributed  # noqa: E402
from src.sharded import calibration_state  # noqa: E402
from src.models.vit import VisionTransformer  # noqa: E402
from src.quant import METHODS, calibrate_model, quantize_model, register_method  # noqa: E402
from src.quant.calibrate import MinMax, is_shardable  # noqa: E402
from src.quant.mixed_precision import search_bits  # noqa: E402
from src.quant.mp_refined import refined_search  # noqa: E402
from src.quant.vtptq_plus import resolve_switches  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _helpers import randomize  # noqa: E402

TINY = dict(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2)
# name -> (method, switches): vtptq_plus with its off-by-default switches on as well
VARIANTS = {"vtptq_plus_all": ("vtptq_plus", dict(attn_reparam=True, recon_iters=10, block_recon_iters=10))}


@register_method
class MinMaxUnshardable(MinMax):
    """minmax, but a subclass that does not declare itself shardable (it calibrates on all images)."""
    name = "minmax_unshardable"


def config(method, **kw):
    method, switches = VARIANTS.get(method, (method, {}))
    cfg = dict(defaults(), **{"method": method, "w_bits": 4, "a_bits": 4, "search_candidates": 12, "max_rounds": 3,
                              "search_rounds": 2, "calib_batch_size": 4, **switches, **kw})
    if method == "vtptq_plus":
        resolve_switches(cfg)  # null switches -> vtptq_plus's defaults, as quant.py does
    return cfg


def run(out, num, methods, mp):
    ms.set_device("CPU")
    ctx = init_distributed("CPU")
    images = np.random.default_rng(3).standard_normal((num, 1, 28, 28)).astype(np.float32)
    saved, counts = {}, {}
    for method in methods:
        cfg = config(method)
        model = randomize(VisionTransformer(**TINY), seed=0)
        quantize_model(model, cfg)
        with calibration_shard(images, is_shardable(METHODS[cfg["method"]]), batch_size=cfg["calib_batch_size"]) as mine:
            calibrate_model(model, mine, cfg, log=io.StringIO())
        saved[method] = calibration_state(model)
        counts[method] = gather_counts(len(mine))
    if mp:
        cfg = config("vtptq", mixed_precision=True, mp_target="4MP", mp_min_bits=4, max_rounds=1)
        model = randomize(VisionTransformer(**dict(TINY, depth=1)), seed=0)  # 2 modules, widths 4, 5, 6
        quantize_model(model, cfg)
        with calibration_shard(images, True, batch_size=cfg["calib_batch_size"]) as mine:
            report = search_bits(model, mine, cfg, log=io.StringIO())
        saved["mp_omega"] = np.array([v for m in sorted(report["omega"]) for v in report["omega"][m].values()])
        saved["mp_sensitivity"] = np.array([report["sensitivity"][m] for m in sorted(report["sensitivity"])])
        counts["mp_modules"] = report["modules"]
        cfg = dict(cfg, mp_criterion="refined")
        with calibration_shard(images, True, batch_size=cfg["calib_batch_size"]) as mine:
            report = refined_search(lambda: randomize(VisionTransformer(**dict(TINY, depth=1)), seed=0), mine, cfg,
                                    log=io.StringIO())
        saved["refined_omega"] = np.array([v for m in sorted(report["omega"]) for v in report["omega"][m].values()])
        saved["refined_objective"] = np.array([report["objective"][k] for k in ("uniform", "initial", "final")])
        counts["refined_modules"] = report["modules"]
        counts["refined_passes"] = [report["forward_passes"], report["swaps_measured"], report["swaps_accepted"]]
    if ctx.is_main:
        np.savez(out, counts=json.dumps(counts), **saved)


if __name__ == "__main__":
    args = sys.argv[1:]
    run(args[0], int(args[1]), [m for m in args[2].split(",") if m], "--mp" in args)
