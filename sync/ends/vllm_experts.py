"""A vLLM worker's expert placement and expert loads: the EPLB state the sync writes and reads.

vLLM keeps the placement on its EPLB state, not on the model: older releases hold three maps on
``model_runner.eplb_state`` itself; newer ones one ``EplbModelState`` per model (main model and MoE
drafter) in ``eplb_state.model_states``, each with its ``model`` and the same three maps:

* ``physical_to_logical_map [moe_layers, slots]``,
* ``logical_to_physical_map [moe_layers, experts, W]`` (-1 padded; W is vLLM's replica capacity),
* ``logical_replica_count [moe_layers, experts]``,

and the loads the MoE kernels count per physical slot: ``expert_load_pass [moe_layers, slots]`` (this
forward pass) and ``expert_load_window [window, moe_layers, slots]``. Each FusedMoE layer routes
through row views of the maps taken at load time, so :class:`ExpertMaps` overwrites them in place
(their own dtype and device, -1 padding kept to W), never rebinding them, for the MoE layers of the
worker's pipeline stage.

The state is found on the model runner (``model_runner.eplb_state``; model runner v2:
``model_runner.eplb.state``) or, for the weight-transfer backend (handed the model only), among the
states the rlsync vLLM plugin saw vLLM fill (``sync.ends.vllm_plugin.EPLB_STATES``).

Expert loads: vLLM moves a pass's counts into its window only on steps close to its own next
rearrangement, and then rearranges by itself. An engine synced by rlsync moves experts only at refresh,
so :class:`LoadCounter` takes over the state's ``step``: every pass's counts are added to a running
total since the last sync (and the layers always record), and vLLM's rebalancer never fires.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np
import torch

from planners.errors import RLSyncError
from planners.plan import SyncPlan

__all__ = ["ExpertMaps", "LoadCounter", "find_eplb_maps", "find_eplb_state", "moe_layer_rows", "EngineConfigError"]


class EngineConfigError(RLSyncError, ValueError):
    """The vLLM engine's settings do not fit the plan (names the ``LLM(...)`` argument to change)."""


_MOE_W13 = re.compile(r"^model\.layers\.(\d+)\.[A-Za-z_]+\.experts\.w13_weight$")


def moe_layer_rows(plan: SyncPlan, rank: int) -> list[int]:
    """Rows of ``plan.placement`` (MoE layers of the whole model, ascending) that this inference rank's
    pipeline stage holds, in vLLM's order (its stage-local MoE layer index)."""
    def layer(name: str) -> int | None:
        m = _MOE_W13.match(name)
        return int(m.group(1)) if m else None

    everywhere = sorted({x for x in map(layer, plan.local_name) if x is not None})
    mine = sorted({x for x in (layer(plan.local_name[i]) for i in plan.locals_of(rank)) if x is not None})
    index = {x: k for k, x in enumerate(everywhere)}
    return [index[x] for x in mine]


def find_eplb_state(runner, model: torch.nn.Module | None = None):
    """vLLM's EPLB state for this worker (the object with ``step``), or None (EPLB off)."""
    if runner is not None:
        state = getattr(runner, "eplb_state", None)
        if state is None:
            state = getattr(getattr(runner, "eplb", None), "state", None)
        return state
    if model is None:
        return None
    from sync.ends.vllm_plugin import EPLB_STATES

    ours = {id(m) for m in model.modules()}
    mine = [s for s in list(EPLB_STATES)
            if any(id(getattr(ms, "model", None)) in ours for ms in getattr(s, "model_states", {}).values())]
    if len(mine) > 1:
        raise EngineConfigError(f"{len(mine)} vLLM EPLB states hold this model's experts; expected one")
    return mine[0] if mine else None


