"""The word each engine tensor's checksum reads: 4 bytes wherever the plan allows, else its element.

Summing a bf16 tensor as 32-bit words (two elements each, at word positions) reads the same bytes with
half the mixes, and the C kernel sums 32-bit words at three times the bytes per second of 16-bit ones.
It is as strong: a changed word always changes its mix, and two elements swapped inside a word change
the word. Both ends must read the same words, so the rule is the plan's alone (every rank derives the
same answer): a tensor is read in words of 4 bytes when its size and every chunk that lands in it keep
to whole words on both sides -- each block's first element, its extent, its row stride, and the offset
at which a stage-2 chunk starts inside its origin -- and in its own elements otherwise.
"""

from __future__ import annotations

import numpy as np

from planners.plan import SyncPlan
from sync.tensors import TORCH_DTYPES

__all__ = ["WORD_BYTES", "word_bytes"]

WORD_BYTES = 4


def word_bytes(plan: SyncPlan, wide: bool = True) -> np.ndarray:
    """[locals] bytes per checksum word of every local tensor (its element size, or 4 where that is smaller
    and the plan keeps all its chunks to whole words). ``wide=False``: element sizes alone (every end of
    a sync must read the same words: benchmarks compare the two)."""
    itemsize = np.array([TORCH_DTYPES[d].itemsize for d in plan.local_dtype], dtype=np.int64)
    if not wide:
        return itemsize
    per_word = np.where(itemsize < WORD_BYTES, WORD_BYTES // itemsize, 1)  # elements in a word
    numel = np.array([int(np.prod(s, dtype=np.int64)) for s in plan.local_shape], dtype=np.int64)
    whole = numel % per_word == 0
    c = plan.chunks
    if len(c):
        a = per_word[c["dst_local"]]
        inner, outer = plan.table.inner[c["tensor"]], plan.table.outer[c["tensor"]]
        many_rows = outer > 1
        # elements, on both sides, that must be multiples of a word
        counts = [c["dst_base"], c["src_base"], c["dst_off"] * inner, c["src_off"] * inner, c["lo"] * inner,
                  c["hi"] * inner, np.where(many_rows, c["dst_dim"] * inner, 0),
                  np.where(many_rows, c["src_dim"] * inner, 0)]
        broken = np.zeros(len(c), dtype=bool)
        for count in counts:
            broken |= count % a != 0
        whole[np.unique(c["dst_local"][broken])] = False
    return np.where(whole, itemsize * per_word, itemsize)
