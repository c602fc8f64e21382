"""Prove a plan correct from its own tables, vectorized so a 10^6-chunk plan checks in seconds.

Checks, in order:
1. Every chunk's source block holds exactly the logical indices it claims: stage 1 reads a
   trainer piece, stage 2 reads an inference piece its rank received in stage 1.
2. Every chunk's destination block is an inference piece that wants those indices there.
3. Every inference piece is covered by its chunks exactly once: no gap, no overlap.
4. Link classes match the devices, and stage-1 sources are trainer ranks, destinations engines.
"""

from __future__ import annotations

import numpy as np

from planners.cost import link_class
from planners.plan import PlanError, SyncPlan

__all__ = ["validate_plan", "match_containing"]


def match_containing(p_key: np.ndarray, p_lo: np.ndarray, q_key: np.ndarray, q_lo: np.ndarray) -> np.ndarray:
    """For each query (key, lo), the index of the item with the same key and the largest lo <= q_lo
    (``-1`` where none). Keys are int64 rows ``[n, k]``."""
    n = len(p_lo)
    keys = np.concatenate([p_key, q_key])
    lo = np.concatenate([p_lo, q_lo])
    is_query = np.r_[np.zeros(n, dtype=np.int8), np.ones(len(q_lo), dtype=np.int8)]
    order = np.lexsort((is_query, lo) + tuple(keys[:, i] for i in reversed(range(keys.shape[1]))))
    # position (in sorted order) of the latest item at or before each entry
    pos = np.where(order < n, np.arange(len(order)), -1)
    last = np.maximum.accumulate(pos) if len(pos) else pos
    item = np.where(last >= 0, order[np.maximum(last, 0)], -1)
    found = np.empty(len(q_lo), dtype=np.int64)
    found[order[order >= n] - n] = item[order >= n]
    ok = found >= 0
    ok[ok] = np.all(p_key[found[ok]] == q_key[ok], axis=1)
    return np.where(ok, found, -1)


def _fail(plan: SyncPlan, what: str, rows: np.ndarray) -> None:
    c = plan.chunks[rows[0]]
    raise PlanError(
        f"{what}: {len(rows)} chunk(s), first: stage {c['stage']} rank {c['src']} -> {c['dst']}, "
        f"{plan.tensors[c['tensor']].name}[{c['lo']}:{c['hi']}]"
    )