def find_eplb_maps(runner, model: torch.nn.Module):
    """The object holding this model's three EPLB maps, or None (EPLB off).

    Older vLLM: the EPLB state holds them itself. Newer: ``state.model_states`` (one per model: main
    and MoE drafter); the one whose ``model`` is ``model`` or one of its submodules (vLLM registers
    the MoE part of the model) is ours."""
    state = find_eplb_state(runner, model)
    if state is None:
        return None
    per_model = getattr(state, "model_states", None)
    if per_model is None:
        if hasattr(state, "physical_to_logical_map"):
            return state
        raise EngineConfigError(f"vLLM's EPLB state {type(state).__name__} has neither physical_to_logical_map nor "
                                "model_states; this vLLM version is not supported by the adapter")
    states = list(per_model.values())
    if not states:
        return None  # EPLB on, but no MoE model registered with it
    ours = {id(m) for m in model.modules()}
    mine = [s for s in states if id(getattr(s, "model", None)) in ours]
    if len(mine) == 1:
        return mine[0]
    if not mine and len(states) == 1 and not hasattr(states[0], "model"):
        return states[0]
    raise EngineConfigError(f"cannot tell which of vLLM's {len(states)} EPLB model states belongs to the synced model "
                            f"({len(mine)} match it)")


def _is_identity(phy2log: np.ndarray) -> bool:
    L, P = phy2log.shape
    return bool(np.array_equal(phy2log, np.broadcast_to(np.arange(P), (L, P))))


class ExpertMaps:
    """The placement one inference rank's engine routes by: checked against vLLM's maps before any byte
    moves, written into them in place once the weights that match it are in."""

    def __init__(self, plan: SyncPlan, rank: int, find_holder: Callable[[], object]) -> None:
        self.rank, self.find_holder = rank, find_holder
        self.moe_rows = moe_layer_rows(plan, rank)
        self.placement = None

    def check(self, placement):
        """(holder, phy2log rows, log2phy rows, counts) for this stage, checked against the engine's
        tensors; holder None when the engine runs without EPLB (then the placement must be trivial)."""
        phy2log = np.asarray(placement.phy2log)
        E = int(phy2log.max()) + 1 if phy2log.size else 0
        holder = self.find_holder()
        if holder is None:
            if phy2log.shape[1] != E:
                raise EngineConfigError(
                    f"the plan has {phy2log.shape[1] - E} redundant expert slots but the vLLM engine runs without EPLB: "
                    f"start it with enable_eplb=True and eplb_config={{'num_redundant_experts': {phy2log.shape[1] - E}}} "
                    "(vLLM 0.10.x: num_redundant_experts=...) and enable_expert_parallel=True")
            if not _is_identity(phy2log):
                raise EngineConfigError(
                    "the plan's expert placement is not the identity (EPLB rebalanced it) but the vLLM engine runs "
                    "without EPLB, so it would route tokens to the wrong experts: start it with enable_eplb=True "
                    "(and enable_expert_parallel=True), or set eplb.enabled: false in the job")
            return None, None, None, None
        p2l, l2p, cnt = holder.physical_to_logical_map, holder.logical_to_physical_map, holder.logical_replica_count
        rows = phy2log[self.moe_rows]
        L, P = tuple(p2l.shape)
        where = f"inference rank {self.rank}"
        if P != rows.shape[1]:
            raise EngineConfigError(
                f"{where}: vLLM has {P} physical expert slots per layer, the plan {rows.shape[1]}: set "
                f"eplb_config={{'num_redundant_experts': {rows.shape[1] - E}}} (vLLM 0.10.x: num_redundant_experts=...) "
                "to match the job's eplb.num_redundant_experts")
        if L != len(self.moe_rows):
            raise EngineConfigError(f"{where}: vLLM's EPLB state has {L} MoE layers, this pipeline stage of the plan "
                                    f"{len(self.moe_rows)}: pipeline_parallel_size or the model differ from the job")
        experts = int(cnt.shape[1])
        if E > experts or tuple(l2p.shape[:2]) != (L, experts):
            raise EngineConfigError(f"{where}: vLLM's EPLB maps are for {experts} experts (logical_to_physical_map "
                                    f"{tuple(l2p.shape)}), the plan has {E}")
        log2phy = placement.log2phy(experts)[self.moe_rows]
        if log2phy.shape[2] > l2p.shape[2]:
            raise EngineConfigError(f"{where}: the placement gives an expert {log2phy.shape[2]} replicas, vLLM's "
                                    f"logical_to_physical_map holds at most {l2p.shape[2]}")
        counts = (log2phy >= 0).sum(axis=2)
        return holder, rows, log2phy, counts

    def install(self, placement) -> bool:
        """Write the placement into vLLM's maps (slot -> expert, expert -> slots -1 padded, replica
        counts); True when it differs from the one installed before (loads counted so far then belong
        to slots that now hold other experts)."""
        holder, rows, log2phy, counts = self.check(placement)
        moved = self.placement is None or not np.array_equal(np.asarray(self.placement.phy2log),
                                                             np.asarray(placement.phy2log))
        if holder is not None:
            p2l, l2p, cnt = holder.physical_to_logical_map, holder.logical_to_physical_map, holder.logical_replica_count
            R = log2phy.shape[2]
            p2l.copy_(torch.from_numpy(np.ascontiguousarray(rows)).to(device=p2l.device, dtype=p2l.dtype))
            l2p[..., R:].fill_(-1)
            l2p[..., :R].copy_(torch.from_numpy(np.ascontiguousarray(log2phy)).to(device=l2p.device, dtype=l2p.dtype))
            cnt.copy_(torch.from_numpy(np.ascontiguousarray(counts)).to(device=cnt.device, dtype=cnt.dtype))
        self.placement = placement
        return moved


