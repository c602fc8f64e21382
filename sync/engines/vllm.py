"""vLLM adapter: a worker extension that receives syncs in place (importable without vLLM).

vLLM's documented hook for RL weight updates is a *worker extension class*: pass
``worker_extension_cls="sync.engines.vllm.RLSyncWorkerExtension"`` to ``LLM(...)`` (or the engine
args) and call its methods on every worker with ``llm.collective_rpc(name, args=...)``:

1. ``rlsync_init(plan_json, engine_index, host, port, timeout_s, backend)`` -- every engine worker
   joins the sync's standalone group (trainer ranks join the same store), maps the plan's parameter
   names onto ``model.named_parameters()`` and checks shapes and dtypes.
2. ``rlsync_sync(plan_json=None)`` -- receives one refresh in place (a new plan, e.g. with a new
   EPLB placement, may be passed), verifies it, installs the placement's EPLB maps, returns stats.

Targets vLLM 0.11 to 0.23 names (``mlp.experts.w13_weight``) and 0.24+ (``mlp.experts.routed_experts.
w13_weight``), unquantized bf16 weights, with the default Triton MoE backend (FlashInfer and AITER
re-layout expert weights after loading: a sync must then rerun the model's
``process_weights_after_loading``, which is not done here). MLA engines need the same after a sync.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from planners.layouts import InferenceLayout
from planners.plan import SyncPlan

__all__ = ["RLSyncWorkerExtension", "map_parameter_names", "engine_global_rank", "ParamTarget"]


def engine_global_rank(num_trainer: int, layout: InferenceLayout, engine: int, dp: int, pp: int, tp: int) -> int:
    """Global sync rank of an engine worker from vLLM's own coordinates (ExternalDP x DP x PP x TP)."""
    return num_trainer + layout.grid.rank(engine=engine, dp=dp, pp=pp, tp=tp)


_ROUTED = re.compile(r"\.experts\.(w13_weight|w2_weight)$")


def map_parameter_names(plan_names: list[str], engine_names: list[str]) -> dict[str, str]:
    """Plan name -> engine parameter name; raises KeyError listing every plan name with no match."""
    available = set(engine_names)
    out, missing = {}, []
    for name in plan_names:
        candidates = [name, _ROUTED.sub(r".experts.routed_experts.\1", name)]
        hit = next((c for c in candidates if c in available), None)
        if hit is None:
            missing.append(name)
        else:
            out[name] = hit
    if missing:
        raise KeyError(f"engine has no parameter for {len(missing)} plan tensor(s), e.g. {missing[:5]}")
    return out


class ParamTarget:
    """A sync target over a live model's parameters (renamed to the plan's names, written in place)."""

    def __init__(self, plan: SyncPlan, rank: int, model: torch.nn.Module) -> None:
        params = dict(model.named_parameters())
        params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
        names = [plan.local_name[i] for i in plan.locals_of(rank)]
        self.names = map_parameter_names(names, list(params))
        self.tensors = {ours: params[theirs].data for ours, theirs in self.names.items()}
        self.model = model
        self.placement = None

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def set_placement(self, placement) -> None:
        """Install the EPLB maps matching the new weights (vLLM keeps them on its EPLB state)."""
        self.placement = placement
        state = getattr(self.model, "eplb_state", None)
        if state is not None and hasattr(state, "physical_to_logical_map"):
            state.physical_to_logical_map.copy_(torch.as_tensor(placement.phy2log))


class RLSyncWorkerExtension:
    """Methods mixed into vLLM's GPU worker (``self`` is the worker: ``self.model_runner.model``)."""

    def rlsync_init(self, plan_json: dict[str, Any], engine_index: int, host: str, port: int,
                    timeout_s: float = 120.0, backend: str = "nccl", ipc: bool | str = False) -> int:
        """Join the sync group. ``ipc``: trainer processes share this worker's GPU (colocated, separate
        processes): their chunks arrive by CUDA IPC ("arena" or "direct", see ``PlanExecutor``); use
        ``backend="gloo"`` then, for control only
        (NCCL cannot join two processes of one GPU)."""
        from vllm.distributed import parallel_state as vps

        from sync.executor import PlanExecutor
        from sync.transport import standalone_transport

        plan = SyncPlan.from_dict(plan_json)
        layout = InferenceLayout(**{k: plan.meta["inference"][k] for k in ("tp", "pp", "dp", "enable_ep", "engines")})
        rank = engine_global_rank(plan.num_trainer, layout, engine_index, vps.get_dp_group().rank_in_group,
                                  vps.get_pp_group().rank_in_group, vps.get_tp_group().rank_in_group)
        self._rlsync_target = ParamTarget(plan, rank, self.model_runner.model)
        transport = standalone_transport(rank, plan.num_ranks, host, port, timeout_s, backend)
        self._rlsync = PlanExecutor(plan, rank, transport, timeout_s=timeout_s, ipc=ipc)
        return rank

    def rlsync_sync(self, plan_json: dict[str, Any] | None = None) -> dict[str, Any]:
        from sync.executor import PlanExecutor

        if plan_json is not None:  # e.g. a new EPLB placement: same group, new plan
            old = self._rlsync
            self._rlsync = PlanExecutor(SyncPlan.from_dict(plan_json), old.rank, old.transport, timeout_s=old.timeout_s,
                                        ipc=old.ipc)
        stats = self._rlsync.sync(source=None, target=self._rlsync_target, verify=True)
        return {"rank": stats.rank, "seconds": stats.global_seconds, "verified": stats.verified,
                "bytes_received": stats.bytes_received, "mismatched": stats.mismatched}
