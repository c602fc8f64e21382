"""The API a training loop calls once per RLHF iteration, on every trainer and engine rank.

    sync = Synchronizer.from_job(job, rank, source=MegatronSource(model), host=head, port=29555)
    for step in range(steps):
        train_step(model)
        report = sync.sync(version=step, expert_load=load)   # same expert_load on every rank
        assert report.verified

Engine ranks pass ``target=`` (their parameters) instead of ``source=``. With EPLB enabled, a new
``expert_load`` recomputes the placement and the plan (every rank computes the same one) and the
engine target gets the new maps with the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from planners import JobSpec, SyncPlan, build_plan
from sync.executor import PlanExecutor
from sync.transport import Transport, standalone_transport

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


class Synchronizer:
    def __init__(self, job: JobSpec, rank: int, transport: Transport, source=None, target=None) -> None:
        self.job, self.rank, self.transport = job, rank, transport
        self.source, self.target = source, target
        self.plan: SyncPlan = build_plan(job)
        self._executor()

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
        if expert_load is not None and self.job.eplb.enabled:
            self.plan = build_plan(self.job, expert_load)
            self._executor()
        stats = self.executor.sync(self.source, self.target, verify=self.job.sync.verify)
        moved = int(self.plan.chunks["nbytes"].sum())
        return SyncReport(version, stats.global_seconds, stats.stage_seconds, moved,
                          moved / max(stats.global_seconds, 1e-12) / 1e9, self.plan.lower_bound(), stats.verified,
                          self.plan.placement)
