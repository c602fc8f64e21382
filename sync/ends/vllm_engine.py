"""One vLLM worker's end of the sync, whichever route drives it: the ``rlsync`` weight-transfer backend
(``sync.ends.vllm_backend``) or the worker extension (``sync.ends.vllm.RLSyncWorkerExtension``).

:class:`EngineEnd` binds the worker's plan rank to its model, chooses how bytes reach the kernels and
says which it chose (``mode``, ``mode_reason``):

* ``"in_place"`` -- only where vLLM's post-load processing provably left every tensor as it was loaded
  (the plugin's :class:`~sync.ends.vllm_processing.ProcessingRecord` of this model is empty): the sync
  writes the live parameters; the job's ``sync.staging`` decides whether a failed sync is undone;
* ``"reload"`` -- anywhere else (processing re-laid something, or nobody watched the model load):
  vLLM's layerwise reload around every sync (:class:`~sync.ends.vllm_reload.ReloadTarget`).

Asking for ``"in_place"`` where processing was not the identity is refused, naming what it changed:
the engine never reports verified while its kernels read bytes the sync did not write.

A sync then runs as vLLM's weight-transfer lifecycle: :meth:`start` (a round opens), :meth:`receive`
(the plan's bytes move and are verified; the target commits or aborts), :meth:`finish` (the expert
placement that matches the new weights is installed and the engine's expert loads are reset, so load
counted under the old placement is never credited to the new slots). :meth:`expert_load` returns the
load since the last sync as ``[moe layers of this stage, logical experts]``, summed over the engine's
expert-parallel ranks.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from planners.plan import SyncPlan
from sync.ends.base import end_locals
from sync.ends.versioned import VersionedTarget
from sync.ends.vllm_experts import EngineConfigError, LoadCounter, find_eplb_maps, find_eplb_state
from sync.ends.vllm_processing import record_of

__all__ = ["EngineEnd", "EngineTarget", "choose_mode", "join", "MODES", "SyncReport"]

log = logging.getLogger(__name__)

MODES = ("auto", "in_place", "reload")


def choose_mode(model: torch.nn.Module, modules: set[str] | None, asked: str = "auto") -> tuple[str, str]:
    """(mode, why) for a model whose ``modules`` hold the plan's tensors (None: not all found among its
    live tensors): in place only where vLLM's processing provably left them, and everything that could
    derive from them, as loaded."""
    if asked not in MODES:
        raise EngineConfigError(f"mode {asked!r} is not one of {MODES}")
    if asked == "reload":
        return "reload", "reload asked for"
    record = record_of(model)
    if record is None:
        if asked == "in_place":
            raise EngineConfigError(
                "mode 'in_place' asked for, but nothing recorded what vLLM's post-load processing did to this model, "
                "so in place cannot be shown to reach the tensors its kernels read: install rlsync in the engine's "
                "environment (its vLLM plugin watches loading; VLLM_PLUGINS must include 'rlsync' if set), or use "
                "mode 'auto'")
        return "reload", ("nothing recorded vLLM's post-load processing of this model (the rlsync vLLM plugin did "
                          "not watch it load)")
    blocking = record.changed if modules is None else record.blocking(modules)
    if blocking:
        reasons = record.describe(blocking)
        if asked == "in_place":
            raise EngineConfigError(f"mode 'in_place' asked for, but vLLM's post-load processing re-laid "
                                    f"{len(blocking)} module(s) ({reasons}): a sync written in place would be "
                                    "verified while the kernels read other bytes; use mode 'auto' or 'reload'")
        return "reload", f"vLLM's post-load processing re-laid {len(blocking)} module(s): {reasons}"
    return "in_place", "vLLM's post-load processing left every tensor the sync writes as loaded"


def plan_modules(plan: SyncPlan, rank: int, model: torch.nn.Module) -> set[str] | None:
    """Names of the modules holding this rank's plan tensors (vLLM's names); None when some plan tensor
    is no longer among the model's live tensors (processing dropped it)."""
    from sync.ends.vllm import map_parameter_names

    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()]
    try:
        mapped = map_parameter_names([plan.local_name[i] for i in end_locals(plan, rank)], names)
    except KeyError:
        return None
    return {theirs.rpartition(".")[0] for theirs in mapped.values()}


