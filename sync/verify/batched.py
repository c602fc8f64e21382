"""Checksums of many blocks at once, at memory speed: what ``sync.verify.verifier.Verifier`` checks.

A run (``planners.schedule.runs``) read as elements says where the elements are (its source) and where they
land (its destination byte offsets, read as positions). :class:`RunSums` cuts runs into tiles like
the copy programs do; one launch per element size (and padded row width, for strided runs) sums
``h(x)`` and ``h(x)`` times the position inside the tile, in one pass over the elements (Triton on
CUDA, C or numba's parallel loops on the CPU), and the tile's starting position is added after; per-
destination totals come from one ``index_add_``. The result equals the position-weighted checksums of
``sync.verify.checksums`` bit for bit (int64 arithmetic wraps the same way).

Every tile's address is an element offset from one origin: on CUDA a small tensor of ours (offsets
may be negative), on the CPU the lowest address among the ends, with the kernels reading one array
that spans the ends' address range (only the runs' elements are ever read).
"""

from __future__ import annotations

import numpy as np
import torch

from sync.copier import expand
from sync.tensors import host_span

__all__ = ["RunSums", "available"]

_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_WIDE_ROW = 4096  # elements: longer rows of a strided run are summed as contiguous runs, one per row
_NUMPY_WORDS = {1: np.uint8, 2: np.uint16, 4: np.uint32}  # the CPU kernels read unsigned words


def available(device: torch.device) -> bool:
    """Whether batched checksums run on ``device``: Triton on CUDA, C or numba on the CPU."""
    try:
        if device.type == "cuda":
            import triton  # noqa: F401
        elif device.type == "cpu":
            if _cpu_kernels() == "c":
                return True
            import numba  # noqa: F401
        else:
            return False
    except ImportError:
        return False
    return True


def _cpu_kernels() -> str:
    from sync.verify.c_kernel import library

    return "c" if library.get() is not None else "numba"


