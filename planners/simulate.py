"""Execute a plan in memory: the test oracle for every layout pair.

Trainer local tensors are built from full Hugging Face weights with the trainer shard rules
(padding rows zero), the chunks run in plan order, and the inference ranks' tensors come back.
Copies are byte-exact whatever the dtype (bf16 tensors travel as their 16-bit patterns).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from planners.plan import SyncPlan

__all__ = ["simulate", "block_view"]


def block_view(flat: np.ndarray, base: int, outer: int, dim: int, inner: int, off: int, n: int) -> np.ndarray:
    """Indices ``[off, off+n)`` along the split dimension of the block at ``base``."""
    return flat[base: base + outer * dim * inner].reshape(outer, dim, inner)[:, off: off + n, :]


def _to_numpy(x: Any) -> tuple[np.ndarray, Any]:
    """A numpy array with the same bytes, and how to turn results back into x's type."""
    if isinstance(x, np.ndarray):
        return x, None
    import torch

    t = x.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy(), torch.bfloat16
    return t.numpy(), t.dtype


def simulate(plan: SyncPlan, full_weights: dict[str, Any]) -> dict[int, dict[str, Any]]:
    missing = [t.name for t in plan.tensors if t.name not in full_weights]
    if missing:
        raise KeyError(f"full_weights lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    full, back = [], None
    for t in plan.tensors:
        arr, kind = _to_numpy(full_weights[t.name])
        if tuple(arr.shape) != t.shape:
            raise ValueError(f"{t.name}: shape {tuple(arr.shape)} but the model spec says {t.shape}")
        full.append(np.ascontiguousarray(arr).reshape(-1))
        back = back if back is not None else kind
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
        arr = flats[lid].reshape(plan.local_shape[lid])
        if back is not None:
            import torch

            arr = torch.from_numpy(arr).view(back) if back == torch.bfloat16 else torch.from_numpy(arr)
        out[int(plan.local_rank[lid])][plan.local_name[lid]] = arr
    return out
