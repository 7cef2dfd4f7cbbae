"""Evaluation loop shared by eval.py and quant.py."""
import csv
import io
import os
import time

import numpy as np
import mindspore as ms

from .utils import Progress, atomic_write_text


def setup_context(device_target="CPU", mode="graph", seed=0):
    """Set MindSpore's device and execution mode ('graph' or 'pynative') and the global seed.
    A device this MindSpore build or machine cannot use is a one-line UserError."""
    from .utils import UserError
    if not ms.hal.is_available(device_target):
        have = [d for d in ("CPU", "GPU", "Ascend") if d != device_target and ms.hal.is_available(d)]
        raise UserError(f"device_target {device_target} is not available on this machine with MindSpore "
                        f"{ms.__version__} (available: {', '.join(have) or 'none'})")
    try:
        ms.set_device(device_target)
    except RuntimeError:  # MindSpore refuses once a kernel has run; fine if it is the same device
        if ms.get_context("device_target") != device_target:
            raise
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    ms.set_seed(seed)
    np.random.seed(seed)


def softmax(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def pad_batch(images, batch_size):
    """Zero-pad a partial batch to `batch_size` rows (GRAPH mode then compiles one shape)."""
    n = len(images)
    if n >= batch_size:
        return images
    return np.concatenate([images, np.zeros((batch_size - n,) + images.shape[1:], images.dtype)])


def predict(model, images, batch_size):
    """Logits float32 (N, classes) of numpy images (N, C, H, W), in batches of `batch_size`."""
    model.set_train(False)
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size]
        out.append(model(ms.Tensor(pad_batch(x, batch_size))).asnumpy()[:len(x)])
    return np.concatenate(out)


def evaluate(model, dataset, batch_size, num_workers=2, keep_predictions=False, desc="eval", indices=None,
             allow_empty=False):
    """Top-1/top-5 of `model` on `dataset` (anything with iter_batches). Never shuffles and
    never drops the last partial batch (it is zero-padded and the padding ignored).

    Returns dict(num_images, skipped_images, top1, top5, correct1, correct5, seconds,
    images_per_second) and, with keep_predictions, 'predictions': list of
    (name, label, top5 indices, top5 probabilities). allow_empty: no error when every image
    was skipped (one shard of a distributed run)."""
    model.set_train(False)
    total = len(dataset) if indices is None else len(indices)
    progress = Progress(total, desc=desc)
    correct1 = correct5 = count = 0
    predictions = []
    start = time.time()
    try:
        for images, labels, names in dataset.iter_batches(batch_size, indices=indices, num_workers=num_workers):
            n = len(labels)
            logits = model(ms.Tensor(pad_batch(images, batch_size))).asnumpy()[:n]
            k = min(5, logits.shape[1])
            top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
            correct1 += int((top[:, 0] == labels).sum())
            correct5 += int((top == labels[:, None]).any(axis=1).sum())
            count += n
            if keep_predictions:
                probs = np.take_along_axis(softmax(logits), top, axis=1)
                predictions.extend(zip(names, labels.tolist(), top.tolist(), probs.tolist()))
            progress.update(n)
    except BaseException:
        if 0 < progress.done < total:  # end the open progress line so that the error starts a line
            progress.stream.write("\n")
            progress.stream.flush()
        raise
    seconds = time.time() - start
    if count == 0 and not allow_empty:
        raise ValueError("no images were evaluated (all skipped or an empty data set)")
    result = dict(num_images=count, skipped_images=dataset.skipped_images,
                  top1=100.0 * correct1 / max(count, 1), top5=100.0 * correct5 / max(count, 1),
                  correct1=correct1, correct5=correct5,
                  seconds=seconds, images_per_second=count / seconds if seconds > 0 else None)
    if keep_predictions:
        result["predictions"] = predictions
    return result


def write_predictions_csv(path, predictions):
    """CSV with header path,label,pred_1..pred_5,prob_1..prob_5; one row per image in dataset order."""
    k = max((len(p[2]) for p in predictions), default=5)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label"] + [f"pred_{i + 1}" for i in range(k)] + [f"prob_{i + 1}" for i in range(k)])
    for name, label, preds, probs in predictions:
        w.writerow([name, label] + list(preds) + [f"{p:.6f}" for p in probs])
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    atomic_write_text(path, buf.getvalue())


def resolve_checkpoint(cfg):
    """cfg['ckpt'], or the embedded checkpoint for the embedded model, or None (random weights)."""
    if cfg.get("ckpt"):
        return cfg["ckpt"]
    from .models.registry import default_checkpoint
    return default_checkpoint(cfg["model"])


def exported_model_name(path):
    """The model name stored in an exported .onnx or .mindir file (None for other files)."""
    path = str(path)
    if path.endswith(".onnx"):
        from .export.onnx import onnx_model_name
        return onnx_model_name(path)
    if path.endswith(".mindir"):
        from .export.mindir import mindir_model_name
        return mindir_model_name(path)
    return None


def quantized_checkpoint_model(cfg):
    """If cfg['ckpt'] is a quantized checkpoint or an exported model (.onnx, .mindir), the
    model name it holds (and cfg['model'] is set to it); an error if the config names another
    model explicitly. Else None."""
    from .quant.convert import read_quant_meta
    if not cfg.get("ckpt"):
        return None
    name = exported_model_name(cfg["ckpt"])
    if name is None:
        found = read_quant_meta(cfg["ckpt"])
        if found is None:
            return None
        name = found[0]["model"]
    if "model" in cfg.get("given_keys", ()) and cfg["model"] != name:
        raise ValueError(f"{cfg['ckpt']}: quantized model '{name}', but model '{cfg['model']}' was given")
    cfg["model"] = name
    return name


def build_model(cfg):
    """The model named by cfg with its weights (see resolve_checkpoint); a quantized checkpoint
    gives the quantized model, in quantized mode."""
    from .models import create_model
    ckpt = str(cfg.get("ckpt") or "")
    if ckpt.endswith(".onnx"):
        from .export.onnx import OnnxModel
        return OnnxModel(ckpt)
    if ckpt.endswith(".mindir"):
        from .export.mindir import MindIRModel
        return MindIRModel(ckpt)
    if cfg.get("ckpt") and quantized_checkpoint_model(cfg):
        from .quant.convert import load_quantized_checkpoint
        return load_quantized_checkpoint(cfg["ckpt"], cfg["model"])[0]
    return create_model(cfg["model"], num_classes=cfg.get("num_classes"), checkpoint=resolve_checkpoint(cfg),
                        drop_head=cfg.get("drop_head", False))
