"""Triton kernels behind ``sync.verify.batched`` (imported only on CUDA machines with Triton).

Per tile they sum ``h(x)`` over its elements (``x`` the element's bit pattern as an unsigned word,
``h`` as in ``sync.verify.checksums``: mod 2**32) and ``h(x)`` times the element's destination position
relative to the tile's first; the caller adds the tile's starting position. The sums wrap in int64,
like the CPU checksums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sync.verify.checksums import MIX_K1, MIX_K2

__all__ = ["tile_sums_flat", "tile_sums_rows"]

BLOCK = 2048  # elements per loop step


@triton.jit
def _mix(x, MASK: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr):
    """h of loaded elements (signed, as the base's view): their unsigned word, mixed mod 2**32, in int64."""
    word = x.to(tl.int64) & MASK
    return (word * (K1 + word * K2)) & 0xFFFFFFFF


@triton.jit
def _sums_flat(base, table, out, MASK: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    src = tl.load(table + pid * 2)  # elements from base
    n = tl.load(table + pid * 2 + 1)
    acc0 = tl.zeros([BLOCK], dtype=tl.int64)
    acc1 = tl.zeros([BLOCK], dtype=tl.int64)
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        h = _mix(tl.load(base + src + offs, mask=offs < n, other=0), MASK, K1, K2)  # h(0) = 0: masked lanes add nothing
        acc0 += h
        acc1 += h * offs
    tl.store(out + pid * 2, tl.sum(acc0, axis=0))
    tl.store(out + pid * 2 + 1, tl.sum(acc1, axis=0))


@triton.jit
def _sums_rows(base, table, out, MASK: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, WIDTH: tl.constexpr,
               ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    src = tl.load(table + pid * 5)
    rows = tl.load(table + pid * 5 + 1)
    width = tl.load(table + pid * 5 + 2)
    src_stride = tl.load(table + pid * 5 + 3)
    dst_stride = tl.load(table + pid * 5 + 4)
    cols = tl.arange(0, WIDTH)[None, :]
    acc0 = tl.zeros([ROWS, WIDTH], dtype=tl.int64)
    acc1 = tl.zeros([ROWS, WIDTH], dtype=tl.int64)
    for r0 in range(0, rows, ROWS):
        r = r0 + tl.arange(0, ROWS)[:, None]
        h = _mix(tl.load(base + src + r * src_stride + cols, mask=(r < rows) & (cols < width), other=0), MASK, K1, K2)
        acc0 += h
        acc1 += h * (r * dst_stride + cols)
    tl.store(out + pid * 2, tl.sum(tl.sum(acc0, axis=1), axis=0))
    tl.store(out + pid * 2 + 1, tl.sum(tl.sum(acc1, axis=1), axis=0))


def tile_sums_flat(base: torch.Tensor, table: torch.Tensor, out: torch.Tensor) -> None:
    _sums_flat[(table.shape[0],)](base, table, out, MASK=_mask(base), K1=MIX_K1, K2=MIX_K2, BLOCK=BLOCK, num_warps=4)


def tile_sums_rows(base: torch.Tensor, table: torch.Tensor, out: torch.Tensor, width: int) -> None:
    _sums_rows[(table.shape[0],)](base, table, out, MASK=_mask(base), K1=MIX_K1, K2=MIX_K2, WIDTH=width,
                                  ROWS=max(BLOCK // width, 1),
                                  num_warps=4)


def _mask(base: torch.Tensor) -> int:
    return (1 << 8 * base.element_size()) - 1
