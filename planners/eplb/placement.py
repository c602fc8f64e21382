"""Expert placements: which logical expert each physical expert slot of an engine serves.

``phy2log [L, P]`` per MoE layer (L layers in model order) and physical slot; slots are
contiguous per EP rank (rank r owns ``[r*P/ep, (r+1)*P/ep)``). ``log2phy [L, E, R]`` lists each
logical expert's slots (-1 padded) and ``logcnt [L, E]`` counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planners.errors import PlacementError

__all__ = ["Placement"]


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

    def check(self, num_layers: int, num_experts: int, num_physical: int) -> None:
        """Raise PlacementError unless this placement covers every expert of every MoE layer."""
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
