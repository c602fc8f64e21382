"""Run a sync plan over torch.distributed: bounded buckets, batched async send/recv, verification.

Every process (trainer or inference rank) builds a :class:`PlanExecutor` from the same plan and
calls :meth:`PlanExecutor.sync`. Stage 1 then stage 2; inside a stage, bucket ``k`` of every pair
travels in round ``k`` (all sends and receives of a round posted as one batch, then waited with a
deadline); round k+1 is packed while round k is on the wire, so a rank holds at most two rounds of
buckets per peer. Large contiguous chunks go straight from and into the tensors (no bucket copy).
Chunks between two tensors of one rank are plain copies. Works with gloo (CPU tensors) and NCCL (CUDA tensors).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from planners.buckets import Bucket, bucketize
from planners.plan import SyncPlan
from sync.endpoints import check_locals
from sync.tensors import TORCH_DTYPES, block
from sync.transport import Transport
from sync.verify import Verifier

__all__ = ["PlanExecutor", "SyncError", "SyncTimeout", "VerificationError", "SyncStats", "wait_all", "finish_sync", "versioned_sync"]


class SyncError(RuntimeError):
    """A sync that did not complete; the message names stage, peer and bucket."""


class SyncTimeout(SyncError):
    pass


class VerificationError(SyncError):
    pass


@dataclass
class SyncStats:
    rank: int
    seconds: float = 0.0  # this rank, both stages
    stage_seconds: dict[int, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0
    sent_to: dict[int, int] = field(default_factory=dict)  # tensor bytes this rank sent to each peer
    peak_buffer_bytes: int = 0  # most bucket memory held at once (two rounds in flight at most)
    pack_seconds: float = 0.0  # copying into send buckets and local copies
    wait_seconds: float = 0.0  # waiting for the network
    unpack_seconds: float = 0.0  # copying out of receive buckets
    verified: bool | None = None
    mismatched: list[str] = field(default_factory=list)
    global_seconds: float = 0.0  # slowest rank


def wait_all(works: list, what: list[str], timeout_s: float) -> None:
    """Wait for every work item; a timeout or peer failure becomes a SyncError naming ``what[i]``."""
    deadline = time.monotonic() + timeout_s
    for work, label in zip(works, what):
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            ok = work.wait(timeout=timedelta(seconds=remaining))
        except RuntimeError as e:
            kind = SyncTimeout if "imeout" in str(e) or "imed out" in str(e) else SyncError
            raise kind(f"{label}: {'no answer within ' + f'{timeout_s:g} s' if kind is SyncTimeout else e}") from e
        if ok is False:
            raise SyncTimeout(f"{label}: no answer within {timeout_s:g} s")


def finish_sync(stats: SyncStats, flats, verifier: Verifier | None, transport: Transport, wait, device) -> None:
    """After the bytes moved: verify (when asked) and learn the slowest rank's time, on every rank."""
    if verifier is not None:
        stats.mismatched, total = verifier.check(flats, transport, wait)
        stats.verified = total == 0
    elapsed = torch.tensor([stats.seconds], dtype=torch.float64, device=device)
    wait(transport.all_reduce(elapsed, dist.ReduceOp.MAX), "gathering sync times")
    stats.global_seconds = float(elapsed.item())


def versioned_sync(target, version: int, body, written) -> SyncStats:
    """Run ``body()`` (a sync); a versioned target (``begin``/``commit``/``abort``) learns how it ended:
    committed when verified (or unverified by choice), aborted -- naming ``written()`` -- otherwise."""
    versioned = target is not None and hasattr(target, "begin")
    if versioned:
        target.begin(version)
    try:
        stats = body()
    except BaseException as e:
        if versioned:
            target.abort(str(e), written())
        raise
    if versioned:
        if stats.verified is False:
            target.abort(f"verification failed: {stats.mismatched[:5]}", stats.mismatched)
        else:
            target.commit(version)
    return stats


