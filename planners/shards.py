"""The vocabulary of shard rules: local tensors made of pieces of logical tensors.

A *piece* says: indices ``[lo, hi)`` of logical tensor ``tensor`` along its split dimension
land in a local tensor's block that starts at flat element ``base``, has ``dim`` indices along
the split dimension, and receives them at ``[off, off + hi - lo)``. Everything outside the split
dimension is whole on both sides, so the logical tensor viewed as ``[outer, D, inner]`` and the
local block viewed as ``[outer, dim, inner]`` line up. That covers fused QKV, fused gate/up,
row- and column-parallel splits, vocabulary padding and stacks of expert slots.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from planners.errors import ShardError

__all__ = ["Piece", "LocalTensor", "ShardError", "even_part", "require_divides"]


@dataclass(frozen=True, slots=True)
class Piece:
    tensor: int  # logical tensor id in the catalog
    lo: int
    hi: int
    base: int  # flat element offset of the block in the local tensor
    dim: int  # size of the block along the split dimension
    off: int  # where lo lands along the split dimension of the block


@dataclass(slots=True)
class LocalTensor:
    """A tensor one rank holds, and the logical pieces it is made of."""

    rank: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    pieces: list[Piece] = field(default_factory=list)


def require_divides(part: int, whole: int, what: str) -> int:
    """``whole // part``, or a ShardError naming both fields when ``part`` does not divide ``whole``."""
    if part < 1 or whole % part:
        raise ShardError(f"{what}: {whole} is not divisible by {part}")
    return whole // part


def even_part(size: int, parts: int, k: int) -> tuple[int, int]:
    """Range of part ``k`` when ``size`` is split evenly into ``parts`` (caller checked divisibility)."""
    n = size // parts
    return k * n, (k + 1) * n
