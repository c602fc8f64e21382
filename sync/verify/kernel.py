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
    """h of loaded elements (signed, as the base's view): their unsigned word, mixed mod 2**32 in 32-bit
    multiplies (wrapping), returned zero-extended to int64."""
    word = x.to(tl.int32) & MASK
    h = word * (K1 + word * K2)
    return h.to(tl.int64) & 0xFFFFFFFF


@triton.jit
def _sums_flat(base, table, out, MASK: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, BLOCK: tl.constexpr,
               ALIGN: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    # elements from base, and how many: in units of ALIGN elements, so that Triton knows both are
    # multiples of it and loads whole vectors
    src = tl.load(table + pid * 2) * ALIGN
    n = tl.load(table + pid * 2 + 1) * ALIGN
    # lane j sees positions step * BLOCK + j. Per lane: sum = sum of h, running = the sum of the sums after
    # each step, so that sum(step * h) = steps * sum - running: additions per element, no 64-bit product
    lane_sum = tl.zeros([BLOCK], dtype=tl.int64)
    running = tl.zeros([BLOCK], dtype=tl.int64)
    steps = 0
    for i in range(0, n, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        lane_sum += _mix(tl.load(base + src + offs, mask=offs < n, other=0), MASK, K1, K2)  # h(0) = 0: masked lanes add nothing
        running += lane_sum
        steps += 1
    weighted = (steps * lane_sum - running) * BLOCK + tl.arange(0, BLOCK).to(tl.int64) * lane_sum
    tl.store(out + pid * 2, tl.sum(lane_sum, axis=0))
    tl.store(out + pid * 2 + 1, tl.sum(weighted, axis=0))


@triton.jit
def _sums_rows(base, table, out, MASK: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr, WIDTH: tl.constexpr,
               ROWS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    src = tl.load(table + pid * 5)
    rows = tl.load(table + pid * 5 + 1)
    width = tl.load(table + pid * 5 + 2)
    src_stride = tl.load(table + pid * 5 + 3)
    dst_stride = tl.load(table + pid * 5 + 4)
    lane_row = tl.arange(0, ROWS)[:, None]
    cols = tl.arange(0, WIDTH)[None, :]
    # as in _sums_flat: lane (i, c) sees row step * ROWS + i, column c
    lane_sum = tl.zeros([ROWS, WIDTH], dtype=tl.int64)
    running = tl.zeros([ROWS, WIDTH], dtype=tl.int64)
    steps = 0
    for r0 in range(0, rows, ROWS):
        r = r0 + lane_row
        lane_sum += _mix(tl.load(base + src + r * src_stride + cols, mask=(r < rows) & (cols < width), other=0),
                         MASK, K1, K2)
        running += lane_sum
        steps += 1
    row_weighted = (steps * lane_sum - running) * ROWS + lane_row.to(tl.int64) * lane_sum
    weighted = row_weighted * dst_stride + cols.to(tl.int64) * lane_sum
    tl.store(out + pid * 2, tl.sum(tl.sum(lane_sum, axis=1), axis=0))
    tl.store(out + pid * 2 + 1, tl.sum(tl.sum(weighted, axis=1), axis=0))


def tile_sums_flat(base: torch.Tensor, table: torch.Tensor, out: torch.Tensor, align: int = 1) -> None:
    """``table [tiles, 2]``: (first element, elements), both in units of ``align`` elements."""
    _sums_flat[(table.shape[0],)](base, table, out, MASK=_mask(base), K1=_K1, K2=_K2, BLOCK=BLOCK, ALIGN=align,
                                  num_warps=4)


def tile_sums_rows(base: torch.Tensor, table: torch.Tensor, out: torch.Tensor, width: int) -> None:
    _sums_rows[(table.shape[0],)](base, table, out, MASK=_mask(base), K1=_K1, K2=_K2, WIDTH=width,
                                  ROWS=max(BLOCK // width, 1),
                                  num_warps=4)


def _mask(base: torch.Tensor) -> int:
    """The element's bits as a signed 32-bit constant (a 4-byte element keeps all of them)."""
    return _signed32((1 << 8 * base.element_size()) - 1)


def _signed32(value: int) -> int:
    """A 32-bit pattern as a signed int32 (Triton makes wider constants int64, and the products with them)."""
    return value - (1 << 32) if value >= 1 << 31 else value


_K1, _K2 = _signed32(MIX_K1), _signed32(MIX_K2)
