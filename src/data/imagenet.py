"""ImageNet-1k evaluation data pipeline (folder layout `root/<split>/<wnid>/<image>`).

The preprocessing reproduces the DeiT / timm evaluation transform bit for bit:

    PIL open -> convert("RGB")
    -> resize shorter side to floor(H / crop_pct) (PIL, bicubic by default)
    -> center crop H x W (torchvision rounding)
    -> float32 / 255 -> (x - mean) / std -> CHW

Resizing is done by PIL on the PIL image on purpose: `mindspore.dataset.vision.Resize` on a
numpy array uses a different bicubic kernel and gives pixels that differ by about one gray
level, which is enough to move the accuracy of a quantized model.

Labels always come from the canonical ImageNet-1k order in `imagenet1k_wnids.txt` (line i is
class i), never from the folders that happen to exist, so a subset of the classes keeps the
right labels.
"""
import math
import os
import stat
import sys
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np
from PIL import Image

from ..utils import check_interrupted

WNIDS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet1k_wnids.txt")
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png", ".bmp", ".webp")
IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
DEFAULT_INPUT_SIZE = (3, 224, 224)
# Bounds on the work of one image, so that a small hostile file cannot ask for gigabytes: the
# decoded size (PIL reads it from the header before decoding) and the size after the resize
# (a 30000x1 image resized to a shorter side of 256 would be 7.7 million pixels wide).
MAX_IMAGE_PIXELS = 100_000_000  # 100 megapixels: larger than any camera image in ImageNet
MAX_RESIZED_PIXELS = 1 << 25  # 33.5 megapixels (100 MB as RGB uint8); 224 DeiT: about 0.09


class ImageSizeError(ValueError):
    """An image whose decoded or resized size exceeds the bounds above."""


INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


# ----------------------------------------------------------------------------- class list