@dataclass
class SyncReport:
    """What one sync did to this engine rank (the weight-transfer backend logs it; both routes return it)."""

    rank: int
    mode: str
    mode_reason: str
    version: int | None = None
    verified: bool | None = None
    seconds: float = 0.0
    bytes_received: int = 0
    mismatched: list[str] = field(default_factory=list)
    placement_installed: bool = False
    placement_moved: bool = False  # the installed placement differs from the one before
    error: str | None = None  # the sync failed: what the engine serves is in ``engine``
    engine: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class EngineTarget:
    """The versioned target a session holds for one engine rank: weights in the chosen mode, the expert
    placement held back until :meth:`EngineEnd.finish`."""

    def __init__(self, weights, staging_settings=None) -> None:
        self.weights = weights
        # in place: the job's staging decides what a failed sync leaves; reload stages by itself
        self.versioned = weights if hasattr(weights, "begin") else VersionedTarget.for_job(weights, staging_settings)
        self.pending = None

    @property
    def inner(self):
        return self.weights

    @property
    def state(self):
        return self.versioned.state

    @property
    def experts(self):
        return self.weights.experts

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self.versioned.local_tensors()

    def begin(self, version: int) -> None:
        self.pending = None
        self.versioned.begin(version)

    def commit(self, version: int) -> None:
        self.versioned.commit(version)

    def abort(self, error: str, written: list[str]) -> None:
        self.pending = None
        self.versioned.abort(error, written)

    def check_placement(self, placement) -> None:
        self.weights.check_placement(placement)

    def set_placement(self, placement) -> None:
        self.pending = placement  # installed at finish, after the weights are committed


class EngineEnd:
    """A vLLM worker's plan rank: its model in the chosen mode, its EPLB state, its session."""

    def __init__(self, plan: SyncPlan, rank: int, model: torch.nn.Module, model_config=None, runner=None,
                 mode: str = "auto", settings=None) -> None:
        from sync.ends.vllm import ParamTarget
        from sync.ends.vllm_reload import ReloadTarget

        self.plan, self.rank, self.model, self.runner = plan, rank, model, runner
        self.mode, self.mode_reason = choose_mode(model, plan_modules(plan, rank, model), mode)
        if self.mode == "in_place":
            weights = ParamTarget(plan, rank, model, model_runner=runner)
        else:
            weights = ReloadTarget(plan, rank, model, model_config, lambda: find_eplb_maps(runner, model))
        self.target = EngineTarget(weights, settings)
        self.session = None
        self.report: SyncReport | None = None
        self._open_round = False
        self.versions = 0
        state = find_eplb_state(runner, model)
        counts = state is not None and hasattr(state, "model_states") and callable(getattr(state, "step", None))
        self.loads = LoadCounter.on(state) if counts else None

    def open(self, transport, settings, ipc=False) -> None:
        from sync.session import Session

        self.session = Session.open(self.plan, self.rank, transport, target=self.target, settings=settings, ipc=ipc)

    # -- one sync, as vLLM's weight-transfer lifecycle -------------------------------------------
    def start(self) -> None:
        if self._open_round:
            raise RuntimeError("start_weight_update called twice without finish_weight_update")
        self._open_round = True
        self.report = None

    def receive(self, version: int | None = None, plan: SyncPlan | None = None) -> SyncReport:
        """Move one version (by default one more than the last) by the current plan, or by ``plan``."""
        if self.session is None:
            raise RuntimeError("the engine has not joined the sync group (init_transfer_engine / rlsync_init first)")
        if plan is not None:  # e.g. a new expert placement: same group, checked before any byte moves
            self.session.replan(plan)
            self.plan = plan
        version = self.versions + 1 if version is None else int(version)
        self.versions = version
        try:
            stats = self.session.sync(version)
        except BaseException as e:
            self.report = SyncReport(self.rank, self.mode, self.mode_reason, version, None, error=f"{type(e).__name__}: {e}",
                                     engine=dict(vars(self.target.state)))
            # vLLM's worker ends an update whose update_weights raised (no finish_weight_update follows):
            # so does the end, and the next start_weight_update opens a new one
            self._open_round = False
            self.target.pending = None
            raise
        self.report = SyncReport(self.rank, self.mode, self.mode_reason, version, stats.verified,
                                 stats.global_seconds, stats.bytes_received, list(stats.mismatched))
        return self.report

    def finish(self) -> SyncReport | None:
        """Install the placement of the committed weights; reset the expert loads. Returns the report."""
        self._open_round = False
        target, report = self.target, self.report
        if report is not None and target.state.serving == report.version:  # the new weights are committed
            if target.pending is not None:
                report.placement_moved = target.experts.install(target.pending)
                report.placement_installed = True
            self.reset_loads()  # loads since the last sync, and none credited to slots that changed experts
        target.pending = None
        if report is not None:
            report.engine = dict(vars(target.state))
            log.info("rlsync: rank %d version %s %s (%s), verified=%s", self.rank, report.version, self.mode,
                     self.mode_reason, report.verified)
        return report

    # -- expert loads ----------------------------------------------------------------------------
    def _model_state(self):
        holder = find_eplb_maps(self.runner, self.model)
        if holder is None:
            raise EngineConfigError("the vLLM engine runs without EPLB, so it counts no expert loads: start it with "
                                    "enable_eplb=True (and enable_expert_parallel=True)")
        return holder

    def physical_load(self) -> torch.Tensor:
        """This worker's counts per (MoE layer of its stage, physical slot) since the last sync."""
        holder = self._model_state()
        if self.loads is not None:
            return self.loads.physical(holder)
        window = getattr(holder, "expert_load_window", None)
        out = holder.expert_load_pass.to(torch.int64).clone()
        return out + window.to(torch.int64).sum(0) if window is not None else out

    def expert_load(self, group=None) -> np.ndarray:
        """``[moe layers of this stage, logical experts]``: slot counts mapped to experts through the live
        placement, summed over ``group`` (vLLM's expert-parallel group by default)."""
        holder = self._model_state()
        physical = self.physical_load()
        phy2log = holder.physical_to_logical_map.to(physical.device, torch.int64)
        experts = int(holder.logical_replica_count.shape[1])
        logical = torch.zeros((physical.shape[0], experts + 1), dtype=torch.int64, device=physical.device)
        # unused capacity slots map to -1: counted in the extra column, dropped
        logical.scatter_add_(1, torch.where(phy2log < 0, experts, phy2log), physical)
        logical = logical[:, :experts].contiguous()
        group = _ep_group() if group is None else group
        if group is not None and torch.distributed.get_world_size(group) > 1:
            torch.distributed.all_reduce(logical, group=group)
        return logical.cpu().numpy()

    def reset_loads(self) -> None:
        holder = find_eplb_maps(self.runner, self.model)
        if holder is None:
            return
        if self.loads is not None:
            self.loads.reset(holder)
            return
        for name in ("expert_load_pass", "expert_load_window"):  # what this vLLM keeps of them
            counts = getattr(holder, name, None)
            if counts is not None:
                counts.zero_()


