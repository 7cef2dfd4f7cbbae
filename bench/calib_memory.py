"""Peak host memory of calibration: DeiT-B (random weights), minmax, 1000 random 224x224 images,
over the embedding stage and the first block. Every block stage has the same shapes, so this
is the peak of a whole-model calibration (which takes about 10 minutes per block on 2 CPU cores).

    python bench/calib_memory.py
"""
import os
import resource
import sys
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

from src.api import calibrate_model, create_model, defaults, quantize_model  # noqa: E402


def main():
    ms.set_context(mode=ms.GRAPH_MODE)
    model = create_model("deit_base_patch16_224")
    cfg = dict(defaults(), method="minmax", calib_num=1000)
    quantize_model(model, cfg)
    x = np.random.default_rng(0).standard_normal((1000, 3, 224, 224)).astype(np.float32)
    t = time.time()
    calibrate_model(model, x, cfg, stages=2)  # embedding and block 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(f"deit_base minmax 1000 images, embedding + block 0: {time.time() - t:.0f}s, peak RSS {peak:.2f} GB")


if __name__ == "__main__":
    main()
