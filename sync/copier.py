"""Batched byte copies on one device: a table of runs (``planners.runs``) in a few launches.

Copying tens of thousands of small slices one ``copy_`` at a time is bound by launch overhead, not
memory bandwidth. :class:`CopyProgram` binds a run table to the tensors at its ends once; on CUDA
with Triton it cuts the runs into tiles and copies them all with one kernel launch per alignment
class, driven by per-tile (source, destination, length) tables that live on the device. Elsewhere
(CPU, or no Triton) it is one ``torch._foreach_copy_`` over byte views built at bind time. A
program stays valid while the tensors stay where they are (check :func:`addresses`).
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CopyProgram", "addresses", "triton_available"]

_CLASSES = (16, 8, 4, 2, 1)  # alignment (bytes) shared by a run's source, destination and length
_WORD = {16: (torch.int32, 4), 8: (torch.int32, 2), 4: (torch.int32, 1), 2: (torch.int16, 1), 1: (torch.uint8, 1)}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def addresses(ends: dict[int, torch.Tensor]) -> tuple[int, ...]:
    """Where the tensors are: a program built for other addresses must be rebuilt."""
    return tuple(t.data_ptr() for t in ends.values())


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class CopyProgram:
    """``runs`` (``planners.runs.RUN_DTYPE``) between ``ends`` (id -> contiguous tensor, one device)."""

    def __init__(self, runs: np.ndarray, ends: dict[int, torch.Tensor], tile_bytes: int = 64 << 10,
                 use_triton: bool | None = None) -> None:
        self.nbytes = int(runs["nbytes"].sum()) if len(runs) else 0
        self.num_runs = len(runs)
        devices = {t.device for t in ends.values()}
        if len(devices) > 1:
            raise ValueError(f"a copy program works on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop() if devices else torch.device("cpu")
        if use_triton is None:
            use_triton = self.device.type == "cuda" and triton_available()
        self.launches: list[tuple] = []
        self.pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        if not len(runs):
            return
        if use_triton:
            self._tiles(runs, ends, tile_bytes)
        else:
            flat = {k: _bytes(t) for k, t in ends.items()}
            self.pairs = ([flat[int(d)][o: o + n] for d, o, n in zip(runs["dst"], runs["dst_off"], runs["nbytes"])],
                          [flat[int(s)][o: o + n] for s, o, n in zip(runs["src"], runs["src_off"], runs["nbytes"])])

    def _tiles(self, runs: np.ndarray, ends: dict[int, torch.Tensor], tile_bytes: int) -> None:
        ids = sorted(ends)
        ptr = np.array([ends[i].data_ptr() for i in ids], dtype=np.int64)
        size = np.array([ends[i].numel() * ends[i].element_size() for i in ids], dtype=np.int64)
        slot_s, slot_d = np.searchsorted(ids, runs["src"]), np.searchsorted(ids, runs["dst"])
        if (runs["src_off"] + runs["nbytes"] > size[slot_s]).any() or (runs["dst_off"] + runs["nbytes"] > size[slot_d]).any():
            raise ValueError("a run reaches past the end of its tensor")
        self._base = torch.empty(16, dtype=torch.uint8, device=self.device)  # every address is an offset from here
        base = self._base.data_ptr()
        src, dst, n = ptr[slot_s] + runs["src_off"] - base, ptr[slot_d] + runs["dst_off"] - base, runs["nbytes"]
        bits = src | dst | n
        align = np.minimum(bits & -bits, 16)  # lowest set bit: the widest unit all three are multiples of
        for k in _CLASSES:
            m = align == k
            if not m.any():
                continue
            tile = max(tile_bytes // k, 1)  # units per tile
            s, d, u = src[m] // k, dst[m] // k, n[m] // k
            count = -(-u // tile)
            run = np.repeat(np.arange(len(u)), count)
            t = (np.arange(len(run)) - np.repeat(np.cumsum(count) - count, count)) * tile
            tables = [torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
                      for x in (s[run] + t, d[run] + t, np.minimum(u[run] - t, tile))]
            word, vec = _WORD[k]
            self.launches.append((self._base.view(word), *tables, vec, len(run)))

    def __call__(self) -> None:
        if self.launches:
            from sync.copy_kernel import copy_tiles

            for base, src, dst, length, vec, tiles in self.launches:
                copy_tiles(base, src, dst, length, vec, tiles)
        elif self.pairs[0]:
            torch._foreach_copy_(*self.pairs)
