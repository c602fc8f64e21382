"""Run a sync plan over torch.distributed: bounded buckets, batched async send/recv, verification.

Every process (trainer or inference rank) builds a :class:`PlanExecutor` from the same plan and
calls :meth:`PlanExecutor.sync`. Stage 1 then stage 2; inside a stage, bucket ``k`` of every pair
travels in round ``k`` (all sends and receives of a round posted as one batch, then waited with a
deadline), so a rank holds one send and one receive bucket per peer at a time. Chunks between two
tensors of one rank are plain copies. Works with gloo (CPU tensors) and NCCL (CUDA tensors).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from planners.buckets import Bucket, bucketize
from planners.plan import SyncPlan
from sync.endpoints import check_locals
from sync.tensors import TORCH_DTYPES, block
from sync.verify import Verifier

__all__ = ["PlanExecutor", "SyncError", "SyncTimeout", "VerificationError", "SyncStats", "wait_all"]


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


class PlanExecutor:
    def __init__(self, plan: SyncPlan, rank: int, group: dist.ProcessGroup | None = None,
                 bucket_bytes: int = 256 << 20, timeout_s: float = 120.0) -> None:
        self.plan, self.rank, self.group = plan, rank, group
        self.timeout_s = timeout_s
        self.buckets = bucketize(plan, bucket_bytes, rank)
        self.is_trainer = rank < plan.num_trainer
        self._chunks = plan.chunks
        self.verifier = Verifier(plan, rank)

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
            buf[off: off + src.numel() * src.element_size()].view(dt).view(src.shape).copy_(src)
        return buf

    def _unpack(self, flats, b: Bucket, buf: torch.Tensor) -> None:
        for row, lo, hi, off in zip(b.chunk.tolist(), b.lo.tolist(), b.hi.tolist(), b.offset.tolist()):
            dst = self._view(flats, "dst", row, lo, hi)
            dst.copy_(buf[off: off + dst.numel() * dst.element_size()].view(dst.dtype).view(dst.shape))

    def _copy(self, flats, b: Bucket) -> None:
        for row, lo, hi in zip(b.chunk.tolist(), b.lo.tolist(), b.hi.tolist()):
            self._view(flats, "dst", row, lo, hi).copy_(self._view(flats, "src", row, lo, hi))

    # -- the sync -----------------------------------------------------------------------
    def sync(self, source=None, target=None, verify: bool = True) -> SyncStats:
        """Move this rank's part of the plan; with ``verify``, check every engine tensor's checksum."""
        stats = SyncStats(self.rank)
        flats = self._views(source, target)
        device = next(iter(flats.values())).device if flats else torch.device("cpu")
        t_start = time.perf_counter()
        for stage in (1, 2):
            t0 = time.perf_counter()
            rounds: dict[int, list[Bucket]] = {}
            for b in self.buckets:
                if b.stage == stage:
                    rounds.setdefault(b.index, []).append(b)
            for k in sorted(rounds):
                self._round(flats, stage, k, rounds[k], device, stats)
            stats.stage_seconds[stage] = time.perf_counter() - t0
        stats.seconds = time.perf_counter() - t_start
        if verify:
            stats.mismatched, total = self.verifier.check(flats, self.group, self._wait)
            stats.verified = total == 0
        elapsed = torch.tensor([stats.seconds], dtype=torch.float64, device=device)
        self._wait(dist.all_reduce(elapsed, op=dist.ReduceOp.MAX, group=self.group, async_op=True), "gathering sync times")
        stats.global_seconds = float(elapsed.item())
        if target is not None and self.plan.placement is not None and hasattr(target, "set_placement"):
            target.set_placement(self.plan.placement)
        return stats

    def _round(self, flats, stage: int, k: int, buckets: list[Bucket], device, stats: SyncStats) -> None:
        ops, labels, recvs = [], [], []
        for b in buckets:
            if b.src == b.dst:
                self._copy(flats, b)
                stats.bytes_copied += b.nbytes
            elif b.src == self.rank:
                buf = self._pack(flats, b, device)
                ops.append(dist.P2POp(dist.isend, buf, b.dst, self.group))
                labels.append(f"stage {stage}: sending bucket {k} to rank {b.dst}")
                stats.bytes_sent += b.nbytes
            else:
                buf = torch.empty(b.nbytes, dtype=torch.uint8, device=device)
                ops.append(dist.P2POp(dist.irecv, buf, b.src, self.group))
                labels.append(f"stage {stage}: receiving bucket {k} from rank {b.src}")
                recvs.append((b, buf))
                stats.bytes_received += b.nbytes
        if ops:
            try:
                works = dist.batch_isend_irecv(ops)
            except RuntimeError as e:
                raise SyncError(f"{labels[0]}: {e}") from e
            wait_all(works, labels, self.timeout_s)
        for b, buf in recvs:
            self._unpack(flats, b, buf)

    def _wait(self, work, label: str) -> None:
        wait_all([work], [label], self.timeout_s)