@lru_cache(maxsize=1)
def _read_wnids():
    entries = []
    with open(WNIDS_FILE, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            wnid, _, name = line.partition(" ")
            if not (wnid.startswith("n") and wnid[1:].isdigit()):
                raise ValueError(f"{WNIDS_FILE}:{lineno}: expected '<wnid> <class name>', got {line!r}")
            entries.append((wnid, name.strip()))
    if len(entries) != 1000 or len({w for w, _ in entries}) != 1000:
        raise ValueError(f"{WNIDS_FILE}: expected 1000 distinct wnids, found {len(entries)} lines")
    return tuple(entries)


def load_wnids():
    """The 1000 ImageNet-1k classes as a list of (wnid, class name); index i is class i."""
    return list(_read_wnids())


def wnid_to_index():
    """dict wnid -> class index (0..999) in the canonical ImageNet-1k order."""
    return {w: i for i, (w, _) in enumerate(_read_wnids())}


# ----------------------------------------------------------------------------- transform

def to_rgb(img):
    """Any PIL image -> mode 'RGB', exactly as `img.convert("RGB")` (torchvision's loader).

    Palette images with transparency go through RGBA first; the pixels are identical to a
    direct convert, but PIL does not warn. Alpha is dropped (not composited), 16/32-bit and
    float modes are clipped to 0..255 by PIL, EXIF orientation is not applied: all as in the
    torchvision/timm reference.
    """
    if img.mode == "RGB":
        return img
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    return img.convert("RGB")


class EvalTransform:
    """PIL image -> float32 numpy (C, H, W), the DeiT/timm evaluation preprocessing.

    Attributes: input_size (C, H, W), crop_pct, scale_size (shorter side after resizing),
    interpolation (name), mean, std (float32 arrays of shape (3,)).
    """

    def __init__(self, input_size, mean, std, crop_pct=0.875, interpolation="bicubic"):
        input_size = tuple(int(v) for v in input_size)
        if len(input_size) != 3 or input_size[0] != 3 or min(input_size[1:]) < 1:
            raise ValueError(f"input_size must be (3, H, W) with H, W >= 1, got {input_size}")
        if not crop_pct > 0:
            raise ValueError(f"crop_pct must be > 0, got {crop_pct}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation '{interpolation}'; expected one of {sorted(INTERPOLATIONS)}")
        self.mean = np.asarray(mean, dtype=np.float32).reshape(-1)
        self.std = np.asarray(std, dtype=np.float32).reshape(-1)
        if self.mean.shape != (3,) or self.std.shape != (3,):
            raise ValueError(f"mean and std must have 3 values, got {list(mean)} and {list(std)}")
        if np.any(self.std == 0):
            raise ValueError(f"std must be non-zero, got {list(std)}")
        self.input_size = input_size
        self.crop_pct = float(crop_pct)
        self.interpolation = interpolation
        # timm: scale_size = floor(img_size / crop_pct); the model's H is used (ViTs are square).
        self.scale_size = int(math.floor(input_size[1] / self.crop_pct))

    def resize(self, img):
        """Resize a PIL image so its shorter side is `scale_size` (torchvision's rule for Resize(int))."""
        w, h = img.size
        s = self.scale_size
        if w <= h:
            new_w, new_h = s, int(s * h / w)
        else:
            new_w, new_h = int(s * w / h), s
        if (new_w, new_h) == (w, h):
            return img
        if new_w * new_h > MAX_RESIZED_PIXELS:
            raise ImageSizeError(f"{w}x{h} pixels would be resized to {new_w}x{new_h}, over the bound of "
                                 f"{MAX_RESIZED_PIXELS} pixels (an extreme aspect ratio or crop_pct)")
        return img.resize((new_w, new_h), INTERPOLATIONS[self.interpolation])

    def center_crop(self, arr):
        """uint8 (h, w, 3) -> uint8 (H, W, 3). Like torchvision's center_crop, an image smaller
        than the crop (only possible with crop_pct > 1) is first zero-padded on each side
        (left/top get the floor of half the missing size)."""
        th, tw = self.input_size[1:]
        h, w = arr.shape[:2]
        if h < th or w < tw:
            ph, pw = max(th - h, 0), max(tw - w, 0)
            arr = np.pad(arr, ((ph // 2, (ph + 1) // 2), (pw // 2, (pw + 1) // 2), (0, 0)))
            h, w = arr.shape[:2]
        top = int(round((h - th) / 2.0))
        left = int(round((w - tw) / 2.0))
        return arr[top:top + th, left:left + tw]

    def __call__(self, img):
        arr = np.asarray(self.resize(to_rgb(img)), dtype=np.uint8)
        arr = self.center_crop(arr)
        x = arr.astype(np.float32) / np.float32(255.0)
        x = (x - self.mean) / self.std
        return np.ascontiguousarray(x.transpose(2, 0, 1))

    def __repr__(self):
        return (f"EvalTransform(input_size={self.input_size}, crop_pct={self.crop_pct}, "
                f"scale_size={self.scale_size}, interpolation='{self.interpolation}', "
                f"mean={[round(float(v), 6) for v in self.mean]}, std={[round(float(v), 6) for v in self.std]})")


def build_eval_transform(input_size, mean, std, crop_pct=0.875, interpolation="bicubic"):
    """The evaluation transform: a callable PIL.Image -> float32 numpy (C, H, W).

    input_size: (3, H, W). Shorter side resized to floor(H / crop_pct) with the PIL filter
    `interpolation` ('bicubic', 'bilinear', 'nearest', 'lanczos'), center crop H x W,
    /255, per-channel (x - mean) / std.
    """
    return EvalTransform(input_size, mean, std, crop_pct, interpolation)


# ----------------------------------------------------------------------------- dataset

class BadImageError(ValueError):
    """An image file that cannot be opened or decoded (corrupt, truncated, unreadable)."""

    def __init__(self, path, reason):
        super().__init__(path, reason)
        self.path, self.reason = path, reason

    def __str__(self):
        return f"{self.path}: cannot read image ({self.reason})"


def _read_image(path):
    """Open and fully decode an image file -> RGB PIL image, or raise BadImageError. Only a
    regular file is read (opened with O_NONBLOCK: a FIFO where an image was would block open()
    for ever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise OSError("not a regular file")
            with Image.open(f) as img:
                w, h = img.size  # from the header, before decoding
                if w * h > MAX_IMAGE_PIXELS:
                    raise ImageSizeError(f"{w}x{h} pixels, over the bound of {MAX_IMAGE_PIXELS} decoded pixels")
                img.load()  # decodes now, so truncated data fails here; the pixels stay after close
                return to_rgb(img)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
        raise BadImageError(path, f"{type(e).__name__}: {e}") from e


class ImageFolderDataset:
    """Images under `root/<split>/<wnid>/*` with labels from the canonical ImageNet-1k order.

    samples: list of (path relative to root with '/', label int), sorted by (label, file name).
    Files with other extensions than .jpeg .jpg .png .bmp .webp (any case), plain files directly
    in `root/<split>` and hidden folders ('.name') are ignored.
    transform: PIL image -> float32 (C, H, W); default: the 224 DeiT evaluation transform.
    skip_bad_images: in iter_batches, skip unreadable files (recorded in `skipped`) instead of
    raising BadImageError.
    """

    def __init__(self, root, split="val", transform=None, skip_bad_images=False):
        self.root, self.split = root, split
        self.split_dir = os.path.join(root, split)
        if transform is None:
            transform = build_eval_transform(DEFAULT_INPUT_SIZE, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.skipped = []
        self.samples = self._scan()

    def _scan(self):
        if not os.path.isdir(self.split_dir):
            raise FileNotFoundError(f"{self.split_dir}: no such directory (expected <root>/{self.split}/<wnid>/<images>)")
        index = wnid_to_index()
        samples = []
        for entry in self._entries(self.split_dir):
            if entry.name.startswith(".") or not self._is(entry, "dir"):
                continue
            if entry.name not in index:
                raise ValueError(f"folder '{entry.name}' in {self.split_dir} (root {self.root}) is not an "
                                 f"ImageNet-1k wnid (expected names like n01440764)")
            label = index[entry.name]
            for f in self._entries(entry.path):
                # an image whose kind cannot be read (a link loop, a dangling link) is a sample that
                # fails to load: a bad image, skipped and counted with --skip-bad-images
                if f.name.lower().endswith(IMAGE_EXTENSIONS) and self._is(f, "file", unreadable=True):
                    samples.append((label, f.name, f"{self.split}/{entry.name}/{f.name}"))
        if not samples:
            raise ValueError(f"{self.split_dir}: no images found (expected <wnid>/*{{{','.join(IMAGE_EXTENSIONS)}}})")
        samples.sort()
        return [(rel, label) for label, _, rel in samples]

    def _unreadable(self, path, err):
        """A folder entry that cannot be read: one line naming it, or with skip_bad_images a
        warning and the scan goes on."""
        reason = err.strerror or str(err)
        if not self.skip_bad_images:
            raise ValueError(f"{path}: cannot read this entry of the data set ({reason}); --skip-bad-images "
                             "skips it")
        print(f"warning: skipping unreadable entry {path} ({reason})", file=sys.stderr, flush=True)

    def _entries(self, folder):
        """The entries of `folder` (a list; none if it cannot be read and skip_bad_images is on)."""
        try:
            with os.scandir(folder) as it:
                return list(it)
        except OSError as e:
            if folder == self.split_dir:
                raise
            self._unreadable(folder, e)
            return []

    def _is(self, entry, kind, unreadable=False):
        """Whether the entry (links followed) is a folder ('dir') or a regular file ('file'); an
        entry whose kind cannot be read (a link loop) or a dangling link gives `unreadable`, and a
        folder that cannot be read is reported by _unreadable."""
        try:
            found = entry.is_dir() if kind == "dir" else entry.is_file()
        except OSError as e:
            if unreadable:
                return True
            self._unreadable(entry.path, e)
            return False
        if not found and unreadable and entry.is_symlink() and not os.path.exists(entry.path):
            return True  # a dangling link
        return found

    def __len__(self):
        return len(self.samples)

    @property
    def skipped_images(self):
        """Number of files skipped in the last iter_batches call."""
        return len(self.skipped)

    def path(self, i):
        """File path of sample i: os.path.join(root, relative path)."""
        return os.path.join(self.root, self.samples[i][0])

    def load(self, i):
        """Sample i -> (float32 image (C, H, W), int label). Raises BadImageError for a broken file."""
        path = self.path(i)
        img = _read_image(path)
        try:
            return self.transform(img), int(self.samples[i][1])
        except (ImageSizeError, MemoryError) as e:
            raise BadImageError(path, f"{type(e).__name__}: {e}") from None

    def _check_indices(self, indices):
        if indices is None:
            return list(range(len(self)))
        out = []
        for i in indices:
            i = int(i)
            if not 0 <= i < len(self):
                raise IndexError(f"sample index {i} out of range for {len(self)} images in {self.split_dir}")
            out.append(i)
        return out

    def _iter_loaded(self, indices, num_workers, window):
        """Yield (i, (image, label) or BadImageError) for each index, in order.

        With num_workers > 1 images are decoded by a thread pool with at most `window`
        decodes pending (bounded memory); results are still returned in the given order.
        """
        def job(i):
            try:
                return self.load(i)
            except BadImageError as e:
                return e

        if num_workers <= 1:
            for i in indices:
                yield i, job(i)
            return
        ex = ThreadPoolExecutor(num_workers)
        try:
            it = iter(indices)
            pending = deque()
            for i in it:
                pending.append((i, ex.submit(job, i)))
                if len(pending) >= window:
                    break
            while pending:
                i, fut = pending.popleft()
                nxt = next(it, None)
                if nxt is not None:
                    pending.append((nxt, ex.submit(job, nxt)))
                check_interrupted()
                yield i, fut.result()
        finally:
            ex.shutdown(wait=True, cancel_futures=True)

    def _skip(self, err, i):
        self.skipped.append(self.samples[i][0])
        print(f"warning: skipping unreadable image {err}", file=sys.stderr, flush=True)

    def iter_batches(self, batch_size, indices=None, num_workers=2):
        """Generator of (images float32 (B, C, H, W), labels int32 (B,), paths list[str]).

        Dataset order (or the order of `indices`, a subset of sample indices), no shuffling,
        the last partial batch is kept. paths are relative to root. A bad file raises
        BadImageError, or with skip_bad_images is left out of its batch and recorded in
        `self.skipped` (reset by each call); a batch left empty is not yielded.
        """
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        batch_size = int(batch_size)
        order = self._check_indices(indices)
        self.skipped = []
        window = batch_size + 2 * max(int(num_workers), 1)
        return self._batches(order, batch_size, int(num_workers), window)

    def _batches(self, order, batch_size, num_workers, window):
        imgs, labels, paths, seen = [], [], [], 0
        for i, res in self._iter_loaded(order, num_workers, window):
            seen += 1
            if isinstance(res, BadImageError):
                if not self.skip_bad_images:
                    raise res
                self._skip(res, i)
            else:
                imgs.append(res[0])
                labels.append(res[1])
                paths.append(self.samples[i][0])
            if seen == batch_size:
                if imgs:
                    yield np.stack(imgs), np.asarray(labels, dtype=np.int32), paths
                imgs, labels, paths, seen = [], [], [], 0
        if imgs:
            yield np.stack(imgs), np.asarray(labels, dtype=np.int32), paths


def calibration_subset(root, split="train", num=32, seed=0, transform=None, skip_bad_images=False,
                       num_workers=2):
    """A deterministic random calibration set: (images float32 (N, C, H, W), labels int32 (N,)).

    Indices are `np.random.default_rng(seed).choice(len(ds), num, replace=False)`, loaded in
    sorted order. With skip_bad_images, each round of bad files is replaced by drawing as many
    indices again from the same generator among the not yet tried ones (sorted), so the result
    only depends on the seed and the files; the final set is returned in sorted index order.
    """
    ds = ImageFolderDataset(root, split, transform=transform, skip_bad_images=skip_bad_images)
    n = len(ds)
    num = int(num)
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if num > n:
        raise ValueError(f"num={num} calibration images requested but {ds.split_dir} has only {n} images")
    rng = np.random.default_rng(seed)
    todo = sorted(int(i) for i in rng.choice(n, num, replace=False))
    tried, good = set(), {}
    ds.skipped = []
    while todo:
        tried.update(todo)
        for i, res in ds._iter_loaded(todo, num_workers, window=len(todo)):
            if isinstance(res, BadImageError):
                if not skip_bad_images:
                    raise res
                ds._skip(res, i)
            else:
                good[i] = res
        missing = num - len(good)
        if missing == 0:
            break
        rest = [i for i in range(n) if i not in tried]
        if len(rest) < missing:
            raise ValueError(f"{ds.split_dir}: only {len(good)} readable images, {num} requested "
                             f"({len(ds.skipped)} unreadable)")
        todo = sorted(rest[int(j)] for j in rng.choice(len(rest), missing, replace=False))
    keys = sorted(good)
    return np.stack([good[i][0] for i in keys]), np.asarray([good[i][1] for i in keys], dtype=np.int32)
