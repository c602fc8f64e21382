"""Synthetic ends: seeded full weights cut into each trainer rank's shards by the plan's own shard
rules, and engine ranks' tensors allocated from the plan (zero until synced) -- for tests, benchmarks
and the plumbing runs of ``rlsync run``."""

from __future__ import annotations

import numpy as np
import torch

from planners.models import LogicalTensor
from planners.plan import SyncPlan
from sync.ends.base import end_locals, fill_from_full
from sync.tensors import TORCH_DTYPES

__all__ = ["SyntheticSource", "BufferTarget", "synthetic_tensor", "trained_tensor"]


def synthetic_tensor(t: LogicalTensor, index: int, seed: int, version: int) -> torch.Tensor:
    """Deterministic full weights of logical tensor ``index`` for ``(seed, version)``."""
    rng = np.random.default_rng([seed, version, index])
    return torch.from_numpy(rng.standard_normal(t.shape, dtype=np.float32)).to(TORCH_DTYPES[t.dtype])


def trained_tensor(t: LogicalTensor, index: int, seed: int, version: int, held_as: str | None = None) -> torch.Tensor:
    """Weights that look trained and change a little each step: seeded base weights (norms near 1,
    matrices ~N(0, 0.1^2): activations stay finite through many layers) plus a seeded step of
    N(0, 0.02^2) per version -- the trainer's update in ``rlsync run``. ``held_as``: the dtype the
    trainer holds its parameters in; values are rounded through it, so a tensor the engine keeps wider
    (GLM-4.5's float32 router) holds exactly what a trainer in that dtype can send."""
    base = np.random.default_rng([seed, index]).standard_normal(t.shape, dtype=np.float32) * 0.1
    if len(t.shape) == 1:
        base += 1.0
    step = np.random.default_rng([seed, index, version]).standard_normal(t.shape, dtype=np.float32) * 0.02
    weights = torch.from_numpy(base + step)
    if held_as is not None and TORCH_DTYPES[held_as].itemsize < TORCH_DTYPES[t.dtype].itemsize:
        weights = weights.to(TORCH_DTYPES[held_as])
    return weights.to(TORCH_DTYPES[t.dtype])


def _allocate(plan: SyncPlan, rank: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    return {plan.local_name[i]: torch.zeros(plan.local_shape[i], dtype=TORCH_DTYPES[plan.local_dtype[i]], device=device)
            for i in end_locals(plan, rank)}


class SyntheticSource:
    """A trainer rank's shards of seeded full weights; ``set_version`` changes every weight."""

    def __init__(self, plan: SyncPlan, rank: int, seed: int = 0, version: int = 0, device: str = "cpu") -> None:
        self.plan, self.rank, self.seed, self.device = plan, rank, seed, device
        self.tensors = _allocate(plan, rank, device)
        self.set_version(version)

    def set_version(self, version: int) -> None:
        fill_from_full(self.plan, self.rank, self.tensors,
                       lambda tid: synthetic_tensor(self.plan.tensors[tid], tid, self.seed, version))

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors


class BufferTarget:
    """An inference rank's parameters, allocated from the plan and zero until synced."""

    def __init__(self, plan: SyncPlan, rank: int, device: str = "cpu") -> None:
        self.tensors = _allocate(plan, rank, device)

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors


