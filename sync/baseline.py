"""The rank-0 broadcast baseline (how OpenRLHF and slime refresh engines), for comparison.

For every logical tensor in turn: trainer rank 0 gathers the full tensor from the ranks holding
its shards, broadcasts it to every inference rank, and each inference rank cuts out its slices.
Same sources, targets and verification as :class:`sync.executor.PlanExecutor`.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from planners.plan import SyncPlan
from sync.ends.base import check_locals
from sync.executor import SyncStats, finish_sync, versioned_sync
from sync.channels import wait_all
from sync.tensors import TORCH_DTYPES, block
from sync.transport import Transport
from sync.verify.verifier import Verifier

__all__ = ["BroadcastExecutor"]


class BroadcastExecutor:
    def __init__(self, plan: SyncPlan, rank: int, transport: Transport | None = None, timeout_s: float = 120.0) -> None:
        """Every rank of the sync group must construct it (it makes the broadcast subgroup)."""
        plan.whole("the broadcast baseline")  # rank 0 gathers every tensor from every holder
        if plan.derived.size:
            raise ValueError("the broadcast baseline moves full-precision tensors; an FP8 plan (inference.quantization) "
                             "runs on the PlanExecutor")
        self.plan, self.rank = plan, rank
        self.transport = transport or Transport()
        self.bcast = self.transport.subgroup([0, *plan.inference_ranks])
        self.timeout_s = timeout_s
        T = plan.num_trainer
        rank_of = plan.local_rank[plan.pieces["local"]]
        self.is_trainer = rank < T
        self.trainer_pieces = plan.pieces[rank_of < T]
        self.trainer_rank = rank_of[rank_of < T]
        self.my_pieces = plan.pieces[rank_of == rank]
        self.verifier = Verifier(plan, rank)

    def _wait(self, work, label: str) -> None:
        wait_all([work], [label], self.timeout_s)

    def sync(self, source=None, target=None, verify: bool = True, version: int = 0, strict: bool = False) -> SyncStats:
        written = [] if self.is_trainer else [self.plan.local_name[i] for i in self.plan.locals_of(self.rank)]
        return versioned_sync(target, version, lambda: self._sync(source, target, verify), lambda: written,
                              strict and verify)

    def _sync(self, source, target, verify: bool) -> SyncStats:
        plan, rank = self.plan, self.rank
        stats = SyncStats(rank)
        ids = plan.locals_of(rank)
        tensors = check_locals(plan, rank, (source if self.is_trainer else target).local_tensors(),
                               "source" if self.is_trainer else "target")
        flats = {int(i): t.view(-1) for i, t in zip(ids, tensors)}
        device = next(iter(flats.values())).device if flats else torch.device("cpu")
        t0 = time.perf_counter()
        for tid, t in enumerate(plan.tensors):
            in_bgroup = rank == 0 or not self.is_trainer
            full = torch.empty(t.numel, dtype=TORCH_DTYPES[t.dtype], device=device) if in_bgroup else None
            self._gather(tid, t, flats, full, device, stats)
            if in_bgroup:
                self._wait(self.bcast.broadcast(full.view(-1).view(torch.uint8), 0), f"broadcast of {t.name} from rank 0")
                if rank == 0:
                    stats.bytes_sent += full.numel() * full.element_size() * len(plan.inference_ranks)
                else:
                    stats.bytes_received += full.numel() * full.element_size()
            if not self.is_trainer:
                for p in self.my_pieces[self.my_pieces["tensor"] == tid]:
                    n = int(p["hi"] - p["lo"])
                    block(flats[int(p["local"])], int(p["base"]), t.outer, int(p["dim"]), t.inner, int(p["off"]), n).copy_(
                        block(full, 0, t.outer, t.shape[t.split_dim], t.inner, int(p["lo"]), n))
        stats.seconds = time.perf_counter() - t0
        stats.stage_seconds = {1: stats.seconds}
        finish_sync(stats, flats, self.verifier if verify else None, self.transport, self._wait, device,
                    {self.rank: target}, plan)
        return stats

    def _gather(self, tid, t, flats, full, device, stats) -> None:
        """Rank 0 assembles tensor ``tid`` from one holder of each of its trainer pieces."""
        p = self.trainer_pieces
        sel = np.flatnonzero(p["tensor"] == tid)
        covered = 0
        for i in sel[np.argsort(self.trainer_rank[sel], kind="stable")]:  # lowest holder rank first
            piece, holder = p[i], int(self.trainer_rank[i])
            lo, hi = int(piece["lo"]), int(piece["hi"])
            if lo < covered:
                continue  # another holder already gave these indices
            covered = hi
            if holder != self.rank and self.rank != 0:
                continue
            n = hi - lo
            if holder == self.rank:
                src = block(flats[int(piece["local"])], int(piece["base"]), t.outer, int(piece["dim"]), t.inner,
                            int(piece["off"]), n)
                if self.rank == 0:
                    block(full, 0, t.outer, t.shape[t.split_dim], t.inner, lo, n).copy_(src)
                    continue
                buf = src.to(full.dtype if full is not None else TORCH_DTYPES[t.dtype]).contiguous()
                wait_all(self.transport.batch([(True, buf, 0)]), [f"sending {t.name}[{lo}:{hi}] to rank 0"], self.timeout_s)
                stats.bytes_sent += buf.numel() * buf.element_size()
            else:  # rank 0 receives from the holder
                buf = torch.empty((t.outer, n, t.inner), dtype=full.dtype, device=device)
                wait_all(self.transport.batch([(False, buf, holder)]), [f"receiving {t.name}[{lo}:{hi}] from rank {holder}"],
                         self.timeout_s)
                block(full, 0, t.outer, t.shape[t.split_dim], t.inner, lo, n).copy_(buf)
                stats.bytes_received += buf.numel() * buf.element_size()
