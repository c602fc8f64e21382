"""Build a two-stage sync plan by intersecting what trainer ranks hold with what engines need.

Steps:
1. Shard rules give every rank's local tensors and their pieces (trainer and inference).
2. Per logical tensor, the trainer's pieces cut the split dimension into segments, each held by
   a set of trainer ranks (DP / expert-DP replicas, tied copies).
3. Each inference piece is cut at those segment boundaries; equal cuts needed by ranks of one
   *receiving group* -- the ranks of one engine on one node -- form one delivery.
4. Deliveries, largest first, get a route: ranks whose own GPU holds the bytes copy locally;
   otherwise the least-loaded member becomes the entry receiver and gets the bytes in stage 1
   from the holder that finishes soonest (same-node holders are cheaper); stage 2 fans out from
   the entry (or a local copier) to the rest of the group over the node's fast links.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import defaultdict
from operator import itemgetter
from typing import Any

import numpy as np

from planners.cost import CROSS_NODE, SAME_DEVICE, SAME_NODE, Links
from planners.layouts import Deployment, InferenceLayout, TrainerLayout
from planners.megatron_rules import check_trainer, trainer_locals
from planners.model import Catalog, ModelSpec, catalog
from planners.placement import Placement
from planners.plan import CHUNK_DTYPE, PIECE_DTYPE, SyncPlan
from planners.shards import LocalTensor
from planners.vllm_rules import check_inference, inference_locals

__all__ = ["build_plan", "build_plan_from_parts"]


def build_plan(job: Any) -> SyncPlan:
    """Plan for a :class:`planners.job.JobSpec`."""
    return build_plan_from_parts(job.model, job.trainer, job.inference, job.deployment, job.placement(),
                                 job.links, meta=job.describe())


def build_plan_from_parts(spec: ModelSpec, trainer: TrainerLayout, inference: InferenceLayout,
                          deployment: Deployment, placement: Placement | None = None,
                          links: Links | None = None, meta: dict[str, Any] | None = None) -> SyncPlan:
    links = links or Links()
    check_trainer(spec, trainer)
    check_inference(spec, inference, placement)
    cat = catalog(spec)
    devices = np.asarray(deployment.device_ids(trainer, inference), dtype=np.int64)
    gpn = deployment.gpus_per_node
    T = trainer.world_size

    locals_: list[LocalTensor] = [t for r in range(T) for t in trainer_locals(spec, cat, trainer, r)]
    n_trainer_locals = len(locals_)
    locals_ += [t for r in range(inference.world_size) for t in inference_locals(spec, cat, inference, placement, r, T + r)]
    pieces = _piece_table(locals_)

    segments = _trainer_segments(cat, pieces[: _count_pieces(locals_[:n_trainer_locals])], locals_)
    deliveries = _deliveries(cat, pieces, locals_, n_trainer_locals, segments, devices, gpn, inference, T)
    chunks = _route(cat, deliveries, segments, devices, gpn, links, len(devices))

    return SyncPlan(
        tensors=cat.tensors,
        local_rank=np.array([t.rank for t in locals_], dtype=np.int32),
        local_name=[t.name for t in locals_],
        local_shape=[t.shape for t in locals_],
        local_dtype=[t.dtype for t in locals_],
        pieces=pieces,
        chunks=chunks,
        devices=devices,
        num_trainer=T,
        gpus_per_node=gpn,
        links=links,
        meta=meta or {},
    )


def _count_pieces(locals_: list[LocalTensor]) -> int:
    return sum(len(t.pieces) for t in locals_)


def _piece_table(locals_: list[LocalTensor]) -> np.ndarray:
    rows = [(lid, p.tensor, p.lo, p.hi, p.base, p.dim, p.off) for lid, t in enumerate(locals_) for p in t.pieces]
    return np.array(rows, dtype=PIECE_DTYPE) if rows else np.zeros(0, dtype=PIECE_DTYPE)


class _Segments:
    """Per logical tensor: sorted cut points and, per segment, its holders.

    ``holders[t][k]`` lists ``(rank, local, base, dim, off_at_segment_start)`` for segment k
    ``[cuts[t][k], cuts[t][k+1])``.
    """

    def __init__(self) -> None:
        self.cuts: dict[int, list[int]] = {}
        self.holders: dict[int, list[list[tuple[int, int, int, int, int]]]] = {}


def _trainer_segments(cat: Catalog, tpieces: np.ndarray, locals_: list[LocalTensor]) -> _Segments:
    seg = _Segments()
    by_tensor: dict[int, list[tuple]] = defaultdict(list)
    for p in tpieces.tolist():
        by_tensor[p[1]].append(p)
    for t, ps in by_tensor.items():
        cuts = sorted({p[2] for p in ps} | {p[3] for p in ps})
        holders: list[list[tuple[int, int, int, int, int]]] = [[] for _ in range(len(cuts) - 1)]
        for local, _, lo, hi, base, dim, off in ps:
            k = cuts.index(lo)
            rank = locals_[local].rank
            while k < len(cuts) - 1 and cuts[k] < hi:
                holders[k].append((rank, local, base, dim, off + cuts[k] - lo))
                k += 1
        seg.cuts[t] = cuts
        seg.holders[t] = holders
    return seg


def _deliveries(cat, pieces, locals_, n_trainer_locals, seg, devices, gpn, inference, T):
    """Group needed cuts by (tensor, segment, range, receiving group) -> list of destinations."""
    engine_size = inference.engine_size
    local_rank = [t.rank for t in locals_]
    group_of = [((r - T) // engine_size, int(devices[r]) // gpn) if r >= T else None for r in range(len(devices))]
    groups: dict[tuple, list[tuple[int, int, int, int, int]]] = {}
    first_inf = int(np.searchsorted(pieces["local"], n_trainer_locals))
    all_cuts = seg.cuts
    for local, t, lo, hi, base, dim, off in pieces[first_inf:].tolist():
        rank = local_rank[local]
        g = group_of[rank]
        cuts = all_cuts.get(t)
        k = bisect_right(cuts, lo) - 1 if cuts is not None else -1
        if k < 0 or hi > cuts[-1]:
            raise ValueError(f"no trainer rank holds {cat[t].name}[{lo}:{hi}]")
        a = lo
        while a < hi:  # one segment in the common case
            b = min(hi, cuts[k + 1])
            key = (t, k, a, b, g)
            dest = (rank, local, base, dim, off + a - lo)
            same = groups.get(key)
            if same is None:
                groups[key] = [dest]
            else:
                same.append(dest)
            a = b
            k += 1
    return groups


def _route(cat, deliveries, seg, devices, gpn, links, n_ranks) -> np.ndarray:
    inv_bw = [1.0 / b for b in links.bandwidths()]
    inv_node, inv_nic = inv_bw[SAME_NODE], inv_bw[CROSS_NODE]
    dev = devices.tolist()
    node = [d // gpn for d in dev]
    out_busy = [0.0] * n_ranks  # seconds each rank spends sending in stage 1
    in_busy = [0.0] * n_ranks
    row_bytes = [t.row_bytes for t in cat.tensors]
    rows: list[tuple] = []
    add = rows.append
    holders_on: dict[tuple[int, int], dict[int, tuple]] = {}

    items = sorted((((key[3] - key[2]) * row_bytes[key[0]], key, dests) for key, dests in deliveries.items()),
                   key=itemgetter(0), reverse=True)  # largest first; stable for ties
    for nbytes, (t, k, a, b, _), dests in items:
        holders = seg.holders[t][k]
        start = seg.cuts[t][k]
        on_device = holders_on.get((t, k))
        if on_device is None:
            on_device = holders_on[(t, k)] = {dev[h[0]]: h for h in holders}
        # 1. Ranks whose own GPU holds the bytes copy them locally.
        entry = None
        rest = []
        for d in dests:
            h = on_device.get(dev[d[0]])
            if h is None:
                rest.append(d)
                continue
            add((1, h[0], d[0], t, a, b, h[1], h[2], h[3], h[4] + a - start, d[1], d[2], d[3], d[4], nbytes, SAME_DEVICE))
            if entry is None:
                entry = d
        # 2. Otherwise one stage-1 transfer into the least-loaded member of the group,
        #    from the holder that would finish it soonest.
        if entry is None:
            entry = rest[0] if len(rest) == 1 else min(rest, key=lambda d: in_busy[d[0]])
            rest.remove(entry)
            e_rank = entry[0]
            e_node = node[e_rank]
            best, best_t, best_inv = None, 0.0, inv_nic
            for h in holders:
                inv = inv_node if node[h[0]] == e_node else inv_nic
                finish = out_busy[h[0]] + nbytes * inv
                if best is None or finish < best_t:
                    best, best_t, best_inv = h, finish, inv
            out_busy[best[0]] = best_t
            in_busy[e_rank] += nbytes * best_inv
            add((1, best[0], e_rank, t, a, b, best[1], best[2], best[3], best[4] + a - start,
                 entry[1], entry[2], entry[3], entry[4], nbytes, SAME_NODE if best_inv == inv_node else CROSS_NODE))
        # 3. Stage 2: fan out inside the receiving group.
        for d in rest:
            cls = SAME_DEVICE if dev[d[0]] == dev[entry[0]] else (SAME_NODE if node[d[0]] == node[entry[0]] else CROSS_NODE)
            add((2, entry[0], d[0], t, a, b, entry[1], entry[2], entry[3], entry[4], d[1], d[2], d[3], d[4], nbytes, cls))

    chunks = np.zeros(len(rows), dtype=CHUNK_DTYPE)
    for name, column in zip(CHUNK_DTYPE.names, zip(*rows)):
        chunks[name] = column
    order = np.lexsort((chunks["lo"], chunks["tensor"], chunks["dst"], chunks["src"], chunks["stage"]))
    return chunks[order]
