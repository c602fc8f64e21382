"""The API a training loop calls once per RLHF iteration, on every trainer and engine rank.

    sync = Synchronizer.from_job(job, rank, source=MegatronSource(model), host=head, port=29555)
    for step in range(steps):
        train_step(model)
        report = sync.sync(version=step, expert_load=load)   # same expert_load on every rank
        assert report.verified

Engine ranks pass ``target=`` (their parameters) instead of ``source=``; the synchronizer wraps it
as a versioned target (``sync.staging`` in the job: receive into a copy, swap after verification), so
``report.engine`` says which version the engine serves and whether it is complete. With EPLB enabled,
a new ``expert_load`` recomputes the placement and the plan (every rank computes the same one) and
the engine target gets the new maps with the weights -- only once they are verified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planners import JobSpec, SyncPlan, build_plan
from planners.eplb import balance_report
from sync.endpoints import check_locals
from sync.executor import PlanExecutor
from sync.transport import Transport, standalone_transport
from sync.versioned import VersionedTarget

__all__ = ["Synchronizer", "SyncReport"]


@dataclass
class SyncReport:
    version: int
    seconds: float  # slowest rank
    stage_seconds: dict[int, float]
    bytes: int  # the whole plan's payload
    gbps: float
    bound_seconds: float  # the plan's lower bound with the job's link bandwidths
    verified: bool | None
    placement: Any  # the expert placement the engines serve from now on (None for dense models)
    balancedness: float | None = None  # of that placement under ``expert_load`` (mean/max GPU load, as vLLM logs it)
    engine: Any = None  # engine ranks: the EngineState (serving, complete, written, error)
    staging_bytes: int = 0  # engine ranks: memory the staged copy costs (0 in place)


class Synchronizer:
    def __init__(self, job: JobSpec, rank: int, transport: Transport, source=None, target=None) -> None:
        self.job, self.rank, self.transport = job, rank, transport
        self.source, self.target = source, target
        self.plan: SyncPlan = build_plan(job)
        # at start-up, not at the first sync: a model built for another layout is named right away
        for end, side in ((source, "source"), (self.target, "target")):
            if end is not None:
                check_locals(self.plan, rank, end.local_tensors(), side)
        self._executor()

    @property
    def target(self):
        return self._target

    @target.setter
    def target(self, target) -> None:
        """An engine's parameters, kept as a versioned target (see ``sync.versioned``)."""
        if target is not None and not hasattr(target, "begin"):
            target = VersionedTarget.for_job(target, self.job.sync)
        self._target = target

    @classmethod
    def from_job(cls, job: JobSpec, rank: int, source=None, target=None, host: str = "127.0.0.1",
                 port: int = 29555, backend: str = "gloo", store_on_rank0: bool = True) -> "Synchronizer":
        """Join the sync group (rank 0 hosts its store at host:port unless the launcher does) and plan the job."""
        world = job.trainer.world_size + job.inference.world_size
        transport = standalone_transport(rank, world, host, port, job.sync.timeout_s, backend, store_on_rank0)
        return cls(job, rank, transport, source, target)

    def _executor(self) -> None:
        self.executor = PlanExecutor(self.plan, self.rank, self.transport, int(self.job.sync.bucket_mb * (1 << 20)),
                                     self.job.sync.timeout_s)

    def sync(self, version: int, expert_load=None) -> SyncReport:
        """Sync ``version``; a failed sync raises (``SyncError``), after the engine state says so."""
        if expert_load is not None and self.job.eplb.enabled:
            self.plan = build_plan(self.job, expert_load)
            self._executor()
        stats = self.executor.sync(self.source, self.target, verify=bool(self.job.sync.verify), version=version)
        moved = int(self.plan.chunks["nbytes"].sum())
        balance = None
        if expert_load is not None and self.plan.placement is not None:
            _, nodes, gpus = self.job.eplb_shape()
            balance = balance_report(expert_load, self.plan.placement, gpus, nodes).balancedness
        return SyncReport(version, stats.global_seconds, stats.stage_seconds, moved,
                          moved / max(stats.global_seconds, 1e-12) / 1e9, self.plan.lower_bound(), stats.verified,
                          self.plan.placement, balance, self.target.state if self.target else None,
                          self.target.staging_bytes if self.target else 0)