def _columns(table: np.ndarray, rows: np.ndarray | None, fields: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The ``fields`` of ``table``'s ``rows`` (all rows when None) as plain arrays: gathering a few
    columns is much cheaper than gathering whole records."""
    return {f: table[f] if rows is None else table[f][rows] for f in fields}


def _check_side(plan: SyncPlan, rows: np.ndarray | None, pieces: np.ndarray, side: str) -> np.ndarray:
    """Chunks ``rows`` (all when None) must read/write a block of ``pieces`` holding the same logical indices."""
    c = _columns(plan.chunks, rows, ("tensor", "lo", "hi", side, f"{side}_local", f"{side}_base", f"{side}_dim",
                                     f"{side}_off"))
    p_key = np.stack([pieces["local"], pieces["tensor"], pieces["base"]], axis=1).astype(np.int64)
    q_key = np.stack([c[f"{side}_local"], c["tensor"], c[f"{side}_base"]], axis=1).astype(np.int64)
    hit = match_containing(p_key, pieces["lo"], q_key, c["lo"])
    bad = hit < 0
    p = _columns(pieces, np.maximum(hit, 0), ("lo", "hi", "dim", "off"))
    bad |= c["hi"] > p["hi"]
    bad |= c[f"{side}_dim"] != p["dim"]
    bad |= c[f"{side}_off"] - p["off"] != c["lo"] - p["lo"]
    bad |= plan.local_rank[c[f"{side}_local"]] != c[side]
    if bad.any():
        where = np.flatnonzero(bad) if rows is None else rows[bad]
        _fail(plan, f"{'source' if side == 'src' else 'destination'} block does not hold the chunk's indices", where)
    return hit


def validate_plan(plan: SyncPlan) -> None:
    c = plan.chunks
    T = plan.num_trainer
    if len(c) and (c["lo"] >= c["hi"]).any():
        _fail(plan, "empty chunk", np.flatnonzero(c["lo"] >= c["hi"]))
    row_bytes = plan.table.row_bytes
    if len(c) and (c["nbytes"] != (c["hi"] - c["lo"]) * row_bytes[c["tensor"]]).any():
        _fail(plan, "byte count disagrees with the chunk's range", np.flatnonzero(c["nbytes"] != (c["hi"] - c["lo"]) * row_bytes[c["tensor"]]))

    s1 = np.flatnonzero(c["stage"] == 1)
    s2 = np.flatnonzero(c["stage"] == 2)
    if (set(np.unique(c["stage"]).tolist()) - {1, 2}):
        raise PlanError("chunks must be in stage 1 or 2")
    if (c["src"][s1] >= T).any():
        _fail(plan, "stage-1 chunk not sent by a trainer rank", s1[c["src"][s1] >= T])
    if (c["dst"] < T).any():
        _fail(plan, "chunk sent to a trainer rank", np.flatnonzero(c["dst"] < T))
    if (c["src"][s2] < T).any():
        _fail(plan, "stage-2 chunk not sent by an inference rank", s2[c["src"][s2] < T])

    is_trainer_piece = plan.local_rank[plan.pieces["local"]] < T
    tpieces, ipieces = plan.pieces[is_trainer_piece], plan.pieces[~is_trainer_piece]
    # 1. sources
    _check_side(plan, s1, tpieces, "src")
    _check_side(plan, s2, ipieces, "src")
    if len(s2):
        # a stage-2 source must have received those indices in stage 1
        r1 = _columns(c, s1, ("dst_local", "tensor", "dst_base", "lo", "hi", "dst_off"))
        key1 = np.stack([r1["dst_local"], r1["tensor"], r1["dst_base"]], axis=1).astype(np.int64)
        r2 = _columns(c, s2, ("src_local", "tensor", "src_base", "lo", "hi", "src_off"))
        key2 = np.stack([r2["src_local"], r2["tensor"], r2["src_base"]], axis=1).astype(np.int64)
        hit = match_containing(key1, r1["lo"], key2, r2["lo"])
        got = _columns(r1, np.maximum(hit, 0), ("hi", "dst_off", "lo")) if len(s1) else {"hi": 0, "dst_off": 0, "lo": 0}
        bad = (hit < 0) | (r2["hi"] > got["hi"]) | (r2["src_off"] - got["dst_off"] != r2["lo"] - got["lo"])
        if bad.any():
            _fail(plan, "stage-2 source did not receive these indices in stage 1", s2[bad])
    # 2. destinations
    hit = _check_side(plan, None, ipieces, "dst")
    # 3. exact cover of every inference piece
    order = np.lexsort((c["lo"], hit))
    h, lo, hi = hit[order], c["lo"][order], c["hi"][order]
    new = np.r_[True, h[1:] != h[:-1]] if len(h) else np.zeros(0, bool)
    if len(h):
        overlap = ~new[1:] & (lo[1:] < hi[:-1])
        gap = ~new[1:] & (lo[1:] > hi[:-1])
        if overlap.any():
            _fail(plan, "inference bytes written twice", order[1:][overlap])
        if gap.any():
            _fail(plan, "gap inside an inference tensor", order[1:][gap])
    covered = np.zeros(len(ipieces), dtype=np.int64)
    np.add.at(covered, hit, c["hi"] - c["lo"])
    short = covered != ipieces["hi"] - ipieces["lo"]
    if short.any():
        p = ipieces[np.flatnonzero(short)[0]]
        raise PlanError(
            f"{int(short.sum())} inference piece(s) not written exactly once; first: rank {plan.local_rank[p['local']]} "
            f"{plan.local_name[p['local']]} <- {plan.tensors[p['tensor']].name}[{p['lo']}:{p['hi']}]"
        )
    # 4. link classes
    want = link_class(plan.devices[c["src"]], plan.devices[c["dst"]], plan.gpus_per_node)
    if (want != c["link"]).any():
        _fail(plan, "link class disagrees with the devices", np.flatnonzero(want != c["link"]))