class RunSums:
    """(S0, S1) added by ``runs`` to ``num_dst`` destinations: run ``i`` is read as words of
    ``itemsize[i]`` bytes (its elements, or wider words: ``sync.verify.words``) and adds to destination
    ``dst_index[i]`` at the positions its ``dst_off`` and ``dst_stride`` (bytes) give; sources are
    ``ends[run["src"]]``."""

    def __init__(self, runs: np.ndarray, itemsize: np.ndarray, dst_index: np.ndarray, num_dst: int,
                 ends: dict[int, torch.Tensor], tile_elems: int = 1 << 15, kernels: str | None = None) -> None:
        """``kernels``: "triton", "c" or "numba" (default: Triton on CUDA; on the CPU C where it builds,
        numba otherwise; Triton on CPU tensors is its interpreter, for tests)."""
        self.num_dst = num_dst
        self.device = next(iter(ends.values())).device
        self.kernels = kernels or ("triton" if self.device.type == "cuda" else _cpu_kernels())
        self.ends = ends  # the tensors stay alive while the tiles point into them
        self.launches: list[tuple] = []  # (kind, base view, table, start positions, destination, width)
        self._staged: list[tuple[torch.Tensor, torch.Tensor]] = []  # (aligned copy, end), refreshed per call
        itemsize = np.asarray(itemsize, dtype=np.int64)
        if self.kernels == "triton":
            ends = self._stage_misaligned(runs, itemsize, ends)
        ids = sorted(ends)
        ptr = np.array([ends[i].data_ptr() for i in ids], dtype=np.int64)
        if self.kernels == "triton":
            self._base = torch.empty(16, dtype=torch.uint8, device=self.device)
            origin = self._base.data_ptr()
        else:  # one array from the lowest end's start (aligned for every element size) to the highest's end
            origin, self._span = host_span(ends.values())
        addr = ptr[np.searchsorted(ids, runs["src"])] + runs["src_off"] - origin
        if (itemsize > 4).any():  # plans move elements of at most 4 bytes; the kernels read no wider words
            raise ValueError("batched checksums read elements of 1, 2 or 4 bytes")
        residue = addr % itemsize  # words that do not start on a multiple of their size from the origin
        for size, skew in sorted(set(zip(itemsize.tolist(), residue.tolist()))):
            m = (itemsize == size) & (residue == skew)
            r = runs[m]
            self._group(int(size), int(skew), (addr[m] - skew) // size, r["nbytes"] // size, r["rows"],
                        r["src_stride"] // size, r["dst_off"] // size, r["dst_stride"] // size, dst_index[m], tile_elems)

    def _stage_misaligned(self, runs, itemsize, ends: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """Triton loads whole words only: an end whose runs read words that its address does not align
        (a view at an odd element, read as 4-byte words) is summed from an aligned copy taken at each call
        (rare: allocations are aligned; bounded by the size of such ends)."""
        ends = dict(ends)
        size = np.zeros(max(ends) + 1 if ends else 0, dtype=np.int64)
        np.maximum.at(size, runs["src"], itemsize)  # the widest word read from each end
        for i, end in list(ends.items()):
            if size[i] and end.data_ptr() % int(size[i]):
                staging = torch.empty_like(end)
                self._staged.append((staging, end))
                ends[i] = staging
        return ends

    def _group(self, size, skew, src, n, rows, s_stride, d0, d_stride, dst, tile) -> None:
        if self.kernels == "triton":
            base = self._base.view(_BITS[size])
        else:  # words from the origin plus ``skew`` bytes (an unaligned view where skew is not 0)
            base = np.frombuffer(self._span, dtype=_NUMPY_WORDS[size], count=(len(self._span) - skew) // size,
                                 offset=skew)
        wide = (rows > 1) & (n >= _WIDE_ROW)
        each, row = expand(rows[wide], np.flatnonzero(wide))
        flat = rows == 1
        f_src = np.concatenate([src[flat], src[each] + row * s_stride[each]])
        f_n = np.concatenate([n[flat], n[each]])
        f_pos = np.concatenate([d0[flat], d0[each] + row * d_stride[each]])
        f_dst = np.concatenate([dst[flat], dst[each]])
        count = -(-f_n // tile)
        run, t = expand(count)
        t = t * tile
        if len(run):
            self._add_flat(size, base, f_src[run] + t, np.minimum(f_n[run] - t, tile), f_pos[run] + t, f_dst[run])
        strided = (rows > 1) & ~wide
        if not strided.any():
            return
        src, n, rows, s_stride, d0, d_stride, dst = (x[strided] for x in (src, n, rows, s_stride, d0, d_stride, dst))
        width = 1 << np.ceil(np.log2(n)).astype(np.int64)
        per_tile = np.maximum(tile // n, 1)
        for w in np.unique(width).tolist():
            sel = np.flatnonzero(width == w)
            count = -(-rows[sel] // per_tile[sel])
            run, first = expand(count, sel)
            first = first * per_tile[run]
            table = np.stack([src[run] + first * s_stride[run], np.minimum(rows[run] - first, per_tile[run]), n[run],
                              s_stride[run], d_stride[run]], axis=1)
            self._add("rows", base, table, d0[run] + first * d_stride[run], dst[run], int(w))

    def _add_flat(self, size, base, src, n, start, dst) -> None:
        """Contiguous tiles. On CUDA a tile whose source is 16-byte aligned is summed in 16-byte words
        (its length, too, a whole number of them: the kernel then issues vector loads, as the copy
        kernels do) and its last few elements go with the unaligned tiles; ``width`` carries the
        alignment, in elements."""
        align = 16 // size if self.kernels == "triton" else 1
        if align > 1:
            body = np.where(src % align == 0, n - n % align, 0)
            whole = body > 0
            if whole.any():
                self._add("flat", base, np.stack([src[whole] // align, body[whole] // align], axis=1), start[whole],
                          dst[whole], align)
            rest = n > body
            src, n, start, dst = src[rest] + body[rest], n[rest] - body[rest], start[rest] + body[rest], dst[rest]
        if len(src):
            self._add("flat", base, np.stack([src, n], axis=1), start, dst, 1)

    def _add(self, kind, base, table, start, dst, width) -> None:
        up = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(self.device)  # noqa: E731
        table = up(table) if self.kernels == "triton" else np.ascontiguousarray(table, dtype=np.int64)  # C and numba read numpy
        self.launches.append((kind, base, table, up(start), up(dst), width))

    def __call__(self) -> torch.Tensor:
        """[num_dst, 2] int64 (S0, S1) on the device."""
        total = torch.zeros((self.num_dst, 2), dtype=torch.int64, device=self.device)
        for staging, end in self._staged:
            staging.copy_(end)
        for kind, base, table, start, dst, width in self.launches:
            out = torch.empty((table.shape[0], 2), dtype=torch.int64, device=self.device)
            if self.kernels == "c":
                from sync.verify.c_kernel import tile_sums

                tile_sums(kind, base, table, out.numpy())
            elif self.kernels == "numba":
                from sync.verify.cpu_kernel import tile_sums_flat, tile_sums_rows

                (tile_sums_flat if kind == "flat" else tile_sums_rows)(base, table, out.numpy())
            elif kind == "flat":
                from sync.verify.kernel import tile_sums_flat

                tile_sums_flat(base, table, out, width)
            else:
                from sync.verify.kernel import tile_sums_rows

                tile_sums_rows(base, table, out, width)
            s1 = start * out[:, 0] + out[:, 1]  # the tile's first position, added (wrapping like the CPU sums)
            total.index_add_(0, dst, torch.stack([out[:, 0], s1], dim=1))
        return total
