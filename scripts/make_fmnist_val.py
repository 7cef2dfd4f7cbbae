"""Write the embedded validation split, assets/fmnist_val.npz: 5,000 Fashion-MNIST training
images (uint8) with their labels and training indices, drawn with a fixed seed from the
training images outside the calibration pool (assets/fmnist_calib.npz). Every choice of a
default is made on this split; the test split is only reported.

    apt-get install dataset-fashion-mnist
    python scripts/make_fmnist_val.py [--data-dir /usr/share/datasets/fashion-mnist] [--out assets]
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from src.api import (FMNIST_SYSTEM_DIR, VAL_IMAGES, VAL_SEED, atomic_save_npz, embedded_path,  # noqa: E402
                     load_idx_split, val_indices)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=FMNIST_SYSTEM_DIR, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--out", default=os.path.dirname(embedded_path("val")), help="output folder (default assets/)")
    p.add_argument("--num", type=int, default=VAL_IMAGES, help=f"validation images (default {VAL_IMAGES})")
    p.add_argument("--seed", type=int, default=VAL_SEED, help=f"seed of the draw (default {VAL_SEED})")
    args = p.parse_args(argv)
    images, labels = load_idx_split(args.data_dir, "train")
    with np.load(embedded_path("calib")) as z:
        calib_index = z["train_index"]
        if not np.array_equal(images[calib_index], z["images"]):
            sys.exit(f"error: {args.data_dir}: its training images are not those of {embedded_path('calib')}")
    idx = val_indices(len(images), calib_index, args.num, args.seed)
    out = os.path.join(args.out, "fmnist_val.npz")
    atomic_save_npz(out, images=images[idx], labels=labels[idx].astype(np.uint8), train_index=idx)
    print(f"{out}: {len(idx)} training images outside the {len(calib_index)}-image calibration pool "
          f"(seed {args.seed}); classes {np.bincount(labels[idx], minlength=10).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
