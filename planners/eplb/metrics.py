"""How well a placement balances a load: per-GPU and per-node loads and lower bounds on the max GPU load."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planners.eplb.placement import Placement
from planners.eplb.policies import _counts, _replica_counts, _take, duplicates, gpu_loads

__all__ = ["BalanceReport", "balance_report", "replication_bound", "duplicates"]


@dataclass(frozen=True)
class BalanceReport:
    """Balance of a placement against its load; ``[L]`` arrays are per layer."""

    gpu_load: np.ndarray  # [L, G] tokens per GPU
    node_load: np.ndarray  # [L, N] tokens per node
    bound: np.ndarray  # [L] max(total/G, best max load per replica over all replica counts): any placement
    replica_bound: np.ndarray  # [L] cardinality bound for this placement's own replica counts
    group_bound: np.ndarray  # [L] bound for placements keeping every replica on its group's node (as deepseek)
    duplicates: int  # GPUs (summed over layers) holding two replicas of one expert

    @property
    def max_gpu_load(self) -> np.ndarray:
        return self.gpu_load.max(axis=1)

    @property
    def mean_gpu_load(self) -> np.ndarray:
        return self.gpu_load.mean(axis=1)

    @property
    def max_node_load(self) -> np.ndarray:
        return self.node_load.max(axis=1)

    @property
    def balancedness(self) -> float:
        """Sum over layers of mean GPU load / sum over layers of max GPU load (as vLLM logs it)."""
        return float(self.mean_gpu_load.sum() / max(self.max_gpu_load.sum(), 1e-30))

    @property
    def max_over_bound(self) -> float:
        """Max GPU load over the placement-independent bound, summed over layers."""
        return float(self.max_gpu_load.sum() / max(self.bound.sum(), 1e-30))

    @property
    def max_over_replica_bound(self) -> float:
        """Max GPU load over the best packing of the chosen replicas could reach, summed over layers."""
        return float(self.max_gpu_load.sum() / max(np.maximum(self.bound, self.replica_bound).sum(), 1e-30))

    @property
    def max_over_group_bound(self) -> float:
        """Max GPU load over the bound for group-confined placements, summed over layers."""
        return float(self.max_gpu_load.sum() / max(np.maximum(self.bound, self.group_bound).sum(), 1e-30))


def replication_bound(load: np.ndarray, num_physical: int) -> np.ndarray:
    """min over replica counts (>= 1, summing to P) of max_e load_e / c_e, per layer (water-filling)."""
    load = np.asarray(load, dtype=np.float64)
    return (load / _replica_counts(load, num_physical)).max(axis=1)


def balance_report(load: np.ndarray, placement: Placement, num_gpus: int, num_nodes: int = 1,
                   num_groups: int | None = None) -> BalanceReport:
    """Per-GPU and per-node loads of ``placement`` under ``load [L, E]`` and lower bounds on the
    max GPU load. ``group_bound`` (with ``num_groups`` dividing over ``num_nodes``): a placement
    that keeps every replica on its group's node, as ``deepseek`` does, puts a whole group on one
    node, so some GPU carries at least the heaviest group's load / GPUs per node."""
    load = np.asarray(load, dtype=np.float64)
    phy2log = placement.phy2log
    L, P = phy2log.shape
    E = load.shape[1]
    per_gpu = gpu_loads(load, phy2log, num_gpus)
    per_node = per_gpu.reshape(L, num_nodes, -1).sum(axis=2)
    k = P // num_gpus
    bound = np.maximum(load.sum(axis=1) / num_gpus, replication_bound(load, P))
    # the GPU holding the heaviest replica also holds k-1 others, at least the k-1 lightest ones
    count = _counts(phy2log, E)
    replica = np.sort(_take(load / np.maximum(count, 1), phy2log), axis=1)
    card = replica[:, -1] + replica[:, : k - 1].sum(axis=1)
    group = np.zeros(L)
    if num_groups and num_groups % num_nodes == 0 and E % num_groups == 0:
        group = load.reshape(L, num_groups, -1).sum(axis=2).max(axis=1) / (num_gpus // num_nodes)
    return BalanceReport(per_gpu, per_node, bound, card, group, int(duplicates(phy2log, num_gpus).sum()))
