"""Chunks as byte runs: the contiguous (source, destination) byte ranges a copy kernel moves.

A chunk, or the part ``[lo, hi)`` of it that a bucket carries, is a block ``[outer, n, inner]`` of
its tensor at each end: ``outer`` contiguous runs of ``n * inner`` elements. An end is a local
tensor (its plan local id) or a flat buffer (``BUFFER``) where the block lies packed at a byte
offset. Consecutive runs that continue each other at both ends merge, so a tensor copied between
equal layouts is one run however many chunks the plan cut it into. Batched copies (``sync.copier``)
execute a table of runs in a few kernel launches instead of one launch per slice.
"""

from __future__ import annotations

import numpy as np

from planners.plan import SyncPlan

__all__ = ["RUN_DTYPE", "BUFFER", "chunk_runs", "merge_runs", "apply_runs"]

RUN_DTYPE = np.dtype([("src", "i8"), ("src_off", "i8"), ("dst", "i8"), ("dst_off", "i8"), ("nbytes", "i8")])
BUFFER = -1  # the end is the flat buffer passed with the runs, not a local tensor


def chunk_runs(plan: SyncPlan, rows: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None,
               src_buffer: np.ndarray | None = None, dst_buffer: np.ndarray | None = None) -> np.ndarray:
    """Byte runs of chunk rows ``rows`` (sub-ranges ``[lo, hi)``, whole chunks by default), merged.

    ``src_buffer``/``dst_buffer``: that end is the packed buffer, each item starting at the given
    byte offset, instead of the chunk's local tensor."""
    rows = np.asarray(rows, dtype=np.int64)
    c = plan.chunks[rows]
    lo = c["lo"].astype(np.int64) if lo is None else np.asarray(lo, dtype=np.int64)
    hi = c["hi"].astype(np.int64) if hi is None else np.asarray(hi, dtype=np.int64)
    itemsize = np.array([t.nbytes // max(t.numel, 1) for t in plan.tensors], dtype=np.int64)[c["tensor"]]
    outer = np.array([t.outer for t in plan.tensors], dtype=np.int64)[c["tensor"]]
    inner = np.array([t.inner for t in plan.tensors], dtype=np.int64)[c["tensor"]]
    run_bytes = (hi - lo) * inner * itemsize
    item = np.repeat(np.arange(len(rows)), outer)
    row = np.arange(len(item)) - np.repeat(np.cumsum(outer) - outer, outer)  # index along outer

    def end(side: str, buffer: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if buffer is not None:
            return np.full(len(item), BUFFER, dtype=np.int64), np.asarray(buffer, dtype=np.int64)[item] + row * run_bytes[item]
        first = c[f"{side}_base"] + (c[f"{side}_off"] + lo - c["lo"]) * inner  # element of the block's first run
        stride = c[f"{side}_dim"] * inner
        return c[f"{side}_local"].astype(np.int64)[item], (first[item] + row * stride[item]) * itemsize[item]

    out = np.empty(len(item), dtype=RUN_DTYPE)
    out["src"], out["src_off"] = end("src", src_buffer)
    out["dst"], out["dst_off"] = end("dst", dst_buffer)
    out["nbytes"] = run_bytes[item]
    return merge_runs(out[out["nbytes"] > 0])


def merge_runs(runs: np.ndarray) -> np.ndarray:
    """Join each run to the previous one where it continues it at both ends."""
    if len(runs) < 2:
        return runs.copy()
    prev, cur = runs[:-1], runs[1:]
    joins = ((cur["src"] == prev["src"]) & (cur["dst"] == prev["dst"])
             & (cur["src_off"] == prev["src_off"] + prev["nbytes"]) & (cur["dst_off"] == prev["dst_off"] + prev["nbytes"]))
    starts = np.flatnonzero(np.concatenate([[True], ~joins]))
    out = runs[starts].copy()
    out["nbytes"] = np.add.reduceat(runs["nbytes"], starts)
    return out


def apply_runs(runs: np.ndarray, ends: dict[int, np.ndarray]) -> None:
    """Reference executor over byte arrays (``ends[id]`` is a uint8 array, ``ends[BUFFER]`` the buffer)."""
    for r in runs:
        s, d, n = int(r["src_off"]), int(r["dst_off"]), int(r["nbytes"])
        ends[int(r["dst"])][d: d + n] = ends[int(r["src"])][s: s + n]
