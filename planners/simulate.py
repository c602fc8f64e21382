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
    is_trainer = plan.local_rank < plan.num_trainer
    # what the trainer holds: the logical tensors of its own (not derived) locals; FP8 values and scales
    # are computed from them here, as the plan says (planners.quant), by the reference quantizer
    held = plan.pieces[is_trainer[plan.pieces["local"]] & ~np.isin(plan.pieces["local"], plan.derived["local"])]
    needed = np.unique(held["tensor"]).tolist()
    missing = [plan.tensors[i].name for i in needed if plan.tensors[i].name not in full_weights]
    if missing:
        raise KeyError(f"full_weights lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    full: dict[int, np.ndarray] = {}
    for i in needed:
        t = plan.tensors[i]
        arr = np.asarray(full_weights[t.name])
        if tuple(arr.shape) != t.shape:
            raise ValueError(f"{t.name}: shape {tuple(arr.shape)} but the model spec says {t.shape}")
        full[i] = np.ascontiguousarray(arr).reshape(-1)
    tensors = plan.tensors

    # dtype of each local tensor: that of the logical tensors it is made of (FP8 as its bits)
    fallback = next(iter(full.values())).dtype if full else np.dtype(np.float32)
    dtypes: list[np.dtype] = [_NUMPY.get(d, fallback) for d in plan.local_dtype]
    for p in plan.pieces:
        if int(p["tensor"]) in full:
            dtypes[p["local"]] = full[p["tensor"]].dtype
    flats = [np.zeros(int(np.prod(shape)), dtype=dt) for shape, dt in zip(plan.local_shape, dtypes)]

    for p in held:
        t = tensors[p["tensor"]]
        n = p["hi"] - p["lo"]
        dst = block_view(flats[p["local"]], p["base"], t.outer, p["dim"], t.inner, p["off"], n)
        dst[...] = block_view(full[p["tensor"]], 0, t.outer, t.shape[t.split_dim], t.inner, p["lo"], n)

    _derive(plan, flats, is_trainer)  # the trainer quantizes before the bytes move
    for c in plan.chunks:  # already in stage order
        t = tensors[c["tensor"]]
        n = c["hi"] - c["lo"]
        src = block_view(flats[c["src_local"]], c["src_base"], t.outer, c["src_dim"], t.inner, c["src_off"], n)
        dst = block_view(flats[c["dst_local"]], c["dst_base"], t.outer, c["dst_dim"], t.inner, c["dst_off"], n)
        dst[...] = src
    _derive(plan, flats, ~is_trainer)  # an engine quantizes what arrived in full precision

    out: dict[int, dict[str, Any]] = {r: {} for r in plan.inference_ranks}
    for lid in np.flatnonzero(~is_trainer):
        out[int(plan.local_rank[lid])][plan.local_name[lid]] = flats[lid].reshape(plan.local_shape[lid])
    return out


_NUMPY = {"float8_e4m3fn": np.dtype(np.uint8), "float32": np.dtype(np.float32)}


def _derive(plan: SyncPlan, flats: list[np.ndarray], side: np.ndarray) -> None:
    """Compute the derived locals (FP8 values, scales) of the ranks ``side`` marks from their sources."""
    from planners.quant import FP8, reference_quantize

    for local, source in plan.derived[side[plan.derived["local"]]].tolist():
        bits, scale = reference_quantize(flats[source].reshape(plan.local_shape[source]))
        flats[local][...] = (bits if plan.local_dtype[local] == FP8 else scale).reshape(-1)
