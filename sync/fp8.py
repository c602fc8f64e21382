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

__all__ = ["quantize_blocks", "dequantized"]


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


def dequantized(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An engine's tensors with each FP8 weight replaced by ``value * weight_scale_inv`` (per 128 x 128
    block, in float32, then ``dtype`` if given) and the scales dropped: what its kernels compute with."""
    out = {}
    for name, t in tensors.items():
        scale = tensors.get(name + "_scale_inv")
        if name.endswith("_scale_inv") and name[: -len("_scale_inv")] in tensors:
            continue
        if scale is None or t.dtype != torch.float8_e4m3fn:
            out[name] = t if dtype is None else t.to(dtype)
            continue
        rows, cols = t.shape[-2:]
        full = scale.repeat_interleave(BLOCK, dim=-2)[..., :rows, :].repeat_interleave(BLOCK, dim=-1)[..., :cols]
        value = t.to(torch.float32) * full
        out[name] = value if dtype is None else value.to(dtype)
    return out
