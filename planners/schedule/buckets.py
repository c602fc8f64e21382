"""How a plan's chunks travel: bounded flat buckets per (stage, src, dst) pair, and stage-2 origins.

Both ends of a pair derive the same buckets from the plan, so only payload crosses the wire. A
pair's chunks are packed back to back in plan order, each starting on a 16-byte boundary (so any
dtype can be viewed in place, with wide loads); a chunk larger than a bucket is split along its split dimension.
Bucket ``k`` of every pair of a stage travels in round ``k``.

``bucket_bytes`` is what one process may hold for a round, sending and receiving together: a pair's
round carries at most ``bucket_bytes / fan-out`` bytes, where the fan-out of a process is the number
of (peer process, direction) pairs it exchanges with in that stage, taking the larger of the pair's
two ends (both derive the same number). With two rounds in flight, a process never holds more than
``2 * bucket_bytes`` of buckets, however many peers it has.

A chunk of at least ``direct_bytes`` that is contiguous at both ends travels *direct*: as its own
message, straight from the source tensor into the destination tensor, with no bucket copy at all;
it still counts toward its round's ``bucket_bytes``. One contiguous only at its source (a TP shard
that lands as half of every row of a whole expert, say) travels *from its source*: its own message,
sent from the source tensor and received into the receiver's bucket space, which unpacks it (one copy
instead of two); one contiguous only at its destination (an engine's shard gathered from parts of the
trainer's rows) travels *to its destination*: packed by the sender alone, received into the tensor.
Either must fit its pair's share of a round.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from planners.plan import SyncPlan
from planners.validate import match_containing

__all__ = ["Bucket", "bucketize", "fanout", "pair_share", "stage2_origin", "chunk_origins", "ALIGN"]

ALIGN = 16  # bytes: any dtype views in place, and copy kernels use 16-byte vector loads


@dataclass(frozen=True)
class Bucket:
    stage: int
    src: int
    dst: int
    index: int  # round in which it travels
    chunk: np.ndarray  # [n] chunk row in plan.chunks
    lo: np.ndarray  # [n] sub-range of that chunk carried here
    hi: np.ndarray
    offset: np.ndarray  # [n] byte offset in the bucket
    nbytes: int  # bucket size in bytes (padded)
    direct: bool = False  # one contiguous chunk sent from and received into the tensors themselves
    from_source: bool = False  # one chunk sent from its (contiguous) source tensor, received into a bucket
    to_destination: bool = False  # one chunk packed into a bucket, received into its (contiguous) destination
    payload: int = 0  # bytes of tensor data (nbytes less alignment padding)


def bucketize(plan: SyncPlan, bucket_bytes: int, rank=None, direct_bytes: int = 1 << 18,
              skip: np.ndarray | None = None, process_of=None, fan: dict[int, np.ndarray] | None = None,
              rows: np.ndarray | None = None) -> list[Bucket]:
    """Buckets of every pair, in (stage, round, src, dst) order; or only those that cross the
    boundary of ``rank`` (one plan rank, or a list hosted by one process that copies the chunks
    among them locally). ``skip``: chunk rows that travel some other way (a boolean mask).
    ``process_of[r]``: the process hosting plan rank ``r`` (default: one process per rank).
    ``fan``: every process's :func:`fanout`, where the plan holds only some ranks' chunks
    (``plan.scope``) and so cannot count its peers'. ``rows``: the rows crossing ``rank``'s boundary,
    where the caller has them (ascending)."""
    if bucket_bytes < ALIGN:
        raise ValueError(f"bucket size must be at least {ALIGN} bytes, got {bucket_bytes}")
    c = plan.chunks
    process_of = np.arange(plan.num_ranks) if process_of is None else np.asarray(process_of)
    row_bytes = plan.table.row_bytes
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
    elif rank is None:
        rows = np.arange(len(c))
    else:
        hosted = np.isin(np.arange(plan.num_ranks), rank)
        rows = np.flatnonzero(hosted[c["src"]] != hosted[c["dst"]])
    if skip is not None:
        rows = rows[~skip[rows]]
    out: list[Bucket] = []
    if not len(rows):  # every chunk stays in this process (or travels another way): no buckets
        return out
    if fan is None:
        if plan.scope is not None:
            raise ValueError(f"a plan of ranks {list(plan.scope)} only cannot count its peers' fan-out: pass fan= "
                             "(every process's fanout(), e.g. gathered by sync.session)")
        fan = fanout(plan, process_of)
    start = 0
    while start < len(rows):
        first = c[rows[start]]
        end = start
        while end < len(rows) and (c["stage"][rows[end]], c["src"][rows[end]], c["dst"][rows[end]]) == (
                first["stage"], first["src"], first["dst"]):
            end += 1
        share = pair_share(fan, int(first["stage"]), process_of[first["src"]], process_of[first["dst"]], bucket_bytes)
        direct, from_source, to_destination = _direct(plan, rows[start:end], direct_bytes)
        fits = c["nbytes"][rows[start:end]] <= share
        out += _pair_buckets(c, rows[start:end], row_bytes, share, direct, from_source & fits, to_destination & fits)
        start = end
    out.sort(key=lambda b: (b.stage, b.index, b.src, b.dst))  # stable: a pair's messages keep their order
    return out


def pair_share(fanout: dict[int, np.ndarray], stage: int, src_process: int, dst_process: int, bucket_bytes: int) -> int:
    """Bytes a pair of processes may move per round: the budget over the larger fan-out of its ends."""
    share = bucket_bytes // max(int(fanout[stage][[src_process, dst_process]].max()), 1)
    return max(share // ALIGN * ALIGN, ALIGN)


def fanout(plan: SyncPlan, process_of: np.ndarray) -> dict[int, np.ndarray]:
    """Per stage, per process: how many (peer process, direction) pairs it exchanges chunks with."""
    c = plan.chunks
    src, dst = process_of[c["src"]], process_of[c["dst"]]
    out = {}
    for stage in (1, 2):
        m = (src != dst) & (c["stage"] == stage)
        n = int(process_of.max()) + 1
        pairs = np.unique(src[m].astype(np.int64) * n + dst[m])  # distinct (source, destination) processes
        out[stage] = np.bincount(pairs // n, minlength=n) + np.bincount(pairs % n, minlength=n)
    return out


def _direct(plan: SyncPlan, rows: np.ndarray, direct_bytes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which chunks are large and contiguous in both the source and the destination tensor, which large
    ones only in the source, and which only in the destination."""
    c = plan.chunks[rows]
    outer = plan.table.outer[c["tensor"]]
    n = c["hi"] - c["lo"]
    whole_rows = lambda side: (outer == 1) | ((c[f"{side}_off"] == 0) & (c[f"{side}_dim"] == n))  # noqa: E731
    large = (c["nbytes"] >= direct_bytes) & (c["src"] != c["dst"])
    source, destination = whole_rows("src"), whole_rows("dst")
    return large & source & destination, large & source & ~destination, large & ~source & destination


