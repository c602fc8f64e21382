"""Block-FP8 quantization on the device the weights are on (``planners.quant`` says what and where).

:func:`quantize_blocks` is DeepSeek-V3's weight quantizer in torch: per 128 x 128 block of the last two
dimensions, ``s = max|x| / 448`` in float32 and ``q = x / s`` cast to ``float8_e4m3fn``; an all-zero
block keeps ``s = 0`` and zeros. The same operations in the same precision as the planner's numpy
reference, so both give the same bits (``tests/unit/test_fp8.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from planners.quant import BLOCK, FP8_MAX

__all__ = ["quantize_blocks"]


def quantize_blocks(x: torch.Tensor, value: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize ``x [..., rows, cols]`` into ``value`` (``float8_e4m3fn``, the same shape) and ``scale``
    (float32, ``[..., ceil(rows/128), ceil(cols/128)]``), in place."""
    rows, cols = x.shape[-2:]
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = F.pad(x.detach().to(torch.float32), (0, gc * BLOCK - cols, 0, gr * BLOCK - rows))
    blocks = padded.reshape(*x.shape[:-2], gr, BLOCK, gc, BLOCK)
    s = blocks.abs().amax(dim=(-3, -1)) / FP8_MAX  # float32 division, as the reference
    zero = s == 0
    q = blocks / torch.where(zero, torch.ones_like(s), s)[..., :, None, :, None]
    q = q.masked_fill(zero[..., :, None, :, None], 0.0)
    with torch.no_grad():
        value.copy_(q.reshape(padded.shape)[..., :rows, :cols].to(torch.float8_e4m3fn))
        scale.copy_(s)
