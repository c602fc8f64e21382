"""The two ends of a sync: trainer-side sources and inference-side targets, and their check.

A *source* is anything with ``local_tensors() -> {Megatron local name: tensor}`` for one trainer
rank; a *target* the same for one inference rank with vLLM names, written in place. Megatron-core
models (``sync.ends.megatron``), the reference engine, vLLM workers and the synthetic ends of tests
and benchmarks (``sync.ends.synthetic``) all plug in through that one method; :func:`check_locals`
holds them to the plan before any byte moves, and :func:`fill_from_full` writes a rank's shards of
full weights into its tensors.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import torch

from planners.errors import RLSyncError
from planners.plan import SyncPlan
from planners.quant import is_internal
from sync.tensors import TORCH_DTYPES, block

__all__ = ["Source", "Target", "check_locals", "end_locals", "EndpointError", "fill_from_full", "read_full", "zero_unwritten"]


class EndpointError(RLSyncError, ValueError):
    """A source or target whose tensors do not match the plan."""


class Source(Protocol):
    def local_tensors(self) -> dict[str, torch.Tensor]: ...


class Target(Protocol):
    def local_tensors(self) -> dict[str, torch.Tensor]: ...


def fill_from_full(plan: SyncPlan, rank: int, tensors: dict[str, torch.Tensor],
                   full: Callable[[int], torch.Tensor]) -> None:
    """Write trainer ``rank``'s shards of full HF weights (``full(tensor id)``) into its local tensors,
    in place: the inverse of the trainer shard rules (padding rows are left as they are). Tensors
    that do not match the plan (a model built for another layout) are refused first, all named."""
    check_locals(plan, rank, tensors, "source")
    pieces = plan.pieces[np.isin(plan.pieces["local"], end_locals(plan, rank))]
    for tid in np.unique(pieces["tensor"]):
        t = plan.tensors[tid]
        whole = full(int(tid)).reshape(-1)
        for p in pieces[pieces["tensor"] == tid]:
            n = int(p["hi"] - p["lo"])
            dst = tensors[plan.local_name[p["local"]]]
            src = block(whole.to(dst.device, dst.dtype), 0, t.outer, t.shape[t.split_dim], t.inner, int(p["lo"]), n)
            with torch.no_grad():
                block(dst.view(-1), int(p["base"]), t.outer, int(p["dim"]), t.inner, int(p["off"]), n).copy_(src)


def read_full(plan: SyncPlan, rank: int, tensors: dict[str, torch.Tensor]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """The inverse of :func:`fill_from_full`: trainer ``rank``'s pieces of each full HF tensor it holds,
    as ``{tensor id: (full tensor with this rank's elements, bool mask of them)}``; merging every rank's
    gives the full weights (or gradients) the trainer holds."""
    out: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    pieces = plan.pieces[np.isin(plan.pieces["local"], end_locals(plan, rank))]
    for tid in np.unique(pieces["tensor"]):
        t = plan.tensors[tid]
        first = tensors[plan.local_name[pieces[pieces["tensor"] == tid][0]["local"]]]
        whole = torch.zeros(int(np.prod(t.shape)), dtype=first.dtype)
        held = torch.zeros(whole.numel(), dtype=torch.bool)
        for p in pieces[pieces["tensor"] == tid]:
            n = int(p["hi"] - p["lo"])
            src = block(tensors[plan.local_name[p["local"]]].detach().reshape(-1).cpu(), int(p["base"]), t.outer,
                        int(p["dim"]), t.inner, int(p["off"]), n)
            block(whole, 0, t.outer, t.shape[t.split_dim], t.inner, int(p["lo"]), n).copy_(src)
            block(held, 0, t.outer, t.shape[t.split_dim], t.inner, int(p["lo"]), n).fill_(True)
        out[int(tid)] = (whole.reshape(t.shape), held.reshape(t.shape))
    return out


def zero_unwritten(plan: SyncPlan, rank: int, tensors: dict[str, torch.Tensor]) -> list[str]:
    """Zero the elements of ``rank``'s tensors that no sync writes (vocabulary padding rows), in place,
    as vLLM's checkpoint loaders leave them: an engine started from dummy weights holds noise there,
    which verification (a checksum of the whole tensor) would count. Returns the names it zeroed in."""
    zeroed = []
    mine = plan.pieces[np.isin(plan.pieces["local"], end_locals(plan, rank))]
    for local in np.unique(mine["local"]):
        pieces = mine[mine["local"] == local]
        dst = tensors[plan.local_name[local]]
        covered = 0
        for p in pieces:
            t = plan.tensors[p["tensor"]]
            covered += t.outer * int(p["hi"] - p["lo"]) * t.inner
        if covered == dst.numel():
            continue
        written = torch.zeros(dst.numel(), dtype=torch.bool, device=dst.device)
        for p in pieces:
            t = plan.tensors[p["tensor"]]
            block(written, int(p["base"]), t.outer, int(p["dim"]), t.inner, int(p["off"]), int(p["hi"] - p["lo"])).fill_(True)
        with torch.no_grad():
            dst.view(-1)[~written] = 0
        zeroed.append(plan.local_name[local])
    return zeroed


def end_locals(plan: SyncPlan, rank: int) -> np.ndarray:
    """The rank's locals its end holds: all but the plan's own (``planners.quant.is_internal``: FP8
    copies, scales and receiving buffers the executor keeps)."""
    ids = plan.locals_of(rank)
    return np.array([i for i in ids if not is_internal(plan.local_name[i])], dtype=np.int64) if plan.derived.size else ids


def check_locals(plan: SyncPlan, rank: int, tensors: dict[str, torch.Tensor], side: str) -> list[torch.Tensor]:
    """The rank's tensors in the order of :func:`end_locals`, or an error listing every mismatch."""
    problems, out = [], []
    ends = end_locals(plan, rank)
    for i in ends:
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
    extra = set(tensors) - {plan.local_name[i] for i in ends}
    if extra and side == "target":
        problems += [f"unexpected {n}" for n in sorted(extra)[:5]]
    if problems:
        raise EndpointError(f"{side} of rank {rank} does not match the plan: " + "; ".join(problems[:10]))
    return out
