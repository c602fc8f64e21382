"""The Triton kernel behind ``sync.fp8.QuantizeProgram`` (imported only on CUDA machines with Triton).

One program per 128 x 128 block of any of the tensors being quantized: it reads the block's row from
the table (offsets of its first element, value and scale from three views of one base pointer, the
tensor's row length, and how many rows and columns of the block lie inside the tensor), takes the
block's max |x| in float32, and writes ``q = x / s`` as ``float8_e4m3fn`` and ``s = max / 448``. Both
divisions round to nearest (``div_rn``; Triton's ``/`` is approximate), so the bits equal torch's and
the planner's reference quantizer; the float32 -> e4m3 conversion rounds to nearest even.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from planners.quant import BLOCK, FP8_MAX

__all__ = ["quantize_table"]


@triton.jit
def _quantize_blocks(src, val, scale, table, FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    row = table + tl.program_id(0).to(tl.int64) * 6
    first = tl.load(row)
    value_first = tl.load(row + 1)
    scale_at = tl.load(row + 2)
    stride = tl.load(row + 3)
    rows = tl.load(row + 4)
    cols = tl.load(row + 5)
    r = tl.arange(0, BLOCK)[:, None]
    c = tl.arange(0, BLOCK)[None, :]
    mask = (r < rows) & (c < cols)
    at = r * stride + c
    x = tl.load(src + first + at, mask=mask, other=0.0).to(tl.float32)
    s = tl.math.div_rn(tl.max(tl.max(tl.abs(x), axis=1), axis=0), FP8_MAX)
    q = tl.math.div_rn(x, tl.where(s == 0.0, 1.0, s))
    q = tl.where(s == 0.0, 0.0, q)
    tl.store(val + value_first + at, q.to(tl.float8e4nv), mask=mask)
    tl.store(scale + scale_at, s)


def quantize_table(src: torch.Tensor, val: torch.Tensor, scale: torch.Tensor, table: torch.Tensor, blocks: int) -> None:
    """``src``/``val``/``scale``: one base viewed as the source dtype, float8_e4m3fn and float32."""
    _quantize_blocks[(blocks,)](src, val, scale, table, FP8_MAX=FP8_MAX, BLOCK=BLOCK, num_warps=8)
