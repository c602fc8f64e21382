"""The Triton kernel behind ``sync.copier`` (imported only on CUDA machines with Triton).

One program per tile: it reads the tile's source, destination and length (in units of ``VEC``
words, so Triton knows each address is ``VEC``-word aligned and issues vector loads and stores)
and copies it in blocks. Every address is an offset from one base pointer, so tensors from
different allocations need no pointer table.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["copy_tiles"]

BLOCK = 2048  # words per loop step


@triton.jit
def _copy_tiles(base, src_tab, dst_tab, len_tab, VEC: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    src = tl.load(src_tab + pid) * VEC  # words from base; a multiple of VEC by construction
    dst = tl.load(dst_tab + pid) * VEC
    n = tl.load(len_tab + pid) * VEC
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(base + dst + offs, tl.load(base + src + offs, mask=mask), mask=mask)


def copy_tiles(base: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, length: torch.Tensor, vec: int,
               tiles: int) -> None:
    _copy_tiles[(tiles,)](base, src, dst, length, VEC=vec, BLOCK=BLOCK, num_warps=4)
