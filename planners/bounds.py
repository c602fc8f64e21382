"""A lower bound on the time of any plan for a job, independent of routing choices.

Three limits, each optimistic (so their maximum is a true bound):
* receiver: each engine rank must take in, once, the bytes no trainer rank on its own GPU holds; at
  best by a device copy where another engine rank on its GPU needs that tensor too, over NVLink
  where a holder or another receiver of it shares its node, else through its NIC;
* node: each engine node must take in, at least once, every needed byte that no trainer rank on
  that node holds, through the node's NICs;
* sender: every needed byte held on no engine node must leave the trainer, spread at best evenly
  over all trainer NICs.
"""

from __future__ import annotations

import numpy as np

from planners.cost import CROSS_NODE, SAME_DEVICE, SAME_NODE

__all__ = ["lower_bound", "union_bytes"]


def union_bytes(group: np.ndarray, tensor: np.ndarray, lo: np.ndarray, hi: np.ndarray, row_bytes: np.ndarray,
                n_groups: int) -> np.ndarray:
    """Bytes of the union of intervals per (group, tensor), summed per group."""
    if len(lo) == 0:
        return np.zeros(n_groups)
    order = np.lexsort((lo, tensor, group))
    g, t, a, b = group[order], tensor[order], lo[order], hi[order]
    key = g.astype(np.int64) * (int(t.max()) + 1) + t
    new = np.r_[True, key[1:] != key[:-1]]
    big = int(b.max()) + 1
    run = np.cumsum(new) * big  # shifts each (group, tensor) run above the previous one
    covered = np.maximum.accumulate(b + run) - run  # furthest end seen so far in this run
    prev = np.r_[0, covered[:-1]]
    prev[new] = 0
    length = np.clip(b - np.maximum(a, prev), 0, None)
    return np.bincount(g, weights=length * row_bytes[t], minlength=n_groups)


def lower_bound(plan) -> float:
    T, gpn = plan.num_trainer, plan.gpus_per_node
    bw = plan.links.bandwidths()
    row_bytes = plan.table.row_bytes.astype(np.float64)
    rank_of = plan.local_rank[plan.pieces["local"]].astype(np.int64)
    dev = plan.devices[rank_of]
    node = dev // gpn
    trainer = rank_of < T
    p = plan.pieces
    tensor = p["tensor"].astype(np.int64)

    def has(keys_from: np.ndarray, keys_to: np.ndarray) -> np.ndarray:
        return np.isin(keys_to, np.unique(keys_from))

    same_dev = has(tensor[trainer] * (dev.max() + 1) + dev[trainer], tensor * (dev.max() + 1) + dev)
    same_node_holder = has(tensor[trainer] * (node.max() + 1) + node[trainer], tensor * (node.max() + 1) + node)
    inf = ~trainer

    # receivers
    def shared(where: np.ndarray) -> np.ndarray:  # another engine rank at the same place needs the tensor too
        key = tensor * (where.max() + 1) + where
        keys, counts = np.unique(np.unique(np.stack([key[inf], rank_of[inf]]), axis=1)[0], return_counts=True)
        return np.isin(key, keys[counts > 1])

    remote = inf & ~same_dev
    via_device = remote & shared(dev)  # at best copied from an engine rank on the same GPU
    via_nvlink = remote & ~via_device & (same_node_holder | shared(node))
    via_nic = remote & ~via_device & ~via_nvlink
    n = plan.num_ranks

    def per_rank(m: np.ndarray) -> np.ndarray:  # a rank needing the same bytes twice (two slots) gets them once
        return union_bytes(rank_of[m], tensor[m], p["lo"][m], p["hi"][m], row_bytes, n)

    t_recv = max((per_rank(via_device) / bw[SAME_DEVICE]).max(initial=0.0),
                 (per_rank(via_nvlink) / bw[SAME_NODE]).max(initial=0.0),
                 (per_rank(via_nic) / bw[CROSS_NODE]).max(initial=0.0))
    # nodes
    m = inf & ~same_node_holder
    n_nodes = int(node.max()) + 1
    node_in = union_bytes(node[m], tensor[m], p["lo"][m], p["hi"][m], row_bytes, n_nodes)
    t_node = node_in.max(initial=0.0) / (bw[CROSS_NODE] * gpn)
    # senders
    inf_nodes_holding = has(tensor[trainer & np.isin(node, np.unique(node[inf]))], tensor)
    m = inf & ~inf_nodes_holding
    total = union_bytes(np.zeros(int(m.sum()), dtype=np.int64), tensor[m], p["lo"][m], p["hi"][m], row_bytes, 1)
    t_send = float(total[0]) / (bw[CROSS_NODE] * T)
    return float(max(t_recv, t_node, t_send))
