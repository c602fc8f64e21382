"""Execute a plan in memory: the test oracle for every layout pair.

Trainer local tensors are built from full Hugging Face weights with the trainer shard rules
(padding rows zero), the chunks run in plan order, and the inference ranks' tensors come back.
Copies are byte-exact whatever the dtype. Weights are numpy arrays (anything ``np.asarray`` takes);
torch tensors, bfloat16 included, go through ``sync.tensors.simulate_tensors``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from planners.plan import SyncPlan

__all__ = ["simulate", "block_view"]


def block_view(flat: np.ndarray, base: int, outer: int, dim: int, inner: int, off: int, n: int) -> np.ndarray:
    """Indices ``[off, off+n)`` along the split dimension of the block at ``base``."""
    return flat[base: base + outer * dim * inner].reshape(outer, dim, inner)[:, off: off + n, :]


def simulate(plan: SyncPlan, full_weights: dict[str, Any]) -> dict[int, dict[str, np.ndarray]]:
    missing = [t.name for t in plan.tensors if t.name not in full_weights]
    if missing:
        raise KeyError(f"full_weights lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    full = []
    for t in plan.tensors:
        arr = np.asarray(full_weights[t.name])
        if tuple(arr.shape) != t.shape:
            raise ValueError(f"{t.name}: shape {tuple(arr.shape)} but the model spec says {t.shape}")
        full.append(np.ascontiguousarray(arr).reshape(-1))
    tensors = plan.tensors

    # dtype of each local tensor: that of the logical tensors it is made of
    dtypes: list[np.dtype | None] = [None] * len(plan.local_name)
    for p in plan.pieces:
        dtypes[p["local"]] = full[p["tensor"]].dtype
    fallback = full[0].dtype
    flats = [np.zeros(int(np.prod(shape)), dtype=dt or fallback) for shape, dt in zip(plan.local_shape, dtypes)]

    is_trainer = plan.local_rank < plan.num_trainer
    for p in plan.pieces:
        if not is_trainer[p["local"]]:
            continue
        t = tensors[p["tensor"]]
        n = p["hi"] - p["lo"]
        dst = block_view(flats[p["local"]], p["base"], t.outer, p["dim"], t.inner, p["off"], n)
        dst[...] = block_view(full[p["tensor"]], 0, t.outer, t.shape[t.split_dim], t.inner, p["lo"], n)

    for c in plan.chunks:  # already in stage order
        t = tensors[c["tensor"]]
        n = c["hi"] - c["lo"]
        src = block_view(flats[c["src_local"]], c["src_base"], t.outer, c["src_dim"], t.inner, c["src_off"], n)
        dst = block_view(flats[c["dst_local"]], c["dst_base"], t.outer, c["dst_dim"], t.inner, c["dst_off"], n)
        dst[...] = src

    out: dict[int, dict[str, Any]] = {r: {} for r in plan.inference_ranks}
    for lid in np.flatnonzero(~is_trainer):
        out[int(plan.local_rank[lid])][plan.local_name[lid]] = flats[lid].reshape(plan.local_shape[lid])
    return out
