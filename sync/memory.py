"""Measured peak memory of a block of work beyond what was held before it (sync's extra memory).

On CUDA: the caching allocator's peak over what was allocated before (exact, per device). On Linux
CPUs: the resident-set high-water mark, reset through ``/proc/self/clear_refs``, over the resident
set before -- page-grained and process-wide (threads, Python objects, allocator slack included), so
an upper bound on what the block's tensors took. For that, glibc's malloc is told to serve every
block of 128 KiB or more by its own mapping, returned when freed (by default the threshold grows
after frees, and freed memory stays resident where the next block would reuse it unseen). Elsewhere:
None.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from pathlib import Path

import torch

__all__ = ["PeakMemory"]


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc); setting it also turns off its dynamic adjustment
_fixed = False


def _fix_mmap_threshold() -> None:
    global _fixed
    if not _fixed:
        _fixed = True
        try:
            ctypes.CDLL(ctypes.util.find_library("c")).mallopt(M_MMAP_THRESHOLD, 128 << 10)
        except (OSError, AttributeError):
            pass


class PeakMemory:
    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.bytes: int | None = None
        if self.device.type == "cpu":
            _fix_mmap_threshold()

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from now
                self._before = _status_kb("VmRSS") << 10
            except (OSError, KeyError):
                self._before = None
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._before
        elif self._before is not None:
            self.bytes = max((_status_kb("VmHWM") << 10) - self._before, 0)