def _pair_buckets(c: np.ndarray, rows: np.ndarray, row_bytes: np.ndarray, bucket_bytes: int,
                  direct: np.ndarray, from_source: np.ndarray, to_destination: np.ndarray) -> list[Bucket]:
    """One pair's traffic in rounds of at most ``bucket_bytes``: each round one packed bucket plus
    any chunks travelling alone, direct, from their source or to their destination (sent in list
    order, which both ends share)."""
    buckets: list[Bucket] = []
    items: list[tuple[int, int, int, int]] = []  # packed (chunk, lo, hi, offset) of this round
    packed = 0  # bytes in this round's packed bucket
    payload = 0
    used = 0  # bytes in this round, packed and direct
    round_index = 0

    def close() -> None:
        nonlocal items, packed, used, round_index, payload
        if items:
            arr = np.array(items, dtype=np.int64)
            r0 = c[arr[0, 0]]
            buckets.append(Bucket(int(r0["stage"]), int(r0["src"]), int(r0["dst"]), round_index, arr[:, 0],
                                  arr[:, 1], arr[:, 2], arr[:, 3], packed, payload=payload))
        if used:
            round_index += 1
        items, packed, used, payload = [], 0, 0, 0

    for i, both, source, destination in zip(rows.tolist(), direct.tolist(), from_source.tolist(),
                                            to_destination.tolist()):
        rb = int(row_bytes[c["tensor"][i]])
        if both or source or destination:
            r0 = c[i]
            if used and used + int(r0["nbytes"]) > bucket_bytes:
                close()
            buckets.append(Bucket(int(r0["stage"]), int(r0["src"]), int(r0["dst"]), round_index, np.array([i]),
                                  np.array([r0["lo"]]), np.array([r0["hi"]]), np.zeros(1, dtype=np.int64),
                                  int(r0["nbytes"]), direct=both, from_source=source, to_destination=destination,
                                  payload=int(r0["nbytes"])))
            used += int(r0["nbytes"])
            if used >= bucket_bytes:
                close()
            continue
        lo, hi = int(c["lo"][i]), int(c["hi"][i])
        while lo < hi:
            fit = (bucket_bytes - used) // rb
            if fit == 0:
                if used == 0:
                    fit = 1  # one index is larger than a bucket: it travels alone
                else:
                    close()
                    continue
            take = min(hi - lo, fit)
            items.append((i, lo, lo + take, packed))
            size = -(-(take * rb) // ALIGN) * ALIGN
            packed += size
            payload += take * rb
            used += size
            lo += take
            if used >= bucket_bytes:
                close()
    close()
    return buckets


def stage2_origin(plan: SyncPlan) -> np.ndarray:
    """For each chunk, the stage-1 chunk that brought its bytes to its stage-2 source (-1 for stage 1)."""
    return chunk_origins(plan.chunks)


def chunk_origins(c: np.ndarray) -> np.ndarray:
    """:func:`stage2_origin` of a chunk table (-1 also where the stage-1 chunk is not in it)."""
    s1, s2 = np.flatnonzero(c["stage"] == 1), np.flatnonzero(c["stage"] == 2)
    out = np.full(len(c), -1, dtype=np.int64)
    if len(s2):
        key1 = np.stack([c["dst_local"][s1], c["tensor"][s1], c["dst_base"][s1]], axis=1).astype(np.int64)
        key2 = np.stack([c["src_local"][s2], c["tensor"][s2], c["src_base"][s2]], axis=1).astype(np.int64)
        hit = match_containing(key1, c["lo"][s1], key2, c["lo"][s2])
        out[s2] = np.where(hit >= 0, s1[np.maximum(hit, 0)], -1)
    return out