def join(plan: SyncPlan, engine_index: int, host: str, port: int, vllm_config, model: torch.nn.Module, runner=None,
         backend: str = "nccl", ipc: bool | str = False, mode: str = "auto") -> EngineEnd:
    """This vLLM worker's plan rank, joined to the sync group: its rank read from vLLM's own parallel
    groups, its settings checked against the plan, its model bound in the chosen mode. ``ipc``: trainer
    processes share this worker's GPU (colocated, separate processes) and hand chunks over by CUDA IPC
    ("arena" or "direct"); use ``backend="gloo"`` then, for control only."""
    from vllm.distributed import parallel_state as vps

    from planners.layouts import InferenceLayout
    from sync.ends.vllm import check_engine_config, engine_global_rank
    from sync.session import settings_of
    from sync.transport import standalone_transport

    settings = settings_of(plan)
    layout = InferenceLayout(**{k: plan.meta["inference"][k] for k in ("tp", "pp", "dp", "enable_ep", "engines")})
    if not 0 <= engine_index < layout.engines:
        raise EngineConfigError(f"engine_index {engine_index} is outside the job's {layout.engines} engines")
    groups = {"tp": vps.get_tp_group(), "pp": vps.get_pp_group(), "dp": vps.get_dp_group()}
    rank = engine_global_rank(plan.num_trainer, layout, engine_index, groups["dp"].rank_in_group,
                              groups["pp"].rank_in_group, groups["tp"].rank_in_group)
    check_engine_config(plan, rank, vllm_config, {k: g.world_size for k, g in groups.items() if hasattr(g, "world_size")})
    end = EngineEnd(plan, rank, model, getattr(vllm_config, "model_config", None), runner, mode, settings)
    end.open(standalone_transport(rank, plan.num_ranks, host, port, settings.timeout_s, backend), settings, ipc)
    return end


def _ep_group():
    try:
        from vllm.distributed.parallel_state import get_ep_group
    except ImportError:
        return None
    try:
        return get_ep_group().device_group
    except AssertionError:  # no EP group (EPLB off)
        return None
