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
the engine target gets the new maps with the weights -- only once they are verified. ``expert_load``
is ``[moe_layers, experts]`` (one placement for every engine) or ``[engines, moe_layers, experts]``
(each engine balanced by its own traffic).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import torch

from planners import JobSpec, SyncPlan
from planners.build import PlanBuilder
from sync.channels.base import wait_all
from sync.session import Session
from sync.transport import Transport, standalone_transport

__all__ = ["Synchronizer", "SyncReport"]


@dataclass
class SyncReport:
    version: int
    seconds: float  # slowest rank
    stage_seconds: dict[int, float]
    bytes: int  # the whole plan's payload
    gbps: float
    verified: bool | None
    placement: Any  # the expert placement the engines serve from now on (None for dense models)
    balancedness: float | None = None  # of that placement under ``expert_load`` (mean/max GPU load, as vLLM
    # logs it; of the worst-balanced engine where engines have their own loads)
    engine: Any = None  # engine ranks: the EngineState (serving, complete, written, error)
    staging_bytes: int = 0  # engine ranks: memory the staged copy costs (0 in place)
    whole_plan: Callable[[], SyncPlan] | None = field(default=None, repr=False)  # the job's plan, built when asked

    @cached_property
    def bound_seconds(self) -> float:
        """The whole plan's lower bound with the job's link bandwidths. Each rank syncs by its own part of
        the plan; the bound needs the whole one, so it is built here, once, on the ranks that ask."""
        return self.whole_plan().lower_bound()


class Synchronizer:
    def __init__(self, job: JobSpec, rank: int, transport: Transport, source=None, target=None) -> None:
        self.job, self.rank = job, rank
        self._prepared_load = None  # the load the next sync was prepared for (prepare)
        self._payload_of: tuple[SyncPlan | None, int] = (None, 0)  # (plan, its whole payload)
        # what no expert placement touches is planned once; a new load replans the expert slots only, and
        # each rank only its own part of them (the chunks it sends, receives or feeds)
        self.builder = PlanBuilder.for_job(job)
        # at start-up, not at the first sync: a model built for another layout is named right away
        self.session = Session.open(self.builder.rank_plan(job.placement(None), [rank]), rank, transport, source,
                                    target, job.sync)

    @classmethod
    def from_job(cls, job: JobSpec, rank: int, source=None, target=None, host: str = "127.0.0.1",
                 port: int = 29555, backend: str = "gloo", store_on_rank0: bool = True) -> "Synchronizer":
        """Join the sync group (rank 0 hosts its store at host:port unless the launcher does) and plan the job."""
        world = job.trainer.world_size + job.inference.world_size
        transport = standalone_transport(rank, world, host, port, job.sync.timeout_s, backend, store_on_rank0)
        return cls(job, rank, transport, source, target)

    @property
    def plan(self) -> SyncPlan:
        return self.session.plan

    @property
    def source(self):
        return self.session.source

    @source.setter
    def source(self, source) -> None:
        self.session.set_ends(source=source)

    @property
    def target(self):
        """An engine's parameters, kept as a versioned target (see ``sync.ends.versioned``)."""
        return self.session.target

    @target.setter
    def target(self, target) -> None:
        self.session.set_ends(target=target)

    def prepare(self, expert_load) -> None:
        """Plan and bind the next sync for the placement ``expert_load`` gives, now, without moving a byte:
        call it as soon as the engines' loads are in (after the rollout), while the trainer steps, then
        ``sync(version)``: the replan and the rebind are off the refresh's critical path. Every rank calls it
        with the same load."""
        if self.job.eplb.enabled:
            self.session.prepare(self.builder.rank_plan(self.job.placement(expert_load), [self.rank]))
        self._prepared_load = expert_load

    def sync(self, version: int, expert_load=None) -> SyncReport:
        """Sync ``version``; a failed sync raises (``SyncError``), after the engine state says so. A new
        ``expert_load`` replans first (unless :meth:`prepare` was given it already)."""
        prepared, self._prepared_load = self._prepared_load, None
        if expert_load is not None and expert_load is not prepared and self.job.eplb.enabled:
            self.session.replan(self.builder.rank_plan(self.job.placement(expert_load), [self.rank]))
        expert_load = prepared if expert_load is None else expert_load
        stats = self.session.sync(version)
        plan, target = self.plan, self.target
        moved = self._payload(plan)
        balance = None
        if expert_load is not None and plan.placement is not None:
            balance = self.job.balancedness(expert_load, plan.placement)
        placement = plan.placement
        return SyncReport(version, stats.global_seconds, stats.stage_seconds, moved,
                          moved / max(stats.global_seconds, 1e-12) / 1e9, stats.verified, placement, balance,
                          target.state if target else None, target.staging_bytes if target else 0,
                          whole_plan=lambda: self.builder.plan(placement))

    def _payload(self, plan: SyncPlan) -> int:
        """The whole plan's payload: every rank adds what it sends (each chunk has one sender). Once per
        plan: every rank gets a new plan at the same call, so all of them sum again together."""
        if self._payload_of[0] is not plan:
            transport = self.session.transport
            sent = torch.tensor([int(plan.chunks["nbytes"][plan.chunks["src"] == self.rank].sum())],
                                device=transport.collective_device)
            wait_all([transport.all_reduce(sent)], ["adding up the payload"], self.job.sync.timeout_s)
            self._payload_of = (plan, int(sent.item()))
        return self._payload_of[1]
