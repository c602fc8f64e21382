"""One place that turns (plan, rank, role, tensors) into a rank ready to sync.

A :class:`Session` is the transport, the executor and the (versioned) engine target of the plan ranks
one process hosts. Everything a sync needs to agree on across ranks -- bucket size, timeout,
verification, staging -- comes from the job's ``sync`` settings, which every plan built from a job
carries (``plan.meta["sync"]``): a trainer rank and an engine rank that open sessions on the same plan
derive the same buckets and rounds, whoever built them. The training-loop API, ``rlsync run``, the
local launcher, the soak, the benchmarks and the vLLM extension all open their ranks here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from planners import SyncPlan, SyncSettings
from planners.errors import PlanError
from planners.schedule.buckets import fanout
from sync.channels.base import wait_all
from sync.ends.base import check_locals
from sync.executor import PlanExecutor, SyncStats
from sync.transport import Transport, standalone_transport
from sync.ends.versioned import VersionedTarget

__all__ = ["Session", "settings_of", "versioned"]


def settings_of(plan: SyncPlan) -> SyncSettings:
    """The job's sync settings a plan carries; a plan built without a job carries none."""
    raw = plan.meta.get("sync")
    if raw is None:
        raise PlanError("the plan carries no sync settings (plan.meta['sync']): build it with planners.build_plan(job), "
                        "or pass settings= to the session")
    return SyncSettings(**raw)


def versioned(target, settings: SyncSettings):
    """An engine target as a versioned one (``sync.staging``: receive into a copy, swap after verification)."""
    if target is None or hasattr(target, "begin"):
        return target
    return VersionedTarget.for_job(target, settings)


