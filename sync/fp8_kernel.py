"""The Triton kernel behind ``sync.fp8.QuantizeProgram`` (imported only on CUDA machines with Triton).

One program per 128 x 128 block of any of the tensors being quantized: it reads the block's row from
the table (offsets of its first element, value and scale from three views of one base pointer, the
tensor's row length, and how many rows and columns of the block lie inside the tensor), takes the
block's max |x| in float32, and writes ``q = x / s`` as ``float8_e4m3fn`` and ``s = max / 448``. Both
divisions round to nearest (``div_rn``; Triton's ``/`` is approximate), and the float32 -> e4m3
conversion is done on the bits, rounding to nearest even and saturating at 448 as torch's cast does
(not by the hardware's cast: the same bits on any chip and in Triton's CPU interpreter, where tests run
this kernel), so the result equals torch's and the planner's reference quantizer bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from planners.quant import BLOCK, FP8_MAX

__all__ = ["quantize_table"]


@triton.jit
def _quantize_blocks(src, val, scale, table, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
    row = table + tl.program_id(0).to(tl.int64) * 6
    first = tl.load(row)
    value_first = tl.load(row + 1)
    scale_at = tl.load(row + 2)
    stride = tl.load(row + 3)
    rows = tl.load(row + 4)
    cols = tl.load(row + 5)
    c = tl.arange(0, BLOCK)[None, :]
    # ROWS rows at a time: a whole 128 x 128 block held at once spills registers; the second pass
    # reads the block again, from cache
    amax = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
    for top in tl.range(0, BLOCK, ROWS):
        r = top + tl.arange(0, ROWS)[:, None]
        x = tl.load(src + first + r * stride + c, mask=(r < rows) & (c < cols), other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.math.div_rn(tl.max(tl.max(amax, axis=1), axis=0), FP8_MAX)
    divisor = tl.where(s == 0.0, 1.0, s)
    for top in tl.range(0, BLOCK, ROWS):
        r = top + tl.arange(0, ROWS)[:, None]
        mask = (r < rows) & (c < cols)
        x = tl.load(src + first + r * stride + c, mask=mask, other=0.0).to(tl.float32)
        q = tl.where(s == 0.0, 0.0, tl.math.div_rn(x, divisor))
        tl.store(val + value_first + r * stride + c, _e4m3_bits(q), mask=mask)
    tl.store(scale + scale_at, s)


@triton.jit
def _e4m3_bits(q):
    """float32 -> float8_e4m3fn bit patterns (uint8): round to nearest even, 448 at most, NaN as 0x7f.
    All in 32-bit integers (64-bit ones cost several instructions each on the GPU)."""
    word = q.to(tl.int32, bitcast=True)
    sign = (word >> 24) & 0x80
    a = word & 0x7FFFFFFF
    exponent = a >> 23
    # normal results (|q| >= 2**-6, float32 exponent >= 121): keep 3 mantissa bits, rounding the 20
    # dropped ones half to even; a carry runs into the exponent, which is rebased from 127 to 7 (NaNs are
    # capped first so that the sum cannot overflow; they are replaced below)
    finite = tl.minimum(a, 0x7F800000)
    rounded = finite + 0x7FFFF + ((finite >> 20) & 1)
    normal = tl.minimum((rounded >> 20) - (120 << 3), 0x7E)
    # subnormal results: the 24-bit significand in units of 2**-9 (a shift of 21 at exponent 120, more
    # below), rounded half to even; from a shift of 25 on everything rounds to 0, so it stops there
    shift = tl.minimum(tl.maximum(141 - exponent, 1), 25)
    significand = (a & 0x7FFFFF) | 0x800000
    kept = significand >> shift
    rest = significand & ((1 << shift) - 1)
    half = 1 << (shift - 1)
    kept += ((rest > half) | ((rest == half) & ((kept & 1) == 1))).to(tl.int32)
    bits = tl.where(exponent >= 121, normal, kept)
    bits = tl.where(a > 0x7F800000, 0x7F, bits)
    return (bits | sign).to(tl.uint8)


def quantize_table(src: torch.Tensor, val: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, blocks: int,
                   rows: int = 16, num_warps: int = 4) -> None:
    """``src``/``val``/``scale``: one base viewed as the source dtype, uint8 (the FP8 bits) and float32;
    ``rows``: how many of a block's rows one pass holds (a power of two up to 128)."""
    _quantize_blocks[(blocks,)](src, val, scale, table, FP8_MAX=FP8_MAX, BLOCK=BLOCK, ROWS=rows, num_warps=num_warps)
