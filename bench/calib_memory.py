"""Peak host memory of calibration: DeiT-B (random weights), minmax, 1000 random 224x224 images,
over the embedding stage and the first block. Every block stage has the same shapes, so this
is the peak of a whole-model calibration (which takes about 10 minutes per block on 2 CPU cores).

    python bench/calib_memory.py
    python bench/calib_memory.py --model deit_fmnist --calib-num 8     # a quick check of the script
"""
import argparse
import os
import resource
import sys
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import src  # noqa: E402,F401  (before numpy: its OpenBLAS settings, src/__init__.py)
import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

from src.api import calibrate_model, create_model, defaults, get_data_config, quantize_model  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_base_patch16_224", help="registered model, random weights "
                                                                      "(default deit_base_patch16_224)")
    p.add_argument("--calib-num", type=int, default=1000, help="random calibration images (default 1000)")
    args = p.parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE)
    model = create_model(args.model)
    cfg = dict(defaults(), method="minmax", calib_num=args.calib_num)
    quantize_model(model, cfg)
    c, h, w = get_data_config(args.model)["input_size"]
    x = np.random.default_rng(0).standard_normal((args.calib_num, c, h, w)).astype(np.float32)
    t = time.time()
    calibrate_model(model, x, cfg, stages=2)  # embedding and block 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"{args.model} minmax {args.calib_num} images, embedding + block 0: {time.time() - t:.0f}s, "
          f"peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
