"""Link classes, bandwidths and the cost model of a plan.

Three link classes: the same device (a copy in HBM), the same node (NVLink) and across nodes
(the NIC of each GPU; a node's NIC bandwidth is the sum over its GPUs). A rank sends and receives
on every class at once, so a rank's time in a stage is the largest of its per-class, per-direction
byte counts over that class's bandwidth; a stage takes as long as its slowest rank or node, and
the two stages run one after the other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
from pydantic import Field

__all__ = ["Links", "SAME_DEVICE", "SAME_NODE", "CROSS_NODE", "LINK_NAMES", "link_class", "stage_time"]

SAME_DEVICE, SAME_NODE, CROSS_NODE = 0, 1, 2
LINK_NAMES = ("same device", "same node", "cross node")


MAX_GBPS = 1e9  # a petabyte per second: beyond any link, and bytes per second stay finite
# A bandwidth of the job schema (``planners.job`` reads these annotations).
Bandwidth = Annotated[float, Field(gt=0, le=MAX_GBPS, allow_inf_nan=False)]


@dataclass(frozen=True)
class Links:
    """Bandwidths in GB/s (10^9 bytes per second), per direction."""

    same_device_gbps: Bandwidth = 1500.0
    nvlink_gbps: Bandwidth = 450.0
    nic_gbps: Bandwidth = 50.0  # per GPU

    def __post_init__(self) -> None:
        for name in ("same_device_gbps", "nvlink_gbps", "nic_gbps"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"links.{name} must be a positive number of GB/s, got {v!r}")

    def bandwidths(self) -> np.ndarray:
        """Bytes per second of each link class, indexed by SAME_DEVICE, SAME_NODE, CROSS_NODE."""
        return np.array([self.same_device_gbps, self.nvlink_gbps, self.nic_gbps]) * 1e9


def link_class(src_device: np.ndarray, dst_device: np.ndarray, gpus_per_node: int) -> np.ndarray:
    """Link class of each (src, dst) device pair."""
    same_node = (src_device // gpus_per_node) == (dst_device // gpus_per_node)
    return np.where(src_device == dst_device, SAME_DEVICE, np.where(same_node, SAME_NODE, CROSS_NODE))


def stage_time(src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray, link: np.ndarray, devices: np.ndarray,
               gpus_per_node: int, links: Links) -> float:
    """Seconds for one stage: the slowest rank (per class and direction) or node NIC."""
    if len(nbytes) == 0:
        return 0.0
    bw = links.bandwidths()
    n_ranks = len(devices)
    t = 0.0
    for cls in (SAME_DEVICE, SAME_NODE, CROSS_NODE):
        m = link == cls
        if not m.any():
            continue
        out = np.bincount(src[m], weights=nbytes[m], minlength=n_ranks)
        inc = np.bincount(dst[m], weights=nbytes[m], minlength=n_ranks)
        t = max(t, out.max() / bw[cls], inc.max() / bw[cls])
    m = link == CROSS_NODE
    if m.any():
        nodes = devices // gpus_per_node
        node_bw = bw[CROSS_NODE] * gpus_per_node
        t = max(t, np.bincount(nodes[src[m]], weights=nbytes[m]).max() / node_bw,
                np.bincount(nodes[dst[m]], weights=nbytes[m]).max() / node_bw)
    return float(t)
