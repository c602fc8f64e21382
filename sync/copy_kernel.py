"""The Triton kernel behind ``sync.copier`` (imported only on CUDA machines with Triton).

One program per tile: it reads the tile's source, destination and length (in units of ``VEC``
words, so Triton knows each address is ``VEC``-word aligned and issues vector loads and stores)
and copies it in blocks; tiles of strided runs also read a row count and the two row strides. Every address is an offset from one base pointer, so tensors from
different allocations need no pointer table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["copy_tiles"]

BLOCK = 2048  # words per loop step


@triton.jit
def _copy_tiles(base, table, VEC: tl.constexpr, BLOCK: tl.constexpr):
    row = table + tl.program_id(0).to(tl.int64) * 3
    src = tl.load(row) * VEC  # words from base; multiples of VEC by construction
    dst = tl.load(row + 1) * VEC
    n = tl.load(row + 2) * VEC
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(base + dst + offs, tl.load(base + src + offs, mask=mask), mask=mask)


@triton.jit
def _copy_rows(base, table, VEC: tl.constexpr, WIDTH: tl.constexpr, ROWS: tl.constexpr):
    """A tile of a strided run: ``rows`` rows of ``width`` words, ``ROWS`` rows per step."""
    row = table + tl.program_id(0).to(tl.int64) * 6
    src = tl.load(row) * VEC
    dst = tl.load(row + 1) * VEC
    rows = tl.load(row + 2)
    width = tl.load(row + 3) * VEC
    src_stride = tl.load(row + 4) * VEC
    dst_stride = tl.load(row + 5) * VEC
    cols = tl.arange(0, WIDTH)[None, :]
    for r0 in range(0, rows, ROWS):
        r = r0 + tl.arange(0, ROWS)[:, None]
        mask = (r < rows) & (cols < width)
        x = tl.load(base + src + r * src_stride + cols, mask=mask)
        tl.store(base + dst + r * dst_stride + cols, x, mask=mask)


def copy_tiles(base: torch.Tensor, table: torch.Tensor, vec: int, tiles: int) -> None:
    _copy_tiles[(tiles,)](base, table, VEC=vec, BLOCK=BLOCK, num_warps=4)


def copy_rows(base: torch.Tensor, table: torch.Tensor, vec: int, width: int, tiles: int) -> None:
    _copy_rows[(tiles,)](base, table, VEC=vec, WIDTH=width, ROWS=max(BLOCK // width, 1), num_warps=4)
