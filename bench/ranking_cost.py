"""Cost of the ranking-aware loss on DeiT-S attention maps: all column pairs against a sample.

The interval search of `attn.matmul1` scores candidates in chunks; for DeiT-S (6 heads, 197
tokens) with the default 8M-element chunks one call of ranking_loss sees 36 candidates of
one calibration image. This times one such call with `--pairs` sampled pairs per row and
with all T(T-1)/2 = 19,306 pairs: ranking_loss_all_pairs (what the search uses with
`ranking_pairs: 0`), the sampled-pairs path given every pair (what it used before) and
ranking_loss_reference (the pairs=None form of commit fdfbc73), in one process. A search
of one operand over 100 candidates and 32 images makes 3 x 32 = 96 such calls.

    python bench/ranking_cost.py                 # 256 sampled pairs vs all pairs
    python bench/ranking_cost.py --skip-slow --kernels   # and the compiled hinge kernels vs numpy

`--kernels` also times the sampled and all-pairs calls with the compiled hinge kernels
(src/kernels, on by default where a C++ compiler is found) against numpy's passes
(VTPTQ_CPU_KERNELS=0), in this process, and checks that their results are the same bits.
    python bench/ranking_cost.py --pairs 1024 --repeats 3
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from src.api import ranking_loss, ranking_loss_all_pairs, ranking_loss_reference, sample_pairs  # noqa: E402


def timed(fn, repeats):
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=256, help="sampled column pairs per row (default 256)")
    p.add_argument("--candidates", type=int, default=36, help="candidates per call (default 36, DeiT-S)")
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--tokens", type=int, default=197)
    p.add_argument("--repeats", type=int, default=2, help="timed calls of each; the fastest counts (default 2)")
    p.add_argument("--skip-slow", action="store_true", help="skip the sampled-pairs path given every pair (slow)")
    p.add_argument("--kernels", action="store_true",
                   help="time the compiled hinge kernels against numpy's passes (VTPTQ_CPU_KERNELS=0)")
    args = p.parse_args(argv)
    rng = np.random.default_rng(0)
    t, h, c = args.tokens, args.heads, args.candidates
    fp = rng.standard_normal((1, h, t, t)).astype(np.float32)
    q = (fp[None] + 0.05 * rng.standard_normal((c, 1, h, t, t))).astype(np.float32)
    sampled = sample_pairs(t, args.pairs)
    all_pairs = t * (t - 1) // 2
    print(f"ranking_loss, {c} candidates x 1 image x {h} heads x {t} rows, load average {os.getloadavg()[0]:.2f}")
    s = timed(lambda: ranking_loss(fp, q, pairs=sampled), args.repeats)
    print(f"  {len(sampled[0])} sampled pairs per row: {s:.3f} s per call", flush=True)
    a = timed(lambda: ranking_loss_all_pairs(fp, q), args.repeats)
    print(f"  all {all_pairs} pairs per row, ranking_loss_all_pairs (the search with ranking_pairs 0): "
          f"{a:.3f} s per call", flush=True)
    if not args.skip_slow:
        every = sample_pairs(t, 0)
        t0 = time.perf_counter()
        g = ranking_loss(fp, q, pairs=every)
        g_s = time.perf_counter() - t0
        print(f"  all pairs, the sampled-pairs path given every pair (the search with ranking_pairs 0 "
              f"before; one call): {g_s:.3f} s per call ({g_s / a:.1f}x; largest difference "
              f"{float(np.abs(g - ranking_loss_all_pairs(fp, q)).max()):.1e})", flush=True)
    r = timed(lambda: ranking_loss_reference(fp, q), args.repeats)
    diff = float(np.abs(ranking_loss(fp, q) - ranking_loss_reference(fp, q)).max())
    print(f"  all pairs, ranking_loss_reference (fdfbc73's pairs=None form): {r:.3f} s per call "
          f"({r / a:.1f}x; ranking_loss(pairs=None) differs from it by at most {diff:.1e})")
    print(f"  all pairs / sampled: {a / s:.1f}x; per operand search (96 calls): {96 * s:.1f} s vs {96 * a:.1f} s")
    if args.kernels:
        compare_kernels(fp, q, sampled, args.repeats)


def compare_kernels(fp, q, sampled, repeats):
    """Each form timed with the compiled kernels and with numpy's passes; their results' bits compared."""
    calls = {"sampled pairs": lambda: ranking_loss(fp, q, pairs=sampled), "all pairs": lambda: ranking_loss_all_pairs(fp, q)}
    before = os.environ.get("VTPTQ_CPU_KERNELS")
    try:
        for label, fn in calls.items():
            os.environ["VTPTQ_CPU_KERNELS"] = "1"
            k_out, k_s = fn(), timed(fn, repeats)
            os.environ["VTPTQ_CPU_KERNELS"] = "0"
            n_out, n_s = fn(), timed(fn, repeats)
            same = "same bits" if k_out.tobytes() == n_out.tobytes() else "DIFFERENT"
            print(f"  {label}: numpy {n_s:.3f} s, compiled kernel {k_s:.3f} s per call ({n_s / k_s:.1f}x; {same})")
    finally:
        if before is None:
            os.environ.pop("VTPTQ_CPU_KERNELS", None)
        else:
            os.environ["VTPTQ_CPU_KERNELS"] = before

if __name__ == "__main__":
    main()
