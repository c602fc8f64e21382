"""The CPU kernels behind ``sync.verify.batched`` (numba; the Triton kernels' twins in ``sync.verify.kernel``).

Per tile, in one pass over its elements: the sum of ``h(x)`` (``x`` the element's bit pattern as an
unsigned word, ``h(x) = x * K1 + x * x * K2 mod 2**32``, in 32-bit multiplies) and of ``h(x)`` times the
element's destination position relative to the tile's first, wrapping modulo 2**64 as the torch and
Triton checksums do (contiguous tiles in sixteen lanes, below). Tiles run in parallel on the machine's cores. ``base`` is one array over the address
range every tile lies in (see ``RunSums``): tiles say where they are as element offsets into it.
"""

from __future__ import annotations

import numba
import numpy as np

import sync.numba_config  # noqa: F401  (before any kernel runs)
from sync.verify.checksums import MIX_K1, MIX_K2

__all__ = ["tile_sums_flat", "tile_sums_rows", "load"]

_K1 = np.uint32(MIX_K1)
_K2 = np.uint32(MIX_K2)


# Contiguous tiles are summed in LANES lanes: element ``LANES * b + j`` adds to lane ``j``'s sum, and its
# position weight splits as ``LANES * b`` (times the block's sum, once a block) plus ``j`` (times the
# lane's sum, once at the end), exact modulo 2**64. Sixteen running sums vectorize: 1.26x (bf16) and 1.31x
# (32-bit words) one running sum, side by side here. The rows of strided tiles (under 4,096 elements)
# keep one running sum: lanes made them 0.74-0.81x at 64-element rows.
LANES = 16


@numba.njit(parallel=True, cache=True, nogil=True)
def tile_sums_flat(base, table, out):
    """``table [tiles, 2]``: (first element, elements); ``out [tiles, 2]``: (S0, S1 from the tile's start)."""
    for t in numba.prange(table.shape[0]):
        first, n = table[t, 0], table[t, 1]
        lanes = np.zeros(LANES, dtype=np.uint64)
        s1 = np.uint64(0)
        blocks = n // LANES
        for b in range(blocks):
            block = np.uint64(0)
            for j in range(LANES):
                x = np.uint32(base[first + b * LANES + j])  # base holds unsigned words: zero-extended
                h = np.uint64(np.uint32(x * np.uint32(_K1 + np.uint32(x * _K2))))  # x * K1 + x * x * K2
                lanes[j] += h
                block += h
            s1 += np.uint64(b * LANES) * block
        s0 = np.uint64(0)
        for j in range(LANES):
            s0 += lanes[j]
            s1 += np.uint64(j) * lanes[j]
        for k in range(blocks * LANES, n):
            x = np.uint32(base[first + k])
            h = np.uint64(np.uint32(x * np.uint32(_K1 + np.uint32(x * _K2))))
            s0 += h
            s1 += h * np.uint64(k)
        out[t, 0] = np.int64(s0)
        out[t, 1] = np.int64(s1)


@numba.njit(parallel=True, cache=True, nogil=True)
def tile_sums_rows(base, table, out):
    """``table [tiles, 5]``: (first element, rows, row width, source row stride, destination row stride)."""
    for t in numba.prange(table.shape[0]):
        first, rows, width, src_stride, dst_stride = table[t, 0], table[t, 1], table[t, 2], table[t, 3], table[t, 4]
        s0 = np.uint64(0)
        s1 = np.uint64(0)
        for r in range(rows):
            row_first = first + r * src_stride
            row_pos = np.uint64(r * dst_stride)
            row0 = np.uint64(0)
            row1 = np.uint64(0)
            for k in range(width):
                x = np.uint32(base[row_first + k])
                h = np.uint64(np.uint32(x * np.uint32(_K1 + np.uint32(x * _K2))))
                row0 += h
                row1 += h * np.uint64(k)
            s0 += row0
            s1 += row1 + row_pos * row0
        out[t, 0] = np.int64(s0)
        out[t, 1] = np.int64(s1)


def load() -> None:
    """Compile both kernels for every word size the checksums read (from numba's cache where it holds
    them), running neither: what a process that forks ranks does once (``sync.run.preload``)."""
    import ctypes

    span = (ctypes.c_char * 16)()  # the arrays RunSums passes: numpy views of a ctypes array
    table = numba.typeof(np.zeros((1, 2), dtype=np.int64))
    for word in (np.uint8, np.uint16, np.uint32):
        for kernel in (tile_sums_flat, tile_sums_rows):
            kernel.compile((numba.typeof(np.frombuffer(span, dtype=word)), table, table))
