"""Position-aware checksums of tensors, and of pieces of tensors at the positions they will land.

A tensor's elements (of 1, 2 or 4 bytes: every dtype a plan moves) are read as unsigned integers
``x`` (their bit patterns; an 8-byte element folds its halves into one word, ``lo + hi * K3``), mixed by ``h(x) = x * K1 + x * x * K2 mod 2**32`` and summed twice:
plainly (``S0``) and weighted by flat position (``S1``), in wrapping 64-bit arithmetic, so the sums of
the pieces of a tensor equal the sum of the whole whoever computes them. With ``K1`` odd and ``K2``
even, ``h`` is a permutation of 32-bit words: a changed element always changes ``S0``, and ``h(0) = 0``
(never-written padding adds nothing); an element in the wrong place changes ``S1``. Where the plan
keeps every chunk of a 1- or 2-byte tensor to whole 4-byte words (``sync.verify.words``), the tensor is
read in such words instead, at word positions: the same bytes, a quarter or half the mixes. The sender of a
chunk can therefore compute what the chunk adds to the receiver's checksum, at the receiver's positions.
The mix is 32-bit so that CPUs and GPUs compute it with native multiplies (``sync.verify.cpu_kernel``,
``sync.verify.kernel``: the same sums bit for bit).
"""

from __future__ import annotations

import torch

__all__ = ["MIX_K1", "MIX_K2", "CHECKSUM_BYTES_PER_ELEMENT", "checksum_block", "block_pieces", "checksum_flat",
           "wrap_int64", "element_words"]

MIX_K1, MIX_K2 = 0x9E3779B1, 0x5BD1E996  # h(x) = x * K1 + x * x * K2 mod 2**32; K1 odd, K2 even
_FOLD_K3 = 0x85EBCA6B  # an 8-byte element's word: lo + hi * K3 (odd: a changed half changes the word)
_WORD = 0xFFFFFFFF
_SIGNED = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def element_words(x: torch.Tensor) -> torch.Tensor:
    """The elements' bit patterns as unsigned 32-bit words, in int64 (same shape)."""
    size = x.element_size()
    if size not in _SIGNED:
        raise ValueError(f"checksums read elements of 1, 2, 4 or 8 bytes, not {x.dtype}")
    bits = x.view(_SIGNED[size]).to(torch.int64)
    if size < 8:
        return bits & ((1 << 8 * size) - 1)
    return ((bits & _WORD) + ((bits >> 32) & _WORD) * _FOLD_K3) & _WORD


def _mix(words: torch.Tensor) -> torch.Tensor:
    """``h(x) = x * K1 + x * x * K2 mod 2**32``, computed as ``x * (K1 + x * K2)`` (the same ring identity)
    in int64, whose wrapping keeps the low 32 bits right: one temporary."""
    h = words * MIX_K2
    h.add_(MIX_K1)
    h.mul_(words)
    return h.bitwise_and_(_WORD)


# int64 temporaries per element while a piece is summed (words, the mix, reductions): what a
# checksum holds at once is about this times the elements of its piece
CHECKSUM_BYTES_PER_ELEMENT = 40


