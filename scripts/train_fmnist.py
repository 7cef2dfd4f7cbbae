"""Train the embedded default model `deit_fmnist` on Fashion-MNIST, and write the embedded assets.

Seeded and self-contained: reads the IDX files of Debian's `dataset-fashion-mnist` package
(apt-get install dataset-fashion-mnist), trains with AdamW, a linear warm-up and a cosine
schedule, random-crop (pad 2) and horizontal-flip augmentation and label smoothing, and writes
  assets/deit_fmnist.ckpt       the trained weights
  assets/fmnist_test.npz        the 10,000-image test split (uint8)
  assets/fmnist_calib.npz       --calib-images training images drawn with --seed (uint8)
  assets/deit_fmnist_train.json the recipe and the per-epoch test accuracy

    python scripts/train_fmnist.py [--epochs 15] [--out assets]
"""
import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import mindspore as ms  # noqa: E402
from mindspore import nn  # noqa: E402

from src.api import (FMNIST_SYSTEM_DIR, atomic_save_npz, atomic_write_json, create_model, get_data_config,  # noqa: E402
                     load_idx_split, normalize, save_checkpoint_atomic)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=FMNIST_SYSTEM_DIR, help="folder of the Fashion-MNIST IDX files")
    p.add_argument("--out", default="assets", help="output folder")
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--min-lr", type=float, default=1e-5)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--label-smoothing", type=float, default=0.1)
    p.add_argument("--calib-images", type=int, default=4096, help="training images kept for calibration")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def lr_schedule(args, steps_per_epoch):
    total = args.epochs * steps_per_epoch
    warm = int(args.warmup_epochs * steps_per_epoch)
    lrs = []
    for s in range(total):
        if s < warm:
            lrs.append(args.lr * (s + 1) / warm)
        else:
            t = (s - warm) / max(1, total - warm)
            lrs.append(args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * t)))
    return np.asarray(lrs, dtype=np.float32)


def augment(images, rng):
    """Random crop after 2-pixel zero padding, and random horizontal flip. uint8 (N, 28, 28)."""
    n, h, w = images.shape
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    dy = rng.integers(0, 5, n)
    dx = rng.integers(0, 5, n)
    out = np.empty_like(images)
    for i in range(n):
        out[i] = padded[i, dy[i]:dy[i] + h, dx[i]:dx[i] + w]
    flip = rng.random(n) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def evaluate(net, images, labels, mean, std, batch=500):
    net.set_train(False)
    correct = 0
    for i in range(0, len(images), batch):
        logits = net(ms.Tensor(normalize(images[i:i + batch], mean, std))).asnumpy()
        correct += int((logits.argmax(1) == labels[i:i + batch]).sum())
    net.set_train(True)
    return 100.0 * correct / len(images)


def main(argv=None):
    args = parse_args(argv)
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    ms.set_seed(args.seed)
    np.random.seed(args.seed)
    rng = np.random.default_rng(args.seed)
    os.makedirs(args.out, exist_ok=True)

    train_x, train_y = load_idx_split(args.data_dir, "train")
    test_x, test_y = load_idx_split(args.data_dir, "test")
    atomic_save_npz(os.path.join(args.out, "fmnist_test.npz"), images=test_x, labels=test_y.astype(np.uint8))
    calib_idx = np.sort(rng.choice(len(train_x), args.calib_images, replace=False))
    atomic_save_npz(os.path.join(args.out, "fmnist_calib.npz"), images=train_x[calib_idx],
                    labels=train_y[calib_idx].astype(np.uint8), train_index=calib_idx.astype(np.int32))

    cfg = get_data_config("deit_fmnist")
    mean, std = cfg["mean"], cfg["std"]
    net = create_model("deit_fmnist")
    decay = [p for p in net.trainable_params() if p.ndim > 1 and "pos_embed" not in p.name and "cls_token" not in p.name]
    decay_names = {p.name for p in decay}
    no_decay = [p for p in net.trainable_params() if p.name not in decay_names]
    steps_per_epoch = len(train_x) // args.batch_size
    lrs = ms.Tensor(lr_schedule(args, steps_per_epoch))
    opt = nn.AdamWeightDecay([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], learning_rate=lrs)
    loss = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)
    step = nn.TrainOneStepCell(nn.WithLossCell(net, loss), opt)
    step.set_train(True)

    history = []
    t0 = time.time()
    for epoch in range(args.epochs):
        order = rng.permutation(len(train_x))
        running = 0.0
        for s in range(steps_per_epoch):
            idx = order[s * args.batch_size:(s + 1) * args.batch_size]
            x = normalize(augment(train_x[idx], rng), mean, std)
            running += float(step(ms.Tensor(x), ms.Tensor(train_y[idx])).asnumpy())
            if (s + 1) % 100 == 0:
                el = time.time() - t0
                done = epoch * steps_per_epoch + s + 1
                eta = el / done * (args.epochs * steps_per_epoch - done)
                print(f"epoch {epoch + 1}/{args.epochs} step {s + 1}/{steps_per_epoch} "
                      f"loss {running / (s + 1):.4f} {done / el:.2f} it/s eta {eta / 60:.1f} min", flush=True)
        acc = evaluate(net, test_x, test_y, mean, std)
        history.append({"epoch": epoch + 1, "train_loss": running / steps_per_epoch, "test_top1": acc,
                        "minutes": (time.time() - t0) / 60})
        print(f"epoch {epoch + 1}: test top-1 {acc:.2f}%  ({(time.time() - t0) / 60:.1f} min)", flush=True)
        save_checkpoint_atomic(net, os.path.join(args.out, "deit_fmnist.ckpt"))
        atomic_write_json(os.path.join(args.out, "deit_fmnist_train.json"),
                          {"recipe": vars(args), "history": history})
    print(f"final test top-1 {history[-1]['test_top1']:.2f}%")


if __name__ == "__main__":
    main()
