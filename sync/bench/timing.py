"""Wall-clock timing of a benchmark step, waiting for the GPU on either side where it runs, the
garbage collections that ran inside it, and the cores a benchmark may use."""

from __future__ import annotations

import gc
import os
import time

import torch

__all__ = ["timed", "Collections", "usable_cores"]


def usable_cores() -> int:
    """The cores this process may run on (its affinity where the OS says, else every core)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


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


class Collections:
    """Seconds Python's garbage collector ran inside ``with`` blocks: one entry of ``seconds`` per block."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._started: list[float] = []
        self._callback = self._on  # one bound method: leaving a block allocates nothing the collector counts

    def _on(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started.append(time.perf_counter())
        elif self._started:
            self.seconds[-1] += time.perf_counter() - self._started.pop()

    def __enter__(self) -> "Collections":
        self.seconds.append(0.0)
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        gc.callbacks.remove(self._callback)