def checksum_block(x: torch.Tensor, base: int, dim: int, off: int, max_elements: int | None = None,
                   word: int | None = None) -> tuple[int, int]:
    """(S0, S1) that values ``x [outer, n, inner]`` add to a tensor where they sit at indices
    ``[off, off+n)`` of the block at flat ``base`` with ``dim`` indices along the split dimension.
    ``max_elements``: sum pieces of at most about this many elements (bounded temporary memory).
    ``word``: the bytes the tensor's checksum reads as one word (``sync.verify.words``; default: an
    element), at word positions; the block must keep to whole words."""
    per_word = 1 if word is None else word // x.element_size()
    if max_elements is not None and x.numel() > max_elements:
        s0 = s1 = 0
        for piece, piece_base, piece_off in block_pieces(x, base, dim, off, max_elements, per_word):
            a, b = checksum_block(piece, piece_base, dim, piece_off, word=word)
            s0, s1 = s0 + a, s1 + b
        return wrap_int64(s0), wrap_int64(s1)
    if per_word > 1:
        return _word_block(x, base, dim, off, word, per_word)
    outer, n, inner = x.shape
    h = _mix(element_words(x))
    dev = x.device
    # one reduction per dimension longer than 1 (each a pass over h); S0 from the shortest of them
    by_index = h.sum(dim=(0, 2)) if n > 1 else None
    by_outer = h.sum(dim=(1, 2)) if outer > 1 else None
    by_inner = h.sum(dim=(0, 1)) if inner > 1 else None
    reduced = [v for v in (by_index, by_outer, by_inner) if v is not None]
    s0 = int(min(reduced, key=len).sum()) if reduced else int(h.sum())
    # S1 = sum of h at flat position base + o*dim*inner + (off+i)*inner + j, by the dimensions' sums
    s1 = base * s0 + inner * off * s0
    if by_outer is not None:
        s1 += dim * inner * int((torch.arange(outer, device=dev) * by_outer).sum())
    if by_index is not None:
        s1 += inner * int((torch.arange(n, device=dev) * by_index).sum())
    if by_inner is not None:
        s1 += int((torch.arange(inner, device=dev) * by_inner).sum())
    return wrap_int64(s0), wrap_int64(s1)


def block_pieces(x: torch.Tensor, base: int, dim: int, off: int, most: int, align: int = 1):
    """``x [outer, n, inner]`` in pieces of about ``most`` elements, with each piece's block base and offset;
    each piece's index slice a multiple of ``align`` indices long (whole checksum words)."""
    outer, n, inner = x.shape
    if outer * inner <= most:  # whole index slices
        step = _multiple(most // (outer * inner), align)
        for a in range(0, n, step):
            yield x[:, a: a + step], base, off + a
    else:  # row by row of the outer dimension, in index slices
        step = _multiple(most // inner, align)
        for o in range(outer):
            for a in range(0, n, step):
                yield x[o: o + 1, a: a + step], base + o * dim * inner, off + a


def checksum_flat(t: torch.Tensor, max_elements: int = 1 << 22, word: int | None = None) -> tuple[int, int]:
    """(S0, S1) of a whole tensor, positions in row-major order (in ``word``-byte words where given).
    Viewed as rows of ``width`` elements (position ``row * width + column``): two short reductions
    instead of position weights per element."""
    flat = t.reshape(-1)
    if word is not None and word > flat.element_size():
        flat = flat.contiguous().view(_SIGNED[word])
    n = flat.numel()
    width = next((w for w in (1024, 512, 256, 128, 64, 32, 16, 8, 4, 2) if n % w == 0 and n > w), 1)
    return checksum_block(flat.view(1, n // width, width), 0, n // width, 0, max_elements)


def _word_block(x: torch.Tensor, base: int, dim: int, off: int, word: int, per_word: int) -> tuple[int, int]:
    """checksum_block in words of ``word`` bytes: each outer row of the block lands on consecutive
    positions, ``n * inner`` elements from ``base + (o * dim + off) * inner``, so it is read as
    ``n * inner / per_word`` words from word ``(base + off * inner) / per_word + o * dim * inner / per_word``."""
    outer, n, inner = x.shape
    if (n * inner) % per_word or (base + off * inner) % per_word or (outer > 1 and (dim * inner) % per_word):
        raise ValueError(f"a block of {x.shape} at base {base}, offset {off} is not in whole {word}-byte words")
    rows = x.reshape(outer, n * inner).contiguous().view(_SIGNED[word])
    h = _mix(element_words(rows))
    by_row, by_column = h.sum(dim=1), h.sum(dim=0)
    s0 = int(by_row.sum())
    first, stride = (base + off * inner) // per_word, dim * inner // per_word
    s1 = first * s0 + int((torch.arange(rows.shape[1], device=x.device) * by_column).sum())
    if outer > 1:
        s1 += stride * int((torch.arange(outer, device=x.device) * by_row).sum())
    return wrap_int64(s0), wrap_int64(s1)


def _multiple(step: int, align: int) -> int:
    """``step`` rounded down to a multiple of ``align``, at least ``align``."""
    return max(step // align, 1) * align


def wrap_int64(v: int) -> int:
    """Python int -> the int64 it wraps to."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v
