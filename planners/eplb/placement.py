"""Expert placements: which logical expert each physical expert slot of an engine serves.

``phy2log [L, P]`` per MoE layer (L layers in model order) and physical slot; slots are
contiguous per EP rank (rank r owns ``[r*P/ep, (r+1)*P/ep)``). ``log2phy [L, E, R]`` lists each
logical expert's slots (-1 padded) and ``logcnt [L, E]`` counts them.

A :class:`Placement` is shared by every engine of a job; :class:`EnginePlacements` gives each engine
its own (vLLM balances each engine's EP group by that engine's own load). Both answer
``of_engine(k)``: the placement engine ``k`` serves.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planners.errors import PlacementError

__all__ = ["Placement", "EnginePlacements", "placement_from_phy2log"]


@dataclass(frozen=True, eq=False)  # hashed by identity: shard rules cache on it
class Placement:
    phy2log: np.ndarray  # [L, P] int64

    def __post_init__(self) -> None:
        p = np.asarray(self.phy2log)
        if p.ndim != 2:
            raise PlacementError(f"placement.phy2log must be 2-D [moe_layers, slots], got shape {p.shape}")
        object.__setattr__(self, "phy2log", p.astype(np.int64, copy=False))

    @classmethod
    def identity(cls, num_layers: int, num_experts: int, num_physical: int | None = None) -> "Placement":
        """Slot i serves expert ``i % num_experts``: vLLM's initial placement with redundant slots."""
        P = num_experts if num_physical is None else num_physical
        return cls(np.tile(np.arange(P) % num_experts, (num_layers, 1)))

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    def of_engine(self, engine: int) -> "Placement":
        """The placement engine ``engine`` serves: this one, shared by all."""
        return self

    @property
    def engines(self) -> tuple["Placement", ...] | None:
        """Each engine's placement where they differ; None where every engine shares this one."""
        return None

    @property
    def num_physical(self) -> int:
        return self.phy2log.shape[1]

    @property
    def logcnt(self) -> np.ndarray:
        E = int(self.phy2log.max()) + 1 if self.phy2log.size else 0
        return np.stack([np.bincount(row, minlength=E) for row in self.phy2log]) if E else self.phy2log[:, :0]

    def log2phy(self, num_experts: int) -> np.ndarray:
        """``[L, E, R]`` slots of each logical expert, ascending, -1 padded."""
        L, P = self.phy2log.shape
        counts = np.stack([np.bincount(row, minlength=num_experts) for row in self.phy2log])
        R = max(int(counts.max()), 1)
        out = np.full((L, num_experts, R), -1, dtype=np.int64)
        order = np.argsort(self.phy2log, axis=1, kind="stable")
        for layer in range(L):
            sorted_experts = self.phy2log[layer, order[layer]]
            starts = np.searchsorted(sorted_experts, sorted_experts, side="left")
            out[layer, sorted_experts, np.arange(P) - starts] = order[layer]
        return out

    def check(self, num_layers: int, num_experts: int, num_physical: int, engines: int | None = None) -> None:
        """Raise PlacementError unless this placement covers every expert of every MoE layer
        (``engines``: how many engines share it; any number can)."""
        if self.phy2log.shape != (num_layers, num_physical):
            raise PlacementError(
                f"placement.phy2log has shape {self.phy2log.shape}; expected ({num_layers} MoE layers, {num_physical} slots)"
            )
        if self.phy2log.size and (self.phy2log.min() < 0 or self.phy2log.max() >= num_experts):
            raise PlacementError(f"placement.phy2log holds expert ids outside [0, {num_experts})")
        for layer, row in enumerate(self.phy2log):
            missing = np.setdiff1d(np.arange(num_experts), row)
            if missing.size:
                raise PlacementError(
                    f"placement: MoE layer {layer} has no slot for experts {missing[:8].tolist()}; every expert needs one"
                )


@dataclass(frozen=True, eq=False)
class EnginePlacements:
    """One placement per engine (engine ``k`` of the inference layout serves ``placements[k]``), all
    with the same MoE layers and slots."""

    placements: tuple[Placement, ...]

    def __post_init__(self) -> None:
        placements = tuple(p if isinstance(p, Placement) else Placement(np.asarray(p)) for p in self.placements)
        if not placements:
            raise PlacementError("per-engine placements: got none; give one per engine")
        shapes = {p.phy2log.shape for p in placements}
        if len(shapes) != 1:
            raise PlacementError(f"per-engine placements differ in shape ({sorted(shapes)}); every engine has "
                                 "the same MoE layers and expert slots")
        object.__setattr__(self, "placements", placements)

    def of_engine(self, engine: int) -> Placement:
        return self.placements[engine]

    @property
    def engines(self) -> tuple[Placement, ...]:
        return self.placements

    @property
    def phy2log(self) -> np.ndarray:
        """``[engines, L, P]``."""
        return np.stack([p.phy2log for p in self.placements])

    @property
    def num_layers(self) -> int:
        return self.placements[0].num_layers

    @property
    def num_physical(self) -> int:
        return self.placements[0].num_physical

    def check(self, num_layers: int, num_experts: int, num_physical: int, engines: int | None = None) -> None:
        """Placement.check for every engine's; with ``engines``, one placement per engine."""
        if engines is not None and len(self.placements) != engines:
            raise PlacementError(f"per-engine placements: got {len(self.placements)} for {engines} engines "
                                 "(inference.engines); give one per engine")
        for k, p in enumerate(self.placements):
            try:
                p.check(num_layers, num_experts, num_physical)
            except PlacementError as e:
                raise PlacementError(f"engine {k}'s {e}") from None


def placement_from_phy2log(phy2log) -> Placement | EnginePlacements:
    """``[L, P]`` (shared by every engine) or ``[engines, L, P]`` (one per engine)."""
    p = np.asarray(phy2log, dtype=np.int64)
    if p.ndim == 3:
        return EnginePlacements(tuple(Placement(row) for row in p))
    return Placement(p)
