"""Full-precision throughput of a model in PYNATIVE and GRAPH mode, in one process.

    python bench/bench_fp.py [--model deit_small_patch16_224] [--batch-size 32] [--iters 5]

Random weights and inputs; prints images/second of each mode and their ratio.
"""
import argparse
import os
import sys
import time

os.environ.setdefault("GLOG_v", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402

from src.api import create_model, get_data_config  # noqa: E402


def throughput(model, x, iters, warmup=2):
    model.set_train(False)
    t = ms.Tensor(x)
    for _ in range(warmup):
        model(t).asnumpy()
    start = time.perf_counter()
    for _ in range(iters):
        model(t).asnumpy()
    return iters * len(x) / (time.perf_counter() - start)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="deit_small_patch16_224")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--device-target", default="CPU")
    args = p.parse_args(argv)
    ms.set_device(args.device_target)
    ms.set_seed(0)
    c, h, w = get_data_config(args.model)["input_size"]
    x = np.random.default_rng(0).standard_normal((args.batch_size, c, h, w)).astype(np.float32)
    rates = {}
    for mode, ms_mode in (("pynative", ms.PYNATIVE_MODE), ("graph", ms.GRAPH_MODE)):
        ms.set_context(mode=ms_mode)
        rates[mode] = throughput(create_model(args.model), x, args.iters)
        print(f"{args.model} batch {args.batch_size} {mode:8s}: {rates[mode]:8.2f} images/s", flush=True)
    print(f"graph / pynative: {rates['graph'] / rates['pynative']:.2f}x")


if __name__ == "__main__":
    main()
