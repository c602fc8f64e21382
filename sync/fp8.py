"""Block-FP8 quantization on the device the weights are on (``planners.quant`` says what and where).

:func:`quantize_blocks` is DeepSeek-V3's weight quantizer in torch: per 128 x 128 block of the last two
dimensions, ``s = max|x| / 448`` in float32 and ``q = x / s`` cast to ``float8_e4m3fn``; an all-zero
block keeps ``s = 0`` and zeros. The same operations in the same precision as the planner's numpy
reference, so both give the same bits (``tests/unit/test_fp8.py``).

:class:`QuantizeProgram` quantizes every derived tensor of a binding at once: one kernel launch per
source dtype over a table of all their blocks (:func:`block_table`), in Triton on CUDA and numba on the
CPU, bit for bit the same; :func:`quantize_blocks` per tensor where neither runs.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from planners.quant import BLOCK, FP8_MAX, scale_shape
from sync.copier import expand
from sync.tensors import host_span

__all__ = ["quantize_blocks", "dequantized", "block_table", "QuantizeProgram"]


def quantize_blocks(x: torch.Tensor, value: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantize ``x [..., rows, cols]`` into ``value`` (``float8_e4m3fn``, the same shape) and ``scale``
    (float32, ``[..., ceil(rows/128), ceil(cols/128)]``), in place."""
    rows, cols = x.shape[-2:]
    gr, gc = -(-rows // BLOCK), -(-cols // BLOCK)
    padded = F.pad(x.detach().to(torch.float32), (0, gc * BLOCK - cols, 0, gr * BLOCK - rows))
    blocks = padded.reshape(*x.shape[:-2], gr, BLOCK, gc, BLOCK)
    amax = blocks.abs().amax(dim=(-3, -1))
    # a tensor divisor, not the number: CUDA torch multiplies by a scalar's reciprocal, which is off by
    # one ulp now and then; this is float32 division rounded to nearest on every device, as the reference
    s = amax / torch.full_like(amax, FP8_MAX)
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
    ``shapes``) in place each time it is called; bound once, valid while the tensors stay where they are.

    ``kernels``: "triton" (CUDA; on CPU tensors Triton's interpreter, for tests), "numba" (CPU; bfloat16
    and float32 sources) or "torch" (:func:`quantize_blocks` per tensor); by default the first that runs
    on the tensors' device. Sources the numba kernels do not read go tensor by tensor."""

    def __init__(self, jobs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], shapes: list[tuple[int, ...]],
                 kernels: str | None = None) -> None:
        self.jobs = [(src.view(shape), val.view(shape), scale.view(scale_shape(shape))) for
                     (src, val, scale), shape in zip(jobs, shapes)]
        self.launches: list[tuple] = []
        self.triton_tuning: dict[str, int] = {}  # rows / num_warps of sync.fp8_kernel.quantize_table (its benchmark)
        device = jobs[0][0].device if jobs else torch.device("cpu")
        self.kernels = kernels or _default_kernels(device)
        if self.kernels == "torch" or not jobs:
            return
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, (src, _, _) in enumerate(jobs):
            by_dtype.setdefault(src.dtype, []).append(i)
        if self.kernels == "numba":
            by_dtype = {dtype: picked for dtype, picked in by_dtype.items() if dtype in _NUMBA_SOURCES}
        tabled = {i for picked in by_dtype.values() for i in picked}
        self.jobs = [job for i, job in enumerate(self.jobs) if i not in tabled]  # left for quantize_blocks
        if not tabled:
            return
        if self.kernels == "triton":
            self._base = torch.empty(16, dtype=torch.uint8, device=device)  # every address is an offset from here
            origin = self._base.data_ptr()
        else:  # one array over the address range of every tensor the tables reach (only those are read)
            origin, self._span = host_span(t for i in tabled for t in jobs[i])
        for dtype, picked in by_dtype.items():
            offsets = []
            for j, width in ((0, torch.empty(0, dtype=dtype).element_size()), (1, 1), (2, 4)):
                delta = np.array([jobs[i][j].data_ptr() - origin for i in picked], dtype=np.int64)
                if (delta % width).any():
                    raise ValueError("a quantized tensor's address is not aligned to its element size")
                offsets.append(delta // width)
            table = np.ascontiguousarray(block_table(*offsets, [shapes[i] for i in picked]))
            if self.kernels == "triton":
                self.launches.append((self._base.view(dtype), torch.from_numpy(table).to(device), len(table)))
            else:
                self.launches.append((self._view(_NUMBA_SOURCES[dtype]), table, len(table)))

    def _view(self, dtype) -> np.ndarray:
        return np.frombuffer(self._span, dtype=dtype, count=len(self._span) // np.dtype(dtype).itemsize)

    def __call__(self) -> None:
        if self.kernels == "triton" and self.launches:
            from sync.fp8_kernel import quantize_table

            for src, table, blocks in self.launches:
                quantize_table(src, self._base, self._base.view(torch.float32), table, blocks, **self.triton_tuning)
        elif self.launches:
            from sync.fp8_cpu_kernel import quantize_blocks_bf16, quantize_blocks_f32

            values, scales = self._view(np.uint8), self._view(np.float32)
            for src, table, _ in self.launches:
                (quantize_blocks_bf16 if src.dtype == np.uint16 else quantize_blocks_f32)(src, values, scales, table)
        for src, val, scale in self.jobs:
            quantize_blocks(src, val, scale)


# the numba kernels' sources, by the numpy dtype they read them as (a bfloat16 as its bits)
_NUMBA_SOURCES = {torch.bfloat16: np.uint16, torch.float32: np.float32}


def _default_kernels(device: torch.device) -> str:
    from importlib.util import find_spec

    if device.type == "cuda":
        from sync.copier import triton_available

        return "triton" if triton_available() else "torch"
    return "numba" if device.type == "cpu" and find_spec("numba") is not None else "torch"
