"""VT-PTQ: MindSpore implementation of post-training quantization for vision transformers."""

import os as _os
import sys as _sys

# numpy's OpenBLAS: an idle worker thread spins (sched_yield) for about 2^28 cycles after each
# threaded product before it sleeps. The interval search interleaves matrix products with numpy
# and thread-pool work on every core, which that spinning slows (about 8 % of a DeiT-S
# calibration on 2 cores, bench/calib_speed.py). Set before numpy loads its BLAS; a user's own
# setting is kept. Spinning changes no result.
if "numpy" not in _sys.modules:
    _os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
