"""Mixed-radix rank grids: the arithmetic behind Megatron-core's and vLLM's rank orders.

A parallel layout orders its dimensions from fastest- to slowest-varying (Megatron's
``"tp-cp-ep-dp-pp"``: tp varies fastest). A global rank is then a mixed-radix number whose
digits are the coordinates. A *group* along some dimensions is the set of ranks that agree on
every other coordinate.

Megatron-core's ``parallel_state.RankGenerator`` does the same; importing megatron-core costs
several seconds, so the planner uses this pure version and the tests prove the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

__all__ = ["RankGrid"]


@dataclass(frozen=True)
class RankGrid:
    """Sizes of named dimensions in rank order, fastest first."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.names) != len(self.sizes):
            raise ValueError(f"RankGrid: {len(self.names)} names but {len(self.sizes)} sizes")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"RankGrid: repeated dimension in {self.names}")
        for name, size in zip(self.names, self.sizes):
            if size < 1:
                raise ValueError(f"RankGrid: size of {name!r} must be >= 1, got {size}")

    @property
    def world_size(self) -> int:
        n = 1
        for s in self.sizes:
            n *= s
        return n

    def _strides(self) -> list[int]:
        strides, acc = [], 1
        for s in self.sizes:
            strides.append(acc)
            acc *= s
        return strides

    def coords(self, rank: int) -> dict[str, int]:
        """Coordinates of ``rank`` along every named dimension."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside world of size {self.world_size}")
        out = {}
        for name, size in zip(self.names, self.sizes):
            out[name] = rank % size
            rank //= size
        return out

    def rank(self, **coords: int) -> int:
        """Global rank of the given coordinates (missing dimensions count as 0)."""
        r = 0
        for name, size, stride in zip(self.names, self.sizes, self._strides()):
            c = coords.get(name, 0)
            if not 0 <= c < size:
                raise ValueError(f"coordinate {name}={c} outside [0, {size})")
            r += c * stride
        return r

    def groups(self, dims: str) -> list[list[int]]:
        """Groups that vary along ``dims`` (e.g. ``"tp"`` or ``"tp-ep"``), in Megatron's order.

        Groups are enumerated with the fixed coordinates as a mixed-radix counter (fastest
        dimension first); members of a group are listed in rank order.
        """
        wanted = dims.split("-")
        for d in wanted:
            if d not in self.names:
                raise ValueError(f"unknown dimension {d!r}; grid has {self.names}")
        strides = self._strides()
        varying = [i for i, n in enumerate(self.names) if n in wanted]
        fixed = [i for i, n in enumerate(self.names) if n not in wanted]
        groups = []
        # itertools.product varies its last factor fastest; reverse so the first fixed dim does.
        for fixed_coords in product(*(range(self.sizes[i]) for i in reversed(fixed))):
            base = sum(c * strides[i] for c, i in zip(fixed_coords, reversed(fixed)))
            members = [
                base + sum(c * strides[i] for c, i in zip(var_coords, reversed(varying)))
                for var_coords in product(*(range(self.sizes[i]) for i in reversed(varying)))
            ]
            groups.append(sorted(members))
        return groups
