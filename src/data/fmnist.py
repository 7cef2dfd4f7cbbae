"""Fashion-MNIST: IDX file reader and the embedded copy the repository carries.

The embedded assets hold uint8 images (N, 28, 28) and int labels, from the IDX files of
Debian's `dataset-fashion-mnist` package:
- `assets/fmnist_test.npz`: the 10,000-image test split (scripts/train_fmnist.py);
- `assets/fmnist_calib.npz`: 4,096 training images, the calibration pool, with their
  `train_index` (scripts/train_fmnist.py);
- `assets/fmnist_val.npz`: 5,000 other training images, the validation split every choice is
  made on, with their `train_index`, disjoint from the calibration pool
  (scripts/make_fmnist_val.py, `val_indices`). The model saw them in training, so their labels
  say little; a choice made on val uses the full-precision model's predictions instead
  (top-1 agreement, mean KL), see docs/results.md.
"""
import gzip
import os

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ASSETS_DIR = os.path.join(REPO_ROOT, "assets")
EMBEDDED_SPLITS = {"test": "fmnist_test.npz", "calib": "fmnist_calib.npz", "val": "fmnist_val.npz"}
VAL_IMAGES, VAL_SEED = 5000, 1
FMNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot")


def read_idx(path):
    """Read an IDX file (optionally gzipped) into a numpy array."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} values for shape {dims}, found {body.size}")
    return body.reshape(dims)


def load_idx_split(data_dir, split):
    """(images uint8 (N, 28, 28), labels int32 (N,)) of the 'train' or 't10k' IDX files."""
    prefix = {"train": "train", "test": "t10k"}[split]
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        for ext in (".gz", ""):
            p = os.path.join(data_dir, f"{prefix}-{kind}{ext}")
            if os.path.exists(p):
                found[kind] = p
                break
        else:
            raise FileNotFoundError(f"{data_dir}: no {prefix}-{kind}[.gz] (Fashion-MNIST IDX files expected)")
    return read_idx(found["images-idx3-ubyte"]), read_idx(found["labels-idx1-ubyte"]).astype(np.int32)


def val_indices(num_train, exclude, num=VAL_IMAGES, seed=VAL_SEED):
    """Sorted training indices of the validation split: `num` drawn with `seed` from the
    training indices not in `exclude` (the calibration pool's)."""
    pool = np.setdiff1d(np.arange(int(num_train)), np.asarray(exclude))
    if num > len(pool):
        raise ValueError(f"{num} validation images asked for; only {len(pool)} training images are outside the "
                         "calibration pool")
    return np.sort(np.random.default_rng(seed).choice(pool, int(num), replace=False)).astype(np.int32)


def embedded_path(split):
    if split not in EMBEDDED_SPLITS:
        raise ValueError(f"unknown embedded split '{split}'; expected one of {sorted(EMBEDDED_SPLITS)}")
    return os.path.join(ASSETS_DIR, EMBEDDED_SPLITS[split])


def load_embedded(split):
    """(images uint8 (N, 28, 28), labels int32 (N,)) of the embedded 'test', 'calib' or 'val' split."""
    path = embedded_path(split)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: embedded Fashion-MNIST split missing (run scripts/train_fmnist.py)")
    with np.load(path) as z:
        return z["images"], z["labels"].astype(np.int32)


def normalize(images, mean, std):
    """uint8 (N, H, W) -> float32 (N, 1, H, W) scaled to [0, 1] and normalized."""
    x = images.astype(np.float32)[:, None] / 255.0
    return (x - np.float32(mean[0])) / np.float32(std[0])


class EmbeddedFMNIST:
    """The embedded Fashion-MNIST split as an evaluation dataset with the same batch interface
    as ImageFolderDataset: iter_batches yields (float32 (B, 1, 28, 28), int32 (B,), names),
    where names are '<split>/<index>'."""

    def __init__(self, split, mean, std, max_images=None):
        images, labels = load_embedded(split)
        if max_images is not None:
            images, labels = images[:max_images], labels[:max_images]
        self.split, self.images, self.labels = split, images, labels
        self.mean, self.std = mean, std
        self.skipped = []
        self.root = embedded_path(split)

    def __len__(self):
        return len(self.labels)

    @property
    def skipped_images(self):
        return 0

    def iter_batches(self, batch_size, indices=None, num_workers=None):
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        for i in range(0, len(idx), batch_size):
            sel = idx[i:i + batch_size]
            yield (normalize(self.images[sel], self.mean, self.std), self.labels[sel],
                   [f"{self.split}/{j}" for j in sel])

    def arrays(self, indices=None):
        """All (or the selected) images normalized, with labels: float32 (N, 1, 28, 28), int32 (N,)."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices)
        return normalize(self.images[idx], self.mean, self.std), self.labels[idx]
