"""The two ends of a sync: trainer-side sources and inference-side targets.

A *source* is anything with ``local_tensors() -> {Megatron local name: tensor}`` for one trainer
rank; a *target* the same for one inference rank with vLLM names, written in place. This module
holds the synthetic source (each rank's shards cut from seeded full weights by the plan's own shard
rules) and a plain target that allocates the engine's tensors; megatron-core models and real
engines plug in through the same two methods.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from planners.errors import RLSyncError
from planners.models import LogicalTensor
from planners.plan import SyncPlan
from sync.tensors import TORCH_DTYPES, block

__all__ = ["Source", "Target", "SyntheticSource", "BufferTarget", "synthetic_tensor", "trained_tensor", "check_locals",
           "EndpointError", "fill_from_full"]


class EndpointError(RLSyncError, ValueError):
    """A source or target whose tensors do not match the plan."""


class Source(Protocol):
    def local_tensors(self) -> dict[str, torch.Tensor]: ...


class Target(Protocol):
    def local_tensors(self) -> dict[str, torch.Tensor]: ...


def synthetic_tensor(t: LogicalTensor, index: int, seed: int, version: int) -> torch.Tensor:
    """Deterministic full weights of logical tensor ``index`` for ``(seed, version)``."""
    rng = np.random.default_rng([seed, version, index])
    return torch.from_numpy(rng.standard_normal(t.shape, dtype=np.float32)).to(TORCH_DTYPES[t.dtype])


def trained_tensor(t: LogicalTensor, index: int, seed: int, version: int) -> torch.Tensor:
    """Weights that look trained and change a little each step: seeded base weights (norms near 1,
    matrices ~N(0, 0.1^2): activations stay finite through many layers) plus a seeded step of
    N(0, 0.02^2) per version -- the trainer's update in ``rlsync run``."""
    base = np.random.default_rng([seed, index]).standard_normal(t.shape, dtype=np.float32) * 0.1
    if len(t.shape) == 1:
        base += 1.0
    step = np.random.default_rng([seed, index, version]).standard_normal(t.shape, dtype=np.float32) * 0.02
    return torch.from_numpy(base + step).to(TORCH_DTYPES[t.dtype])


def fill_from_full(plan: SyncPlan, rank: int, tensors: dict[str, torch.Tensor],
                   full: Callable[[int], torch.Tensor]) -> None:
    """Write trainer ``rank``'s shards of full HF weights (``full(tensor id)``) into its local tensors,
    in place: the inverse of the trainer shard rules (padding rows are left as they are). Tensors
    that do not match the plan (a model built for another layout) are refused first, all named."""
    check_locals(plan, rank, tensors, "source")
    pieces = plan.pieces[np.isin(plan.pieces["local"], plan.locals_of(rank))]
    for tid in np.unique(pieces["tensor"]):
        t = plan.tensors[tid]
        whole = full(int(tid)).reshape(-1)
        for p in pieces[pieces["tensor"] == tid]:
            n = int(p["hi"] - p["lo"])
            dst = tensors[plan.local_name[p["local"]]]
            src = block(whole.to(dst.device, dst.dtype), 0, t.outer, t.shape[t.split_dim], t.inner, int(p["lo"]), n)
            with torch.no_grad():
                block(dst.view(-1), int(p["base"]), t.outer, int(p["dim"]), t.inner, int(p["off"]), n).copy_(src)


def _allocate(plan: SyncPlan, rank: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    return {plan.local_name[i]: torch.zeros(plan.local_shape[i], dtype=TORCH_DTYPES[plan.local_dtype[i]], device=device)
            for i in plan.locals_of(rank)}


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


def check_locals(plan: SyncPlan, rank: int, tensors: dict[str, torch.Tensor], side: str) -> list[torch.Tensor]:
    """The rank's tensors in the plan's local order, or an error listing every mismatch."""
    problems, out = [], []
    for i in plan.locals_of(rank):
        name = plan.local_name[i]
        t = tensors.get(name)
        if t is None:
            problems.append(f"missing {name}")
            continue
        if tuple(t.shape) != tuple(plan.local_shape[i]):
            problems.append(f"{name}: shape {tuple(t.shape)}, plan expects {tuple(plan.local_shape[i])}")
        want = TORCH_DTYPES[plan.local_dtype[i]]
        # a trainer may keep some weights wider (fp32 norms, master weights): they are cast on the way
        castable = side == "source" and t.dtype.is_floating_point and want.is_floating_point
        if t.dtype != want and not castable:
            problems.append(f"{name}: dtype {t.dtype}, plan expects {plan.local_dtype[i]}")
        if not t.is_contiguous():
            problems.append(f"{name}: not contiguous")
        out.append(t)
    extra = set(tensors) - {plan.local_name[i] for i in plan.locals_of(rank)}
    if extra and side == "target":
        problems += [f"unexpected {n}" for n in sorted(extra)[:5]]
    if problems:
        raise EndpointError(f"{side} of rank {rank} does not match the plan: " + "; ".join(problems[:10]))
    return out
