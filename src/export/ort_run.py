"""Run an exported ONNX model with onnxruntime on images in a .npy file, optionally on an
emulated CPU, to see the integer kernels another x86-64 CPU dispatches to.

    python -m src.export.ort_run MODEL.onnx IMAGES.npy LOGITS.npy [--batch-size 100] [--threads 1]

onnxruntime picks its integer kernels by the CPU it finds (AVX2, AVX-512, VNNI, ...), and no
setting lowers that choice. `run_on_cpu(..., cpu="Haswell")` runs this module under
`qemu-x86_64 -cpu Haswell` (Debian/Ubuntu package qemu-user), an AVX2 CPU without AVX-512 or
VNNI, whose uint8 x int8 kernel adds two products in saturating 16-bit arithmetic. This module
imports only numpy and onnxruntime, so that it starts quickly under emulation.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np


def run(model, images, batch_size=100, threads=1):
    """Logits (N, classes) float32 of `images` (N, C, H, W), ORT_ENABLE_ALL, in batches."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads)
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    images = np.ascontiguousarray(images, np.float32)
    return np.concatenate([sess.run(None, {name: images[i:i + batch_size]})[0]
                           for i in range(0, len(images), batch_size)])


def qemu():
    """Path of qemu-x86_64 on an x86-64 machine, else None."""
    import platform
    return shutil.which("qemu-x86_64") if platform.machine() in ("x86_64", "AMD64") else None


def run_on_cpu(model, images, cpu=None, batch_size=100, threads=1, timeout=None):
    """run() in this process (cpu None) or in a child process under `qemu-x86_64 -cpu CPU`."""
    if not cpu:
        return run(model, images, batch_size, threads)
    emulator = qemu()
    if emulator is None:
        raise RuntimeError(f"emulating CPU {cpu} needs qemu-x86_64 on an x86-64 machine "
                           "(apt-get install qemu-user)")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = os.path.join(tmp, "images.npy"), os.path.join(tmp, "logits.npy")
        np.save(inp, np.ascontiguousarray(images, np.float32))
        cmd = [emulator, "-cpu", cpu, sys.executable, "-m", "src.export.ort_run", str(model), inp, out,
               "--batch-size", str(batch_size), "--threads", str(threads)]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            err = [line for line in proc.stderr.splitlines() if "TCG doesn't support" not in line]
            raise RuntimeError(f"onnxruntime under qemu-x86_64 -cpu {cpu} failed: {' | '.join(err[-3:])}")
        return np.load(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("images", help=".npy float32 (N, C, H, W)")
    p.add_argument("logits", help=".npy written with the logits")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    np.save(a.logits, run(a.model, np.load(a.images), a.batch_size, a.threads))


if __name__ == "__main__":
    main()
