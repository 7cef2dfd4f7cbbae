"""Tests of the ImageNet evaluation pipeline (src/data/imagenet.py) on images generated here."""
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from src.data.imagenet import (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, BadImageError,
                               ImageFolderDataset, build_eval_transform, calibration_subset,
                               load_wnids, to_rgb, wnid_to_index)

MEAN, STD = IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
W0, W2, W999 = "n01440764", "n01484850", "n15075141"  # class indices 0, 2, 999


def small_transform():
    return build_eval_transform((3, 32, 32), MEAN, STD, crop_pct=0.875)


def noise(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_tree(root, files, split="val"):
    """files: {wnid: [(file name, PIL image or bytes)]} -> root/split/wnid/name."""
    for wnid, items in files.items():
        d = os.path.join(root, split, wnid)
        os.makedirs(d, exist_ok=True)
        for name, img in items:
            p = os.path.join(d, name)
            if isinstance(img, bytes):
                with open(p, "wb") as f:
                    f.write(img)
            else:
                img.save(p, format="PNG" if name.lower().endswith(".png") else "JPEG", quality=95)
    return str(root)


def reference_transform(img, crop=224, resize=256):
    """Independent DeiT eval preprocessing with plain PIL + numpy."""
    img = img.convert("RGB")
    w, h = img.size
    size = (resize, int(resize * h / w)) if w <= h else (int(resize * w / h), resize)
    a = np.asarray(img.resize(size, Image.BICUBIC))
    top, left = int(round((a.shape[0] - crop) / 2.0)), int(round((a.shape[1] - crop) / 2.0))
    a = a[top:top + crop, left:left + crop].astype(np.float32) / np.float32(255)
    a = (a - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return a.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- class list

def test_wnids():
    wnids = load_wnids()
    assert len(wnids) == 1000 and wnids[0] == (W0, "tench")
    idx = wnid_to_index()
    assert idx[W0] == 0 and idx[W2] == 2 and idx[W999] == 999


# ----------------------------------------------------------------------------- transform

@pytest.mark.parametrize("w,h,resized", [(300, 217, (353, 256)), (500, 375, (341, 256)),
                                         (375, 500, (256, 341)), (100, 80, (320, 256)),
                                         (256, 300, (256, 300))])
def test_transform_pixel_parity(w, h, resized):
    t = build_eval_transform((3, 224, 224), MEAN, STD)
    img = noise(w, h, seed=w + h)
    assert t.scale_size == 256 and t.resize(img).size == resized
    out = t(img)
    assert out.shape == (3, 224, 224) and out.dtype == np.float32
    assert np.abs(out - reference_transform(img)).max() < 1e-6


def test_mindspore_resize_differs_from_pil():
    """Why resizing is done by PIL: MindSpore's bicubic Resize on numpy arrays differs."""
    vision = pytest.importorskip("mindspore.dataset.vision")
    img = noise(90, 70, seed=3)
    pil = np.asarray(img.resize((82, 64), Image.BICUBIC)).astype(np.float64)
    try:
        ms = vision.Resize((64, 82), vision.Inter.BICUBIC)(np.asarray(img))
    except Exception as e:  # pragma: no cover - depends on the MindSpore build
        pytest.skip(f"mindspore.dataset.vision.Resize on a numpy array failed here: {e}")
    assert ms.shape == pil.shape
    assert np.abs(ms.astype(np.float64) - pil).mean() > 0
    t = build_eval_transform((3, 64, 64), MEAN, STD, crop_pct=1.0)
    assert t.resize(img).size == (82, 64)
    assert np.array_equal(np.asarray(t.resize(img)), pil.astype(np.uint8))


def test_transform_options_and_errors():
    img = noise(50, 40)
    with pytest.raises(ValueError, match="bogus.*bicubic"):
        build_eval_transform((3, 32, 32), MEAN, STD, interpolation="bogus")
    with pytest.raises(ValueError, match="input_size"):
        build_eval_transform((1, 32, 32), MEAN, STD)
    for name, flt in [("bilinear", Image.BILINEAR), ("nearest", Image.NEAREST), ("lanczos", Image.LANCZOS)]:
        t = build_eval_transform((3, 32, 32), MEAN, STD, interpolation=name)
        assert np.array_equal(np.asarray(t.resize(img)), np.asarray(img.resize((45, 36), flt)))
    # crop_pct > 1: the resized image (shorter side 29) is zero-padded like torchvision.
    t = build_eval_transform((3, 32, 32), (0, 0, 0), (1, 1, 1), crop_pct=1.1)
    out = t(noise(29, 29))
    assert out.shape == (3, 32, 32)
    assert np.all(out[:, :1] == 0) and np.all(out[:, -2:] == 0) and np.all(out[:, :, :1] == 0)
    assert np.array_equal(out[:, 1:30, 1:30], np.asarray(noise(29, 29)).transpose(2, 0, 1) / np.float32(255))


def test_to_rgb_modes_match_convert():
    rgb = noise(20, 16, seed=5)
    pal = rgb.quantize(8)
    pal_bytes = pal.copy()
    pal_bytes.info["transparency"] = bytes([0, 128, 255, 255, 10, 255, 255, 255])
    imgs = [rgb.convert("L"), rgb.convert("RGBA"), rgb.convert("CMYK"), pal, pal_bytes,
            Image.fromarray(np.arange(320, dtype=np.uint16).reshape(16, 20) * 7)]
    for img in imgs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = np.asarray(img.convert("RGB"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no palette-transparency warning from to_rgb
            got = to_rgb(img)
        assert got.mode == "RGB" and np.array_equal(np.asarray(got), expected), img.mode


def test_non_rgb_files_load_as_rgb(tmp_path):
    rgb = noise(48, 40, seed=7)
    root = write_tree(tmp_path, {W0: [("a_gray.JPEG", rgb.convert("L")), ("b_cmyk.JPEG", rgb.convert("CMYK")),
                                      ("c_pal.png", rgb.quantize(16))]})
    ds = ImageFolderDataset(root, transform=small_transform())
    t = small_transform()
    assert [p for p, _ in ds.samples] == [f"val/{W0}/a_gray.JPEG", f"val/{W0}/b_cmyk.JPEG", f"val/{W0}/c_pal.png"]
    for i, (rel, _) in enumerate(ds.samples):
        with Image.open(os.path.join(root, rel)) as f:
            assert f.mode in ("L", "CMYK", "P")
            expected = t(f.convert("RGB"))
        x, label = ds.load(i)
        assert x.shape == (3, 32, 32) and label == 0
        assert np.array_equal(x, expected)
    gray = ds.load(0)[0] * np.asarray(STD, np.float32)[:, None, None] + np.asarray(MEAN, np.float32)[:, None, None]
    assert np.allclose(gray[0], gray[1], atol=1e-6) and np.allclose(gray[1], gray[2], atol=1e-6)


# ----------------------------------------------------------------------------- dataset

def corrupt_tree(tmp_path):
    buf = tmp_path / "tmp.jpg"
    noise(64, 48, seed=1).save(buf, format="JPEG")
    good = buf.read_bytes()
    buf.unlink()
    return write_tree(tmp_path, {W0: [("a.JPEG", noise(40, 30, 1)), ("b_random.JPEG", os.urandom(2000)),
                                      ("c.JPEG", noise(30, 40, 2)), ("d_trunc.JPEG", good[:len(good) // 2])],
                                 W2: [("e.JPEG", noise(35, 35, 3))]})


def test_corrupt_files_raise_with_path(tmp_path):
    root = corrupt_tree(tmp_path)
    ds = ImageFolderDataset(root, transform=small_transform())
    assert len(ds) == 5
    for i, name in [(1, "b_random.JPEG"), (3, "d_trunc.JPEG")]:
        with pytest.raises(BadImageError, match=name) as e:
            ds.load(i)
        assert isinstance(e.value, ValueError) and e.value.path.endswith(name)
    with pytest.raises(BadImageError, match="b_random.JPEG"):
        list(ds.iter_batches(2))


def test_corrupt_files_skipped(tmp_path, capsys):
    root = corrupt_tree(tmp_path)
    ds = ImageFolderDataset(root, transform=small_transform(), skip_bad_images=True)
    batches = list(ds.iter_batches(2))
    assert [len(b[2]) for b in batches] == [1, 1, 1]
    assert [p for b in batches for p in b[2]] == [f"val/{W0}/a.JPEG", f"val/{W0}/c.JPEG", f"val/{W2}/e.JPEG"]
    assert [int(v) for b in batches for v in b[1]] == [0, 0, 2]
    assert ds.skipped == [f"val/{W0}/b_random.JPEG", f"val/{W0}/d_trunc.JPEG"] and ds.skipped_images == 2
    err = capsys.readouterr().err
    assert "b_random.JPEG" in err and "d_trunc.JPEG" in err
    # a batch made only of bad files is not yielded; `skipped` is reset per call
    batches = list(ds.iter_batches(1, indices=[1, 3, 4]))
    assert len(batches) == 1 and batches[0][2] == [f"val/{W2}/e.JPEG"] and ds.skipped_images == 2
    list(ds.iter_batches(2, indices=[0]))
    assert ds.skipped_images == 0


def test_class_subset_labels_and_folder_errors(tmp_path):
    root = write_tree(tmp_path, {W999: [("z.JPEG", noise(40, 40, 1))], W2: [("y.jpg", noise(40, 40, 2))],
                                 W0: [("x.png", noise(40, 40, 3)), ("notes.txt", b"not an image")]})
    ds = ImageFolderDataset(root, transform=small_transform())
    assert [label for _, label in ds.samples] == [0, 2, 999]
    assert [ds.load(i)[1] for i in range(3)] == [0, 2, 999]
    os.makedirs(os.path.join(root, "val", "cats"))
    with pytest.raises(ValueError, match="cats") as e:
        ImageFolderDataset(root)
    assert root in str(e.value)
    with pytest.raises(FileNotFoundError, match="train"):
        ImageFolderDataset(root, split="train")
    os.makedirs(os.path.join(root, "empty", W0))
    with pytest.raises(ValueError, match="no images"):
        ImageFolderDataset(root, split="empty")


def test_batching_order(tmp_path):
    root = write_tree(tmp_path, {W2: [(f"img_{k}.JPEG", noise(40 + k, 36, k)) for k in (3, 1, 2)],
                                 W0: [(f"img_{k}.jpeg", noise(36, 40 + k, k)) for k in (4, 0, 3, 9)]})
    ds = ImageFolderDataset(root, transform=small_transform())
    order = [f"val/{W0}/img_{k}.jpeg" for k in (0, 3, 4, 9)] + [f"val/{W2}/img_{k}.JPEG" for k in (1, 2, 3)]
    assert [p for p, _ in ds.samples] == order
    for workers in (0, 2):
        batches = list(ds.iter_batches(3, num_workers=workers))
        assert [b[0].shape for b in batches] == [(3, 3, 32, 32), (3, 3, 32, 32), (1, 3, 32, 32)]
        assert all(b[0].dtype == np.float32 and b[1].dtype == np.int32 for b in batches)
        assert [p for b in batches for p in b[2]] == order
        assert np.concatenate([b[1] for b in batches]).tolist() == [0] * 4 + [2] * 3
        assert np.array_equal(batches[1][0][2], ds.load(5)[0])
    sub = list(ds.iter_batches(2, indices=np.array([6, 0, 3])))
    assert [b[2] for b in sub] == [[order[6], order[0]], [order[3]]]
    with pytest.raises(IndexError):
        list(ds.iter_batches(2, indices=[7]))


def test_calibration_subset(tmp_path):
    root = write_tree(tmp_path, {W0: [(f"{k:02d}.JPEG", noise(40, 34, k)) for k in range(6)],
                                 W2: [(f"{k:02d}.JPEG", noise(34, 40, k + 10)) for k in range(6)]}, split="train")
    t = small_transform()
    x, y = calibration_subset(root, num=5, seed=0, transform=t)
    assert x.shape == (5, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int32
    ds = ImageFolderDataset(root, "train", transform=t)
    idx = sorted(np.random.default_rng(0).choice(12, 5, replace=False))
    assert np.array_equal(x, np.stack([ds.load(i)[0] for i in idx]))
    assert y.tolist() == [ds.samples[i][1] for i in idx]
    x2, y2 = calibration_subset(root, num=5, seed=0, transform=t)
    assert np.array_equal(x, x2) and np.array_equal(y, y2)
    x3, _ = calibration_subset(root, num=5, seed=1, transform=t)
    assert not np.array_equal(x, x3)
    with pytest.raises(ValueError, match="num=13.*train.*12"):
        calibration_subset(root, num=13, transform=t)


def test_calibration_subset_skips_bad(tmp_path):
    root = write_tree(tmp_path, {W0: [(f"{k:02d}.JPEG", noise(40, 34, k)) for k in range(8)]}, split="train")
    t = small_transform()
    idx = sorted(np.random.default_rng(0).choice(8, 3, replace=False))
    bad = os.path.join(root, "train", W0, f"{idx[0]:02d}.JPEG")
    with open(bad, "wb") as f:
        f.write(b"garbage" * 50)
    with pytest.raises(BadImageError):
        calibration_subset(root, num=3, seed=0, transform=t)
    x, y = calibration_subset(root, num=3, seed=0, transform=t, skip_bad_images=True)
    x2, _ = calibration_subset(root, num=3, seed=0, transform=t, skip_bad_images=True)
    assert x.shape == (3, 3, 32, 32) and np.array_equal(x, x2)
    ds = ImageFolderDataset(root, "train", transform=t)
    loaded = [ds.load(i)[0] for i in range(8) if i != idx[0]]
    assert all(any(np.array_equal(a, b) for b in loaded) for a in x)
