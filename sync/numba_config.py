"""numba's settings for rlsync's CPU kernels (checksums, FP8 quantization), made before any of them runs."""

from __future__ import annotations

import os

import numba

if "NUMBA_THREADING_LAYER" not in os.environ:
    # numba's OpenMP layer keeps its threads spinning after each parallel loop, beside torch's own
    # OpenMP pool: with several sync processes on a few cores that took the cores from the transfer
    # (bench_moe's sync 0.44 s -> 1.6 s); the work-queue layer's threads sleep
    numba.config.THREADING_LAYER = "workqueue"
