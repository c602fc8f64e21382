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
from planners.models import Catalog

__all__ = ["Piece", "LocalTensor", "Locals", "even_part", "require_divides", "divisors", "padded_vocab"]


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
    # the local of the same rank this one is computed from (its FP8 value or scales: planners.quant), if any
    source: str = ""


class Locals:
    """A rank's local tensors as a side's rules add them (rank-less: ranks with equal shard
    coordinates share them). ``whole`` and ``column`` make the pieces."""

    def __init__(self, cat: Catalog) -> None:
        self.cat, self.tensors = cat, []

    def add(self, name: str, shape: tuple[int, ...], pieces: list[Piece], like: str | None = None) -> None:
        """Local tensor ``name``; its dtype is that of the logical tensor ``like`` (default: its first piece's)."""
        dtype = self.cat[like].dtype if like is not None else self.cat[pieces[0].tensor].dtype if pieces else None
        self.tensors.append(LocalTensor(-1, name, shape, dtype or self.cat.tensors[0].dtype, pieces))

    def whole(self, logical: str, base: int = 0, dim: int | None = None, off: int = 0) -> Piece:
        """All of ``logical`` along its split dimension (a block of ``dim`` indices, at ``off``)."""
        t = self.cat[logical]
        n = t.shape[t.split_dim]
        return Piece(self.cat.index[logical], 0, n, base, n if dim is None else dim, off)

    def column(self, logical: str, parts: int, k: int, base: int = 0, dim: int | None = None, off: int = 0) -> Piece:
        """Part ``k`` of ``parts`` along the split dimension (a block of ``dim`` indices, at ``off``)."""
        t = self.cat[logical]
        lo, hi = even_part(t.shape[t.split_dim], parts, k)
        return Piece(self.cat.index[logical], lo, hi, base, hi - lo if dim is None else dim, off)

    def vocab(self, name: str, logical: str, rows: int, part: int) -> None:
        """Rows ``[part * rows, (part + 1) * rows)`` of the padded vocabulary (padding rows hold nothing)."""
        t = self.cat[logical]
        lo, hi = part * rows, min((part + 1) * rows, t.shape[0])
        self.add(name, (rows, t.shape[1]), [Piece(self.cat.index[logical], lo, hi, 0, rows, 0)] if hi > lo else [],
                 like=logical)

    def gated_mlp(self, hf: str, gate_up: str, down: str, parts: int, k: int) -> None:
        """A gated MLP's ``[gate_k; up_k]`` and ``down_k`` (split on dim 1) from HF ``{hf}.gate_proj`` etc."""
        width = self.cat[f"{hf}.gate_proj.weight"].shape[0] // parts
        hidden = self.cat[f"{hf}.gate_proj.weight"].shape[1]
        self.add(gate_up, (2 * width, hidden), [self.column(f"{hf}.gate_proj.weight", parts, k, dim=2 * width),
                                                 self.column(f"{hf}.up_proj.weight", parts, k, dim=2 * width, off=width)])
        self.add(down, (hidden, width), [self.column(f"{hf}.down_proj.weight", parts, k)])

    def done(self) -> tuple[LocalTensor, ...]:
        return tuple(self.tensors)


def require_divides(part: int, whole: int, message: str) -> None:
    """A ShardError saying ``message`` (which names both fields as the job wrote them) unless ``part``
    divides ``whole``."""
    if part < 1 or whole % part:
        raise ShardError(message)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def even_part(size: int, parts: int, k: int) -> tuple[int, int]:
    """Range of part ``k`` when ``size`` is split evenly into ``parts`` (caller checked divisibility)."""
    n = size // parts
    return k * n, (k + 1) * n


def padded_vocab(vocab: int, multiple: int) -> int:
    """The vocabulary rounded up to a multiple of ``multiple`` (how both sides pad embeddings and heads)."""
    return -(-vocab // multiple) * multiple