class PlanExecutor:
    def __init__(self, plan: SyncPlan, rank: int, transport: Transport | None = None,
                 bucket_bytes: int = 256 << 20, timeout_s: float = 120.0, direct_bytes: int = 1 << 18) -> None:
        """``direct_bytes``: contiguous chunks at least this large skip the bucket copy."""
        self.plan, self.rank = plan, rank
        self.transport = transport or Transport()
        self.timeout_s = timeout_s
        self.buckets = bucketize(plan, bucket_bytes, rank, direct_bytes)
        self.is_trainer = rank < plan.num_trainer
        self._chunks = plan.chunks
        self.verifier = Verifier(plan, rank)
        self._written: set[int] = set()
        self._direct_dst: set[int] = set()
        self.corrupt_stage: int | None = None  # fault injection: flip a byte of the first bucket sent in this stage
        self.exit_at_stage: int | None = None  # fault injection: the process exits when this stage starts

    # -- tensors ----------------------------------------------------------------------
    def _views(self, source, target) -> dict[int, torch.Tensor]:
        """Flat views of this rank's local tensors, by plan local id."""
        plan = self.plan
        ids = plan.locals_of(self.rank)
        tensors = check_locals(plan, self.rank, (source if self.is_trainer else target).local_tensors(),
                               "source" if self.is_trainer else "target")
        return {int(i): t.view(-1) for i, t in zip(ids, tensors)}

    def _view(self, flats, side: str, row: int, lo: int, hi: int) -> torch.Tensor:
        c = self._chunks[row]
        t = self.plan.tensors[c["tensor"]]
        off = int(c[f"{side}_off"]) + lo - int(c["lo"])
        return block(flats[int(c[f"{side}_local"])], int(c[f"{side}_base"]), t.outer, int(c[f"{side}_dim"]), t.inner,
                     off, hi - lo)

    def _pack(self, flats, b: Bucket, device) -> torch.Tensor:
        buf = torch.empty(b.nbytes, dtype=torch.uint8, device=device)
        for row, lo, hi, off in zip(b.chunk.tolist(), b.lo.tolist(), b.hi.tolist(), b.offset.tolist()):
            src = self._view(flats, "src", row, lo, hi)
            dt = TORCH_DTYPES[self.plan.tensors[self._chunks["tensor"][row]].dtype]
            buf[off: off + src.numel() * dt.itemsize].view(dt).view(src.shape).copy_(src)  # casts a wider source
        return buf

    def _unpack(self, flats, b: Bucket, buf: torch.Tensor) -> None:
        self._written.update(int(self._chunks["dst_local"][r]) for r in b.chunk.tolist())
        for row, lo, hi, off in zip(b.chunk.tolist(), b.lo.tolist(), b.hi.tolist(), b.offset.tolist()):
            dst = self._view(flats, "dst", row, lo, hi)
            dst.copy_(buf[off: off + dst.numel() * dst.element_size()].view(dst.dtype).view(dst.shape))

    def _copy(self, flats, b: Bucket) -> None:
        self._written.update(int(self._chunks["dst_local"][r]) for r in b.chunk.tolist())
        for row, lo, hi in zip(b.chunk.tolist(), b.lo.tolist(), b.hi.tolist()):
            self._view(flats, "dst", row, lo, hi).copy_(self._view(flats, "src", row, lo, hi))

    # -- the sync -----------------------------------------------------------------------
    def sync(self, source=None, target=None, verify: bool = True, version: int = 0) -> SyncStats:
        """Move this rank's part of the plan; with ``verify``, check every engine tensor's checksum.

        A versioned target (``begin``/``commit``/``abort``) is told how the sync ended: committed only
        when verified (or when verification is off), aborted -- naming what was written -- otherwise."""
        written: set[int] = set()
        return versioned_sync(target, version, lambda: self._sync(source, target, verify, written),
                              lambda: sorted(self.plan.local_name[i] for i in written))

    def _sync(self, source, target, verify: bool, written: set[int]) -> SyncStats:
        stats = SyncStats(self.rank)
        self._written = written
        flats = self._views(source, target)
        device = next(iter(flats.values())).device if flats else torch.device("cpu")
        t_start = time.perf_counter()
        for stage in (1, 2):
            t0 = time.perf_counter()
            self._run_stage(flats, stage, device, stats)
            stats.stage_seconds[stage] = time.perf_counter() - t0
        stats.seconds = time.perf_counter() - t_start
        finish_sync(stats, flats, self.verifier if verify else None, self.transport, self._wait, device)
        if target is not None and self.plan.placement is not None and hasattr(target, "set_placement"):
            target.set_placement(self.plan.placement)
        return stats

    def _run_stage(self, flats, stage: int, device, stats: SyncStats) -> None:
        """Rounds in order; round k+1 is packed while round k is on the wire (two rounds of buffers)."""
        if self.exit_at_stage == stage:  # fault injection: this rank dies here
            os._exit(17)
        rounds: dict[int, list[Bucket]] = {}
        for b in self.buckets:
            if b.stage == stage:
                rounds.setdefault(b.index, []).append(b)
        in_flight, held = None, 0
        for k in sorted(rounds):
            t0 = time.perf_counter()
            ops, labels, recvs = self._prepare(flats, stage, k, rounds[k], device, stats)
            stats.pack_seconds += time.perf_counter() - t0
            buffered = sum(b.nbytes for b in rounds[k] if not b.direct and b.src != b.dst)
            stats.peak_buffer_bytes = max(stats.peak_buffer_bytes, held + buffered)
            if in_flight is not None:
                self._finish(flats, *in_flight, stats)
            in_flight, held = (self._post(ops, labels), labels, recvs), buffered
        if in_flight is not None:
            self._finish(flats, *in_flight, stats)

    def _prepare(self, flats, stage: int, k: int, buckets: list[Bucket], device, stats: SyncStats):
        """Pack the send buckets and allocate the receive buckets of round ``k``; local copies now."""
        ops, labels, recvs = [], [], []
        for b in buckets:
            if b.src == b.dst:
                self._copy(flats, b)
                stats.bytes_copied += b.nbytes
                continue
            sending = b.src == self.rank
            peer = b.dst if sending else b.src
            if b.direct and not sending:
                self._direct_dst.add(int(self._chunks["dst_local"][int(b.chunk[0])]))
            if b.direct:  # one contiguous chunk: straight from the source / into the destination
                buf = self._view(flats, "src" if sending else "dst", int(b.chunk[0]), int(b.lo[0]), int(b.hi[0]))
                wire = TORCH_DTYPES[self.plan.tensors[self._chunks["tensor"][int(b.chunk[0])]].dtype]
                buf = buf.reshape(-1).to(wire).view(torch.uint8)  # .to() casts only a wider source
            elif sending:
                buf = self._pack(flats, b, device)
                if self.corrupt_stage == stage:  # fault injection (tests, chaos runs)
                    buf[0] ^= 0xFF
                    self.corrupt_stage = None
            else:
                buf = torch.empty(b.nbytes, dtype=torch.uint8, device=device)
                recvs.append((b, buf))
            ops.append((sending, buf, peer))
            labels.append(f"stage {stage}: {'sending' if sending else 'receiving'} bucket {k} "
                          f"{'to' if sending else 'from'} rank {peer}")
            if sending:
                stats.bytes_sent += b.nbytes
                stats.sent_to[peer] = stats.sent_to.get(peer, 0) + b.payload
            else:
                stats.bytes_received += b.nbytes
        return ops, labels, recvs

    def _post(self, ops, labels) -> list:
        if not ops:
            return []
        try:
            return self.transport.batch(ops)
        except RuntimeError as e:
            raise SyncError(f"{labels[0]}: {e}") from e

    def _finish(self, flats, works, labels, recvs, stats: SyncStats) -> None:
        t0 = time.perf_counter()
        self._written.update(self._direct_dst)
        self._direct_dst = set()
        wait_all(works, labels, self.timeout_s)
        t1 = time.perf_counter()
        for b, buf in recvs:
            self._unpack(flats, b, buf)
        stats.wait_seconds += t1 - t0
        stats.unpack_seconds += time.perf_counter() - t1

    def _wait(self, work, label: str) -> None:
        wait_all([work], [label], self.timeout_s)

