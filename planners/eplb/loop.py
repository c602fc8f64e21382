"""DeepSeek's EPLB written the plain way: one layer at a time, one item at a time.

The reference that the vectorized ``planners.eplb`` must match exactly on tie-free loads, and the
baseline that the EPLB benchmark measures against. Not used on any hot path.
"""

from __future__ import annotations

import numpy as np

__all__ = ["rebalance_loop"]


def _pack(weights: list[float], num_packs: int) -> tuple[list[int], list[int]]:
    n = len(weights)
    per_pack = n // num_packs
    if per_pack == 1:
        return list(range(n)), [0] * n
    loads, counts = [0.0] * num_packs, [0] * num_packs
    pack, rank = [0] * n, [0] * n
    for item in sorted(range(n), key=lambda i: -weights[i]):  # stable: ties keep index order
        best = None
        for p in range(num_packs):
            if counts[p] < per_pack and (best is None or loads[p] < loads[best]):
                best = p
        pack[item], rank[item] = best, counts[best]
        loads[best] += weights[item]
        counts[best] += 1
    return pack, rank


def _replicate(weights: list[float], num_slots: int) -> tuple[list[int], list[int]]:
    n = len(weights)
    slot2item = list(range(n))
    count = [1] * n
    for _ in range(n, num_slots):
        best = max(range(n), key=lambda i: (weights[i] / count[i], -i))  # first maximum
        slot2item.append(best)
        count[best] += 1
    return slot2item, count


def _layer(load: list[float], num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> list[int]:
    E = len(load)
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    per_node_experts = E // num_nodes
    per_node_slots = num_physical // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus

    group_load = [sum(load[g * group_size:(g + 1) * group_size]) for g in range(num_groups)]
    node_of, rank_of = _pack(group_load, num_nodes)
    # node-major order of experts: node n holds groups_per_node groups, each a run of group_size experts
    node_major = [0] * E
    for g in range(num_groups):
        for j in range(group_size):
            node_major[(node_of[g] * groups_per_node + rank_of[g]) * group_size + j] = g * group_size + j
    phy2log = []
    for node in range(num_nodes):
        experts = node_major[node * per_node_experts:(node + 1) * per_node_experts]
        weights = [load[e] for e in experts]
        slot2item, count = _replicate(weights, per_node_slots)
        replica_w = [weights[i] / count[i] for i in slot2item]
        gpu, rank = _pack(replica_w, gpus_per_node)
        placed = [0] * per_node_slots
        for s in range(per_node_slots):
            placed[gpu[s] * slots_per_gpu + rank[s]] = experts[slot2item[s]]
        phy2log += placed
    return phy2log


def rebalance_loop(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """phy2log ``[L, P]`` of DeepSeek's policy (hierarchical when groups divide over nodes, else global)."""
    if num_groups % num_nodes:
        num_groups = num_nodes = 1
    return np.array([_layer([float(x) for x in row], num_physical, num_groups, num_nodes, num_gpus)
                     for row in np.asarray(load, dtype=np.float64)], dtype=np.int64)
