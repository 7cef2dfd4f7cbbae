"""Agreement of the integer ONNX model with the fake-quantized MindSpore model, on this CPU or
on an emulated one.

A quantized checkpoint (quant.py's quantized.ckpt of an embedded-model run) is exported with
src.export.onnx.export_onnx; the fake-quantized model (as `eval.py --ckpt` builds it) and the
ONNX model (onnxruntime, ORT_ENABLE_ALL: integer kernels) give logits on the embedded test
split. Printed: top-1 agreement, median and largest |logit difference| against the logit scale
(largest |fake-quant logit|), both top-1 accuracies, and the kernel class of every integer
product (src.export.onnx.check_integer_products).

    python quant.py --method minmax --w-bits 8 --a-bits 8 --output outputs/w8a8
    python bench/onnx_agreement.py --ckpt outputs/w8a8/quantized.ckpt
    python bench/onnx_agreement.py --ckpt outputs/w8a8/quantized.ckpt --cpu Haswell   # AVX2, no VNNI
    DNNL_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell python bench/onnx_agreement.py --ckpt ... --cpu Haswell

--cpu runs onnxruntime under `qemu-x86_64 -cpu CPU` (package qemu-user; slow, emulated): the
kernels that CPU's instruction set selects (onnxruntime has no setting for that). The
MindSpore side runs natively; DNNL_MAX_CPU_ISA lowers its oneDNN kernels.
Target (issue #17): agreement >= 99.9 % and median |diff| <= 1e-4 x the logit scale.
"""
import argparse
import collections
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

TARGET_AGREEMENT, TARGET_MEDIAN = 0.999, 1e-4


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="quantized checkpoint of an embedded-model run (quantized.ckpt)")
    p.add_argument("--cpu", default=None, help="qemu CPU model to run onnxruntime on (e.g. Haswell); default: this CPU")
    p.add_argument("--max-images", type=int, default=None, help="first N test images (default: all 10,000)")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    a = p.parse_args(argv)

    from src.api import (export_onnx, get_data_config, load_embedded, load_quantized_checkpoint, normalize, predict,
                         run_on_cpu, setup_context, write_bench_json)

    setup_context("CPU", "graph")
    model, meta = load_quantized_checkpoint(a.ckpt)[:2]
    name = meta["model"]
    dc = get_data_config(name)
    images, labels = load_embedded("test")
    images, labels = images[:a.max_images], labels[:a.max_images]
    x = normalize(images, dc["mean"], dc["std"])
    start = time.time()
    ref = predict(model, x, a.batch_size)
    ms_seconds = time.time() - start
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        proto = export_onnx(model, path, model_name=name)
        products = json.loads({m.key: m.value for m in proto.metadata_props}["integer_products"])
        start = time.time()
        got = run_on_cpu(path, x, cpu=a.cpu, batch_size=a.batch_size)
        ort_seconds = time.time() - start
    diff = np.abs(got - ref).max(axis=1)
    scale = float(np.abs(ref).max())
    out = dict(ckpt=a.ckpt, model=name, cpu=a.cpu or "native", images=len(x),
               dnnl_max_cpu_isa=os.environ.get("DNNL_MAX_CPU_ISA"),
               agreement=float((got.argmax(1) == ref.argmax(1)).mean()),
               median_abs_diff=float(np.median(diff)), max_abs_diff=float(diff.max()), logit_scale=scale,
               top1_fake_quant=100.0 * float((ref.argmax(1) == labels).mean()),
               top1_onnx=100.0 * float((got.argmax(1) == labels).mean()),
               kernels=dict(collections.Counter(v["kernel"] for v in products.values())),
               seconds_mindspore=round(ms_seconds, 1), seconds_onnxruntime=round(ort_seconds, 1))
    out["meets_target"] = out["agreement"] >= TARGET_AGREEMENT and out["median_abs_diff"] <= TARGET_MEDIAN * scale
    print(f"{name} on {out['cpu']} CPU ({len(x)} images): agreement {100 * out['agreement']:.2f} %, median |diff| "
          f"{out['median_abs_diff']:.3g}, max {out['max_abs_diff']:.3g}, logit scale {scale:.3g} "
          f"(median/scale {out['median_abs_diff'] / scale:.2g}); top-1 fake-quant {out['top1_fake_quant']:.2f}, "
          f"ONNX {out['top1_onnx']:.2f}; kernels {out['kernels']}; target {'met' if out['meets_target'] else 'MISSED'}")
    if a.json:
        write_bench_json(a.json, out)
    return out


if __name__ == "__main__":
    main()
