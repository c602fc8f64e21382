"""Torch helpers: the plan's dtypes, block views of local tensors, bit patterns."""

from __future__ import annotations

import ctypes

import torch

__all__ = ["TORCH_DTYPES", "block", "as_bits", "simulate_tensors", "host_span"]

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
                "float8_e4m3fn": torch.float8_e4m3fn}
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def block(flat: torch.Tensor, base: int, outer: int, dim: int, inner: int, off: int, n: int) -> torch.Tensor:
    """View ``[outer, n, inner]``: indices ``[off, off+n)`` along the split dimension of the block at ``base``."""
    return flat[base: base + outer * dim * inner].view(outer, dim, inner)[:, off: off + n, :]


def host_span(tensors) -> tuple[int, ctypes.Array]:
    """(origin, bytes): one ctypes array from the lowest CPU tensor's start (aligned to 16, for every
    element size) to the highest one's end, so that a kernel reaches every tensor by an offset into it.
    Nothing between the tensors is read; they must stay alive while the array is used."""
    tensors = list(tensors)
    origin = min(t.data_ptr() for t in tensors) & ~15
    top = max(t.data_ptr() + t.numel() * t.element_size() for t in tensors)
    return origin, (ctypes.c_char * (top - origin)).from_address(origin)


def as_bits(x: torch.Tensor) -> torch.Tensor:
    """The elements' bit patterns as int64 (same shape)."""
    return x.view(_BITS[x.element_size()]).to(torch.int64)


def simulate_tensors(plan, full_weights: dict[str, torch.Tensor]) -> dict[int, dict[str, torch.Tensor]]:
    """``plan.simulate`` for torch weights: every tensor travels as its bit pattern (numpy has no
    bfloat16) and comes back in the dtype of the weights it is made of."""
    weights = {name: t.detach().cpu().contiguous() for name, t in full_weights.items()}
    out = plan.simulate({name: t.view(_BITS[t.element_size()]).numpy() for name, t in weights.items()})
    dtype = {int(p["local"]): weights[plan.tensors[p["tensor"]].name].dtype for p in plan.pieces}
    for lid in range(len(plan.local_name)):
        rank, name = int(plan.local_rank[lid]), plan.local_name[lid]
        if rank in out:
            kind = dtype.get(lid, TORCH_DTYPES[plan.local_dtype[lid]])
            out[rank][name] = torch.from_numpy(out[rank][name]).view(kind)
    return out
