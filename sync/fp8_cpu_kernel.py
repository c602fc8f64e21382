"""The CPU twin of ``sync.fp8_kernel`` (numba): block-FP8 quantization of many tensors in one parallel
loop over a table of their 128 x 128 blocks (``sync.fp8.block_table``), the same arithmetic bit for
bit: ``s = max|x| / 448`` and ``q = x / s`` in float32 (correctly rounded divisions), ``q`` to e4m3 on
its bits (half to even, at most 448, NaN as 0x7f). Sources in bfloat16 (read as bits) or float32.
``src``, ``values`` and ``scales`` are arrays over one address range (see ``QuantizeProgram``): the
table's offsets index them.
"""

from __future__ import annotations

import numba
import numpy as np

import sync.numba_config  # noqa: F401  (before any kernel runs)
from planners.quant import FP8_MAX

__all__ = ["quantize_blocks_bf16", "quantize_blocks_f32", "e4m3_bits", "load"]

_MAX = np.float32(FP8_MAX)


@numba.njit(cache=True, nogil=True, inline="always")
def e4m3_bits(word):
    """float32 bit pattern (uint32) -> float8_e4m3fn bits: what the Triton kernel's ``_e4m3_bits`` does."""
    sign = np.int64((word >> 24) & 0x80)
    a = np.int64(word & 0x7FFFFFFF)
    exponent = a >> 23
    if a > 0x7F800000:  # NaN
        return np.uint8(0x7F | sign)
    if exponent >= 121:  # normal: keep 3 mantissa bits, the 20 dropped rounded half to even
        rounded = a + 0x7FFFF + ((a >> 20) & 1)
        return np.uint8(min((rounded >> 20) - (120 << 3), 0x7E) | sign)
    shift = min(141 - exponent, 31)  # subnormal: the 24-bit significand in units of 2**-9
    significand = (a & 0x7FFFFF) | 0x800000
    kept = significand >> shift
    rest = significand & ((np.int64(1) << shift) - 1)
    half = np.int64(1) << (shift - 1)
    if rest > half or (rest == half and (kept & 1) == 1):
        kept += 1
    return np.uint8(kept | sign)


@numba.njit(cache=True, nogil=True, inline="always")
def _quantize_block(x, values, scales, value_first, scale_at, stride):
    """``x [rows, cols]`` float32 (overwritten with ``q``): its FP8 bits and scale, written in place."""
    rows, cols = x.shape
    amax = np.float32(0)
    for r in range(rows):
        for c in range(cols):
            magnitude = abs(x[r, c])
            if magnitude > amax:
                amax = magnitude
    s = np.float32(amax / _MAX)
    scales[scale_at] = s
    bits = x.view(np.uint32)
    for r in range(rows):
        for c in range(cols):
            x[r, c] = np.float32(0) if s == 0 else np.float32(x[r, c] / s)
            values[value_first + r * stride + c] = e4m3_bits(bits[r, c])


@numba.njit(parallel=True, cache=True, nogil=True)
def quantize_blocks_bf16(src, values, scales, table):
    """``src``: bfloat16 bit patterns (uint16); a bfloat16 is the top half of the float32 it equals."""
    for b in numba.prange(table.shape[0]):
        first, value_first, scale_at, stride, rows, cols = table[b]
        x = np.empty((rows, cols), dtype=np.float32)
        wide = x.view(np.uint32)
        for r in range(rows):
            for c in range(cols):
                wide[r, c] = np.uint32(src[first + r * stride + c]) << 16
        _quantize_block(x, values, scales, value_first, scale_at, stride)


@numba.njit(parallel=True, cache=True, nogil=True)
def quantize_blocks_f32(src, values, scales, table):
    for b in numba.prange(table.shape[0]):
        first, value_first, scale_at, stride, rows, cols = table[b]
        x = np.empty((rows, cols), dtype=np.float32)
        for r in range(rows):
            for c in range(cols):
                x[r, c] = src[first + r * stride + c]
        _quantize_block(x, values, scales, value_first, scale_at, stride)


def load() -> None:
    """Compile both kernels for the arrays ``QuantizeProgram`` passes (from numba's cache where it holds
    them), running neither (``sync.run.preload``)."""
    import ctypes

    span = (ctypes.c_char * 16)()  # numpy views of a ctypes array, as QuantizeProgram passes them
    view = lambda dtype: numba.typeof(np.frombuffer(span, dtype=dtype))  # noqa: E731
    table = numba.typeof(np.zeros((1, 6), dtype=np.int64))
    for kernel, source in ((quantize_blocks_bf16, np.uint16), (quantize_blocks_f32, np.float32)):
        kernel.compile((view(source), view(np.uint8), view(np.float32), table))
