"""Chunks as byte runs: the (source, destination) byte ranges a copy kernel moves.

A chunk, or the part ``[lo, hi)`` of it that a bucket carries, is a block ``[outer, n, inner]`` of
its tensor at each end: ``outer`` rows of ``n * inner`` contiguous elements, a fixed stride apart.
A run is such a strided block: ``rows`` rows of ``nbytes`` bytes, starting at ``src_off``/``dst_off``
and ``src_stride``/``dst_stride`` bytes apart; a block whose rows touch at both ends is one
contiguous run (``rows == 1``). An end is a local tensor (its plan local id) or a flat buffer
(``BUFFER``) where the block lies packed at a byte offset. Consecutive contiguous runs that
continue each other at both ends merge, so a tensor copied between equal layouts is one run however
many chunks the plan cut it into. Batched copies (``sync.copier``) execute a table of runs in a few
kernel launches instead of one launch per slice.
"""

from __future__ import annotations

import numpy as np

from planners.plan import SyncPlan

__all__ = ["RUN_DTYPE", "BUFFER", "chunk_runs", "block_runs", "merge_runs", "apply_runs"]

RUN_DTYPE = np.dtype([("src", "i8"), ("src_off", "i8"), ("dst", "i8"), ("dst_off", "i8"), ("nbytes", "i8"),
                      ("rows", "i8"), ("src_stride", "i8"), ("dst_stride", "i8")])
BUFFER = -1  # the end is the flat buffer passed with the runs, not a local tensor


def chunk_runs(plan: SyncPlan, rows: np.ndarray, lo: np.ndarray | None = None, hi: np.ndarray | None = None,
               src_buffer: np.ndarray | None = None, dst_buffer: np.ndarray | None = None) -> np.ndarray:
    """Byte runs of chunk rows ``rows`` (sub-ranges ``[lo, hi)``, whole chunks by default), merged.

    ``src_buffer``/``dst_buffer``: that end is the packed buffer, each item starting at the given
    byte offset, instead of the chunk's local tensor."""
    rows = np.asarray(rows, dtype=np.int64)
    columns = {f: plan.chunks[f][rows] for f in _FIELDS}  # the fields runs read, not whole records
    return block_runs(plan, columns, lo, hi, src_buffer, dst_buffer)


_FIELDS = ("tensor", "lo", "hi", "src_local", "src_base", "src_dim", "src_off", "dst_local", "dst_base", "dst_dim",
           "dst_off")


def block_runs(plan: SyncPlan, c, lo: np.ndarray | None = None, hi: np.ndarray | None = None,
               src_buffer: np.ndarray | None = None, dst_buffer: np.ndarray | None = None, merge: bool = True) -> np.ndarray:
    """:func:`chunk_runs` of chunk records ``c`` (``CHUNK_DTYPE`` records, or their fields as a dict of
    arrays; they need not be the plan's own rows). ``merge=False``: one run per non-empty record, in order."""
    rows = np.arange(len(c["tensor"]))
    lo = c["lo"].astype(np.int64) if lo is None else np.asarray(lo, dtype=np.int64)
    hi = c["hi"].astype(np.int64) if hi is None else np.asarray(hi, dtype=np.int64)
    table = plan.table
    itemsize, outer, inner = table.itemsize[c["tensor"]], table.outer[c["tensor"]], table.inner[c["tensor"]]
    row_bytes = (hi - lo) * inner * itemsize

    def end(side: str, buffer: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if buffer is not None:
            return np.full(len(rows), BUFFER, dtype=np.int64), np.asarray(buffer, dtype=np.int64), row_bytes
        first = c[f"{side}_base"] + (c[f"{side}_off"] + lo - c["lo"]) * inner  # element of the block's first row
        return c[f"{side}_local"].astype(np.int64), first * itemsize, c[f"{side}_dim"] * inner * itemsize

    out: dict[str, np.ndarray] = {}  # the runs as columns until the end: structured fields are strided
    out["src"], out["src_off"], out["src_stride"] = end("src", src_buffer)
    out["dst"], out["dst_off"], out["dst_stride"] = end("dst", dst_buffer)
    flat = (outer == 1) | ((out["src_stride"] == row_bytes) & (out["dst_stride"] == row_bytes))
    out["nbytes"] = np.where(flat, row_bytes * outer, row_bytes)  # rows that touch at both ends: one contiguous run
    out["rows"] = np.where(flat, 1, outer)
    out["src_stride"] = np.where(flat, out["nbytes"], out["src_stride"])
    out["dst_stride"] = np.where(flat, out["nbytes"], out["dst_stride"])
    keep = out["nbytes"] > 0
    kept = {k: v[keep] for k, v in out.items()}
    return _records(_merged(kept) if merge else kept)


def merge_runs(runs: np.ndarray) -> np.ndarray:
    """Join each contiguous run to the previous one where it continues it at both ends."""
    return _records(_merged({k: np.ascontiguousarray(runs[k]) for k in RUN_DTYPE.names}))


def _merged(cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """:func:`merge_runs` on runs given as columns."""
    if len(cols["src"]) < 2:
        return cols
    one = cols["rows"] == 1
    continues = lambda side: cols[f"{side}_off"][1:] == cols[f"{side}_off"][:-1] + cols["nbytes"][:-1]  # noqa: E731
    joins = (one[1:] & one[:-1] & (cols["src"][1:] == cols["src"][:-1]) & (cols["dst"][1:] == cols["dst"][:-1])
             & continues("src") & continues("dst"))
    if not joins.any():
        return cols
    starts = np.flatnonzero(np.concatenate([[True], ~joins]))
    out = {k: v[starts] for k, v in cols.items()}
    out["nbytes"] = np.add.reduceat(cols["nbytes"], starts)
    one = out["rows"] == 1
    out["src_stride"] = np.where(one, out["nbytes"], out["src_stride"])
    out["dst_stride"] = np.where(one, out["nbytes"], out["dst_stride"])
    return out


def _records(cols: dict[str, np.ndarray]) -> np.ndarray:
    out = np.empty(len(cols["src"]), dtype=RUN_DTYPE)
    for k in RUN_DTYPE.names:
        out[k] = cols[k]
    return out


def apply_runs(runs: np.ndarray, ends: dict[int, np.ndarray]) -> None:
    """Reference executor over byte arrays (``ends[id]`` is a uint8 array, ``ends[BUFFER]`` the buffer)."""
    for r in runs:
        n = int(r["nbytes"])
        for i in range(int(r["rows"])):
            s, d = int(r["src_off"] + i * r["src_stride"]), int(r["dst_off"] + i * r["dst_stride"])
            ends[int(r["dst"])][d: d + n] = ends[int(r["src"])][s: s + n]
