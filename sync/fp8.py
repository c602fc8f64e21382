"""Block-FP8 quantization on the device the weights are on (``planners.quant`` says what and where).

:func:`quantize_blocks` is DeepSeek-V3's weight quantizer in torch: per 128 x 128 block of the last two
dimensions, ``s = max|x| / 448`` in float32 and ``q = x / s`` cast to ``float8_e4m3fn``; an all-zero
block keeps ``s = 0`` and zeros. The same operations in the same precision as the planner's numpy
reference, so both give the same bits (``tests/unit/test_fp8.py``).

:class:`QuantizeProgram` quantizes every derived tensor of a binding at once: on CUDA with Triton one
kernel launch per source dtype over a table of all their blocks (:func:`block_table`), elsewhere
:func:`quantize_blocks` per tensor.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from planners.quant import BLOCK, FP8_MAX, scale_shape

__all__ = ["quantize_blocks", "dequantized", "block_table", "QuantizeProgram"]


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


def block_table(first: np.ndarray, value_first: np.ndarray, scale_first: np.ndarray, shapes: list[tuple[int, ...]]) -> np.ndarray:
    """One row per 128 x 128 block of each tensor ``i`` of shape ``shapes[i]`` (``[..., rows, cols]``, the
    leading dimensions a stack of matrices), whose elements start ``first[i]``, its FP8 values
    ``value_first[i]`` and its scales ``scale_first[i]`` elements from a base: (the block's first element,
    its first value, its scale, the row length, the block's rows and columns inside the tensor)."""
    rows = np.array([s[-2] for s in shapes], dtype=np.int64)
    cols = np.array([s[-1] for s in shapes], dtype=np.int64)
    mats = np.array([int(np.prod(s[:-2], dtype=np.int64)) for s in shapes], dtype=np.int64)
    grid_rows, grid_cols = -(-rows // BLOCK), -(-cols // BLOCK)
    per_mat = grid_rows * grid_cols
    from sync.copier import expand

    t, k = expand(mats * per_mat)
    mat, at = np.divmod(k, per_mat[t])
    block_row, block_col = np.divmod(at, grid_cols[t])
    element = mat * rows[t] * cols[t] + block_row * BLOCK * cols[t] + block_col * BLOCK
    return np.stack([np.asarray(first, dtype=np.int64)[t] + element, np.asarray(value_first, dtype=np.int64)[t] + element,
                     np.asarray(scale_first, dtype=np.int64)[t] + mat * per_mat[t] + at, cols[t],
                     np.minimum(rows[t] - block_row * BLOCK, BLOCK), np.minimum(cols[t] - block_col * BLOCK, BLOCK)],
                    axis=1)


class QuantizeProgram:
    """Quantize ``jobs`` (source, FP8 value, scale tensors: flat views, with the source's shape in
    ``shapes``) in place each time it is called; bound once, valid while the tensors stay where they are."""

    def __init__(self, jobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shapes: list[tuple[int, ...]],
                 use_triton: bool | None = None) -> None:
        self.jobs = [(src.view(shape), val.view(shape), scale.view(scale_shape(shape))) for (src, val, scale), shape in zip(jobs, shapes)]
        self.launches: list[tuple] = []
        device = jobs[0][0].device if jobs else torch.device("cpu")
        if use_triton is None:
            from sync.copier import triton_available

            use_triton = device.type == "cuda" and triton_available()
        if not use_triton or not jobs:
            return
        self._base = torch.empty(16, dtype=torch.uint8, device=device)  # every address is an offset from here
        base = self._base.data_ptr()
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (src, _, _) in enumerate(jobs):
            by_dtype.setdefault(src.dtype, []).append(i)
        for dtype, picked in by_dtype.items():
            offsets = []
            for j, width in ((0, torch.empty(0, dtype=dtype).element_size()), (1, 1), (2, 4)):
                delta = np.array([jobs[i][j].data_ptr() - base for i in picked], dtype=np.int64)
                if (delta % width).any():
                    raise ValueError("a quantized tensor's address is not aligned to its element size")
                offsets.append(delta // width)
            table = block_table(*offsets, [shapes[i] for i in picked])
            upload = torch.from_numpy(np.ascontiguousarray(table)).to(device)
            self.launches.append((self._base.view(dtype), upload, len(table)))

    def __call__(self) -> None:
        if self.launches:
            from sync.fp8_kernel import quantize_table

            for src, table, blocks in self.launches:
                quantize_table(src, self._base, self._base.view(torch.float32), table, blocks)
        else:
            for src, val, scale in self.jobs:
                quantize_blocks(src, val, scale)