@dataclass
class Session:
    """The plan ranks one process hosts, ready to sync. ``sources``/``targets``: by plan rank."""

    plan: SyncPlan
    ranks: list[int]
    transport: Transport
    settings: SyncSettings
    sources: dict[int, Any] = field(default_factory=dict)
    targets: dict[int, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)  # executor options (process_of, ipc, copies, ...)
    executor: PlanExecutor = field(init=False)

    def __post_init__(self) -> None:
        self.targets = {r: versioned(t, self.settings) for r, t in self.targets.items()}
        self.check_ends()
        self.executor = self._executor(self.plan)

    @classmethod
    def open(cls, plan: SyncPlan, ranks, transport: Transport, source=None, target=None,
             settings: SyncSettings | None = None, **options: Any) -> "Session":
        """A session for plan rank ``ranks`` (or a list hosted by this process). ``source``/``target``: the
        rank's end, or ``{plan rank: end}``. ``settings``: the job's sync settings, by default those the
        plan carries. ``options``: ``PlanExecutor``'s (``process_of``, ``ipc``, ``copies``, ``recheck``,
        ``direct_bytes``, ``tile_bytes``, ``moving_tile_bytes``)."""
        hosted = [int(ranks)] if isinstance(ranks, int) else sorted(int(r) for r in ranks)
        return cls(plan, hosted, transport, settings or settings_of(plan), _by_rank(source, hosted),
                   _by_rank(target, hosted), options)

    @classmethod
    def join(cls, plan: SyncPlan, rank: int, host: str, port: int, backend: str = "gloo", store_on_rank0: bool = True,
             source=None, target=None, settings: SyncSettings | None = None, **options: Any) -> "Session":
        """Join the sync's standalone group through the TCP store at ``host:port`` (plan rank = group rank)."""
        settings = settings or settings_of(plan)
        transport = standalone_transport(rank, plan.num_ranks, host, port, settings.timeout_s, backend, store_on_rank0)
        return cls.open(plan, rank, transport, source, target, settings, **options)

    # -- what a rank does ---------------------------------------------------------------------
    @property
    def source(self):
        """The source of the one hosted rank (None on an engine rank)."""
        return self.sources.get(self.ranks[0])

    @property
    def target(self):
        """The versioned target of the one hosted rank (None on a trainer rank)."""
        return self.targets.get(self.ranks[0])

    def sync(self, version: int = 0, verify: bool | None = None, strict: bool = False) -> SyncStats:
        """Move this process's part of the plan (``verify``: the job's ``sync.verify`` by default)."""
        verify = bool(self.settings.verify) if verify is None else verify
        alone = len(self.ranks) == 1
        source = self.source if alone else self.sources
        target = self.target if alone else self.targets
        return self.executor.sync(source or None, target or None, verify=verify, version=version, strict=strict)

    def replan(self, plan: SyncPlan) -> None:
        """Sync by ``plan`` from now on (e.g. a new expert placement); same group, same settings. The ends
        are checked against it first, so a plan they cannot take is refused before any byte moves."""
        old = self.plan
        self.plan = plan
        try:
            # a new expert placement leaves every local tensor as it was: only the placement is new to the ends
            self.check_ends(placement_only=plan.same_locals(old))
        except Exception:
            self.plan = old
            raise
        # what the old plan bound and this one leaves alone is taken over; the new tables are read at the
        # next sync, while the GPU runs the placement-free copies
        self.executor = self._executor(plan, previous=self.executor)

    def prepare(self, plan: SyncPlan) -> float:
        """:meth:`replan`, then bind the new plan's copy programs to the ends now (no byte moves): call it
        as soon as a new placement is known -- while the trainer steps -- and the next sync runs as fast
        as one by an unchanged plan. Returns the seconds the bind took."""
        self.replan(plan)
        alone = len(self.ranks) == 1
        return self.executor.bind(self.source if alone else self.sources or None,
                                  self.target if alone else self.targets or None)

    def set_ends(self, source=None, target=None) -> None:
        """New sources or targets for the hosted ranks (same plan)."""
        if source is not None:
            self.sources = _by_rank(source, self.ranks)
        if target is not None:
            self.targets = {r: versioned(t, self.settings) for r, t in _by_rank(target, self.ranks).items()}
        self.check_ends()

    def check_ends(self, placement_only: bool = False) -> None:
        """Every hosted rank's tensors against the plan (an end built for another layout is named now).
        ``placement_only``: the ends were checked against the same local tensors already (the executor
        checks them again wherever their tensors moved); only the expert placement is checked."""
        for r, end in {**self.sources, **self.targets}.items():
            # an engine that cannot hold the placement says which of its settings to change: first
            check = getattr(getattr(end, "inner", end), "check_placement", None)
            if check is not None and self.plan.placement is not None:
                check(self.plan.placement_of(r))
            if not placement_only:
                check_locals(self.plan, r, end.local_tensors(), "source" if r < self.plan.num_trainer else "target")

    def _executor(self, plan: SyncPlan, previous: PlanExecutor | None = None) -> PlanExecutor:
        options = dict(self.options, previous=previous)
        if plan.scope is not None:  # a rank's part of the plan: its peers' fan-out comes from the peers
            if not set(self.ranks) <= set(plan.scope):
                raise PlanError(f"the plan holds ranks {list(plan.scope)}'s part; this process hosts {self.ranks}")
            options["fan"] = gathered_fanout(plan, self.ranks, self.transport, options.get("process_of"),
                                             self.settings.timeout_s)
        return PlanExecutor(plan, self.ranks if len(self.ranks) > 1 else self.ranks[0], self.transport,
                            self.settings.bucket_bytes, self.settings.timeout_s, **options)


def gathered_fanout(plan: SyncPlan, ranks: list[int], transport: Transport, process_of=None,
                    timeout_s: float = 120.0) -> dict[int, np.ndarray]:
    """Every process's fan-out (``planners.schedule.buckets.fanout``) where each process holds its own
    ranks' part of the plan: each counts its own, which its part holds whole, and one all-reduce (on
    every process, in the same order) shares them."""
    process_of = np.arange(plan.num_ranks) if process_of is None else np.asarray(process_of)
    mine = fanout(plan, process_of)
    me = int(process_of[ranks[0]])
    device = transport.collective_device
    counts = torch.zeros((2, int(process_of.max()) + 1), dtype=torch.int64, device=device)
    counts[0, me], counts[1, me] = int(mine[1][me]), int(mine[2][me])
    wait_all([transport.all_reduce(counts)], ["sharing fan-outs"], timeout_s)
    counts = counts.cpu().numpy()
    return {1: counts[0], 2: counts[1]}


def _by_rank(ends, ranks: list[int]) -> dict[int, Any]:
    if ends is None:
        return {}
    if isinstance(ends, dict):
        return {int(r): e for r, e in ends.items() if e is not None}
    if len(ranks) != 1:
        raise ValueError(f"this process hosts ranks {ranks}: give their ends as {{plan rank: end}}")
    return {ranks[0]: ends}
