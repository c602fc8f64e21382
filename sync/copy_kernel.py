"""The Triton kernel behind ``sync.copier`` (imported only on CUDA machines with Triton).

One program per tile: it reads the tile's source, destination and length (in units of ``VEC``
words, so Triton knows each address is ``VEC``-word aligned and issues vector loads and stores)
and copies it in blocks; tiles of strided runs also read a row count and the two row strides. Every address is an offset from one base pointer, so tensors from
different allocations need no pointer table.

``KernelConfig`` holds the knobs ``rlsync bench gpu --kernel-sweep`` compares: words per loop step and
warps per program. (Streaming cache hints -- loads evicted first, stores ``.cs`` -- were tried: 3-5%
slower on an H200.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

__all__ = ["KernelConfig", "DEFAULT", "copy_tiles", "copy_rows"]


@dataclass(frozen=True)
class KernelConfig:
    # one 16-byte vector per thread per step was fastest on an H200 (1024 words and 8 warps, or 2048 and
    # 16): 0.95 of a flat copy on the DeepSeek-V3-like case's programs, 0.97 on the dense one's, against
    # 0.92 for 2048 words and 4 warps (``rlsync bench gpu -- --kernel-sweep``, results/kernel_sweep_h200.json)
    block: int = 1024  # words per loop step
    num_warps: int = 8


DEFAULT = KernelConfig()


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


def copy_tiles(base: torch.Tensor, table: torch.Tensor, vec: int, tiles: int, config: KernelConfig = DEFAULT) -> None:
    _copy_tiles[(tiles,)](base, table, VEC=vec, BLOCK=config.block, num_warps=config.num_warps)


def copy_rows(base: torch.Tensor, table: torch.Tensor, vec: int, width: int, tiles: int,
              config: KernelConfig = DEFAULT) -> None:
    _copy_rows[(tiles,)](base, table, VEC=vec, WIDTH=width, ROWS=max(config.block // width, 1),
                         num_warps=config.num_warps)