class LoadCounter:
    """Counts one vLLM EPLB state's expert loads since the last sync, per model state and physical slot.

    Installed once per state (``LoadCounter.on(state)``): the state's ``step`` becomes :meth:`step`, which
    adds each real pass's counts to a running int64 total and clears the pass; profiling steps still go
    to vLLM (they reserve memory), dummy steps count nothing, and vLLM never rearranges by itself."""

    def __init__(self, state) -> None:
        self.state = state
        self.vllm_step = state.step
        self.totals: dict[int, torch.Tensor] = {}
        state.step = self.step
        self._always_record()

    @classmethod
    def on(cls, state) -> "LoadCounter":
        counter = getattr(state, "_rlsync_load_counter", None)
        if counter is None:
            counter = cls(state)
            state._rlsync_load_counter = counter
        return counter

    def _always_record(self) -> None:
        flag = getattr(self.state, "should_record_tensor", None)
        if flag is not None:
            flag.fill_(True)

    def step(self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False) -> None:
        if is_profile:
            self.vllm_step(is_dummy, is_profile, log_stats)
            self._always_record()
            return
        for model_state in self.state.model_states.values():
            if not is_dummy:
                self._total(model_state).add_(model_state.expert_load_pass)
            model_state.expert_load_pass.zero_()
        self._always_record()

    def _total(self, model_state) -> torch.Tensor:
        key = id(model_state)
        if key not in self.totals or self.totals[key].shape != model_state.expert_load_pass.shape:
            self.totals[key] = torch.zeros(model_state.expert_load_pass.shape, dtype=torch.int64,
                                           device=model_state.expert_load_pass.device)
        return self.totals[key]

    def physical(self, model_state) -> torch.Tensor:
        """Loads per (MoE layer, physical slot) since the last reset: our total, the pass in progress and
        whatever vLLM had put in its window before the counter took over."""
        out = self._total(model_state) + model_state.expert_load_pass.to(torch.int64)
        window = getattr(model_state, "expert_load_window", None)
        if window is not None and window.numel():
            out += window.to(torch.int64).sum(0)
        return out

    def reset(self, model_state) -> None:
        self._total(model_state).zero_()
        model_state.expert_load_pass.zero_()
        window = getattr(model_state, "expert_load_window", None)
        if window is not None:
            window.zero_()
        if hasattr(self.state, "expert_load_window_step"):
            self.state.expert_load_window_step = 0
