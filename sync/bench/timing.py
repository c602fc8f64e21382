"""Wall-clock timing of a benchmark step, waiting for the GPU on either side where it runs."""

from __future__ import annotations

import time

import torch

__all__ = ["timed"]


def timed(fn, repeats: int, device: torch.device) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn``, with the device's queued work finished before and after."""
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        out.append(time.perf_counter() - t0)
    return out
