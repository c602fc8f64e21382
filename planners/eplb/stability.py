"""Keep experts where they were: relabel a new placement's GPUs (inside each node) to overlap the
old one most, then keep each staying expert in its old slot. Balance is unchanged: only labels move.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = ["keep_in_place", "moved_slots"]


def keep_in_place(new: np.ndarray, old: np.ndarray, num_gpus: int, num_nodes: int) -> np.ndarray:
    """``new`` relabelled to match ``old`` (both ``[L, P]``); GPUs only trade places inside a node."""
    if old.shape != new.shape:
        return new  # a different slot count: nothing to keep
    L, P = new.shape
    k = P // num_gpus
    per_node = num_gpus // num_nodes
    out = np.empty_like(new)
    for layer in range(L):
        n_gpus = new[layer].reshape(num_gpus, k)
        o_gpus = old[layer].reshape(num_gpus, k)
        for node in range(num_nodes):
            sl = slice(node * per_node, (node + 1) * per_node)
            nn, oo = n_gpus[sl], o_gpus[sl]
            overlap = np.array([[len(np.intersect1d(a, b)) for b in oo] for a in nn])
            rows, cols = linear_sum_assignment(-overlap)
            for r, c in zip(rows, cols):
                out[layer, (node * per_node + c) * k:(node * per_node + c + 1) * k] = _align(nn[r], oo[c])
    return out


def _align(new_slots: np.ndarray, old_slots: np.ndarray) -> np.ndarray:
    """Order one GPU's new experts so those it already held stay in their old slot."""
    result = np.full(len(new_slots), -1)
    left = list(new_slots)
    for i, e in enumerate(old_slots):
        if e in left:
            result[i] = e
            left.remove(e)
    result[result < 0] = left
    return result


def moved_slots(new: np.ndarray, old: np.ndarray) -> int:
    """Slots whose expert changes between two placements."""
    return int((new != old).sum()) if new.shape == old.shape else int(new.size)
