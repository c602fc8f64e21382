"""vLLM adapter: a worker extension that receives syncs in place (importable without vLLM).

vLLM's documented hook for RL weight updates is a *worker extension class*: pass
``worker_extension_cls="sync.ends.vllm.RLSyncWorkerExtension"`` to ``LLM(...)`` (or the engine
args) and call its methods on every worker with ``llm.collective_rpc(name, args=...)``:

1. ``rlsync_init(plan_json, engine_index, host, port, backend, ipc)`` -- every engine worker
   checks its vLLM settings against the plan, joins the sync's standalone group (trainer ranks join
   the same store), maps the plan's parameter names onto ``model.named_parameters()``, checks shapes
   and dtypes, and finds the engine's EPLB maps; returns its global sync rank. Every sync setting
   (buckets, timeout, verification, staging) is the job's, carried by the plan: the engine opens its
   rank exactly as the trainer ranks do (``sync.session``), so both derive the same buckets.
2. ``rlsync_sync(plan_json=None, version=None)`` -- receives one refresh (a new plan, e.g. with a new
   EPLB placement, may be passed), verifies it, installs the placement's EPLB maps, returns stats and
   what the engine serves.

Engine settings
---------------
Every engine of the job is one ``LLM`` (or ``vllm serve``) whose settings mirror the job spec::

    LLM(model=...,                                  # the same architecture and sizes as job.model
        worker_extension_cls="sync.ends.vllm.RLSyncWorkerExtension",
        tensor_parallel_size=job.inference.tp,
        pipeline_parallel_size=job.inference.pp,    # 1 unless the job sets inference.pp
        data_parallel_size=job.inference.dp,
        enable_expert_parallel=job.inference.enable_ep,
        # MoE with job.eplb.num_redundant_experts = R > 0, or job.eplb.enabled:
        enable_eplb=True,
        eplb_config={"num_redundant_experts": R,    # vLLM 0.10.x: num_redundant_experts=R and
                     "step_interval": 10**9},       #   eplb_step_interval=10**9 instead; the huge interval
                                                    #   keeps vLLM's own rebalancer from moving experts
        dtype="bfloat16",                           # the plan's inference dtype (bf16 by default)
        quantization=None,                          # unquantized weights only (no fp8, no AWQ/GPTQ)
        # leave expert_placement_strategy at its default "linear" (slots of an EP rank contiguous)
    )

``engine_index`` numbers the job's engines (``job.inference.engines``): global sync rank =
trainer ranks + ``engine_index * dp * pp * tp`` + vLLM's (DP rank, PP rank, TP rank) in that order,
read from vLLM's ``parallel_state`` groups. ``rlsync_init`` refuses (``EngineConfigError``) an engine
whose TP/PP/DP sizes, expert parallelism, redundant experts, dtype or quantization disagree with
the plan, and a plan with redundant slots or a non-identity placement when the engine's EPLB is off.

EPLB maps
---------
vLLM keeps the expert placement on the model runner (``model_runner.eplb_state``; model runner v2:
``model_runner.eplb.state``), not on the model. The older layout holds three tensors on that state
itself; newer releases hold one state per model (main model and MoE drafter) in
``eplb_state.model_states``, each with the same three tensors and its ``model``:

* ``physical_to_logical_map [moe_layers, slots]``,
* ``logical_to_physical_map [moe_layers, experts, W]`` (-1 padded; W is vLLM's replica capacity),
* ``logical_replica_count [moe_layers, experts]``.

Each FusedMoE layer keeps views (row ``layer``) of the last two, taken once at load time and used
for routing, so the adapter overwrites all three in place (their own dtype and device; the -1
padding kept to W) for the MoE layers of the worker's pipeline stage; it never rebinds them.

Names checked against vLLM source snapshots (vllm-project/vllm, not tied to release tags here): the
single-state ``EplbState`` with the three maps as its own fields (commit 0014ec6c, settings
``parallel_config.eplb_window_size``/``eplb_step_interval``: the vLLM 0.10 line; a later single-state
version reads ``parallel_config.eplb_config``), the per-model ``EplbState.model_states`` of
``EplbModelState`` (commit 50feac95: ``eplb_config`` with ``use_async`` and ``policy``),
``GPUModelRunner.eplb_state`` (None unless ``enable_eplb``) and ``get_model()``, model runner v2's
``EPLBController`` (``eplb.state``), ``FusedMoE.set_eplb_state`` (per-layer row views) and
``ParallelConfig.expert_placement_strategy`` ("linear" | "round_robin"). Parameter names: vLLM 0.11
to 0.23 (``mlp.experts.w13_weight``) and 0.24+ (``mlp.experts.routed_experts.w13_weight``).
Unquantized weights with the default Triton MoE backend (FlashInfer and AITER re-layout expert
weights after loading: a sync must then rerun the model's ``process_weights_after_loading``, which
is not done here). MLA engines need the same after a sync.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import numpy as np
import torch

from planners.errors import RLSyncError
from planners.layouts import InferenceLayout
from planners.plan import SyncPlan

__all__ = ["RLSyncWorkerExtension", "map_parameter_names", "engine_global_rank", "ParamTarget", "EngineConfigError",
           "find_eplb_maps", "check_engine_config", "moe_layer_rows"]


class EngineConfigError(RLSyncError, ValueError):
    """The vLLM engine's settings do not fit the plan (names the ``LLM(...)`` argument to change)."""


def engine_global_rank(num_trainer: int, layout: InferenceLayout, engine: int, dp: int, pp: int, tp: int) -> int:
    """Global sync rank of an engine worker from vLLM's own coordinates (ExternalDP x DP x PP x TP)."""
    return num_trainer + layout.grid.rank(engine=engine, dp=dp, pp=pp, tp=tp)


_ROUTED = re.compile(r"\.experts\.(w13_weight|w2_weight)$")
_MOE_W13 = re.compile(r"^model\.layers\.(\d+)\.[A-Za-z_]+\.experts\.w13_weight$")


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


def _model_of(runner) -> torch.nn.Module:
    """The runner's model, unwrapped (CUDA-graph wrappers are no modules): ``get_model()`` when there."""
    get = getattr(runner, "get_model", None)
    return get() if callable(get) else runner.model


def find_eplb_maps(runner, model: torch.nn.Module):
    """The object holding this model's three EPLB maps on vLLM's model runner, or None (EPLB off).

    Older vLLM: ``runner.eplb_state`` holds them itself. Newer: ``runner.eplb_state.model_states``
    (one per model: main and MoE drafter); the one whose ``model`` is ``model`` or one of its
    submodules (vLLM registers the MoE part of the model) is ours. Model runner v2 keeps the state
    at ``runner.eplb.state``."""
    if runner is None:
        return None
    state = getattr(runner, "eplb_state", None)
    if state is None:
        state = getattr(getattr(runner, "eplb", None), "state", None)
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


class ParamTarget:
    """A sync target over a live model's parameters (renamed to the plan's names, written in place).

    ``model_runner``: vLLM's model runner, where the EPLB maps live (see ``find_eplb_maps``); without
    one (or with EPLB off in the engine) only the identity placement without redundant slots fits."""

    def __init__(self, plan: SyncPlan, rank: int, model: torch.nn.Module, model_runner=None) -> None:
        from sync.ends.base import check_locals

        params = dict(model.named_parameters())
        params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
        names = [plan.local_name[i] for i in plan.locals_of(rank)]
        self.names = map_parameter_names(names, list(params))
        self.tensors = {ours: params[theirs].data for ours, theirs in self.names.items()}
        check_locals(plan, rank, self.tensors, "target")
        self.model, self.model_runner, self.rank = model, model_runner, rank
        self.moe_rows = moe_layer_rows(plan, rank)
        self.placement = None
        if plan.placement is not None:
            self._maps(plan.placement)  # fail now, before any byte moves, if the engine cannot take it

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def eplb_maps(self):
        """vLLM's object holding the three maps now (looked up each time: vLLM may rebuild it)."""
        return find_eplb_maps(self.model_runner, self.model)

    def _maps(self, placement):
        """(holder, phy2log rows, log2phy rows, counts) for this stage, checked against the engine's
        tensors; holder None when the engine runs without EPLB (then the placement must be trivial)."""
        phy2log = np.asarray(placement.phy2log)
        E = int(phy2log.max()) + 1 if phy2log.size else 0
        holder = self.eplb_maps()
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

    def check_placement(self, placement) -> None:
        """Refuse (EngineConfigError, before any byte moves) a placement the engine's EPLB maps cannot hold."""
        self._maps(placement)

    def set_placement(self, placement) -> None:
        """Install the EPLB maps matching the new weights, in place in vLLM's tensors (its MoE layers
        route through views of them): slot -> expert, expert -> slots (-1 padded), replica counts."""
        holder, rows, log2phy, counts = self._maps(placement)
        if holder is not None:
            p2l, l2p, cnt = holder.physical_to_logical_map, holder.logical_to_physical_map, holder.logical_replica_count
            R = log2phy.shape[2]
            p2l.copy_(torch.from_numpy(np.ascontiguousarray(rows)).to(device=p2l.device, dtype=p2l.dtype))
            l2p[..., R:].fill_(-1)
            l2p[..., :R].copy_(torch.from_numpy(np.ascontiguousarray(log2phy)).to(device=l2p.device, dtype=l2p.dtype))
            cnt.copy_(torch.from_numpy(np.ascontiguousarray(counts)).to(device=cnt.device, dtype=cnt.dtype))
        self.placement = placement


def _redundant_of(parallel) -> int | None:
    eplb = getattr(parallel, "eplb_config", None)
    n = getattr(eplb, "num_redundant_experts", None) if eplb is not None else None
    return n if n is not None else getattr(parallel, "num_redundant_experts", None)


def check_engine_config(plan: SyncPlan, rank: int, vllm_config, group_sizes: dict[str, int] | None = None) -> None:
    """Raise EngineConfigError listing every vLLM setting that disagrees with the plan (settings
    this vLLM version does not have are skipped). ``group_sizes``: {"tp", "pp", "dp"} from vLLM's groups."""
    inf = plan.meta.get("inference", {})
    problems = []
    sizes = dict(group_sizes or {})
    parallel = getattr(vllm_config, "parallel_config", None)
    for key, arg, attr in (("tp", "tensor_parallel_size", "tensor_parallel_size"),
                           ("pp", "pipeline_parallel_size", "pipeline_parallel_size"),
                           ("dp", "data_parallel_size", "data_parallel_size")):
        have = sizes.get(key, getattr(parallel, attr, None))
        if have is not None and key in inf and int(have) != int(inf[key]):
            problems.append(f"{arg}={have}, the job's inference.{key} is {inf[key]}")
    if parallel is not None:
        ep = getattr(parallel, "enable_expert_parallel", None)
        if ep is not None and "enable_ep" in inf and bool(ep) != bool(inf["enable_ep"]):
            problems.append(f"enable_expert_parallel={bool(ep)}, the job's inference.enable_ep is {bool(inf['enable_ep'])}")
        if plan.placement is not None:
            redundant = plan.placement.num_physical - (int(plan.placement.phy2log.max()) + 1)
            eplb_on = getattr(parallel, "enable_eplb", None)
            if eplb_on is not None and redundant and not eplb_on:
                problems.append(f"enable_eplb=False, the plan has {redundant} redundant expert slots (enable_eplb=True, "
                                f"eplb_config={{'num_redundant_experts': {redundant}}})")
            elif eplb_on is not None and not eplb_on and plan.meta.get("eplb", {}).get("enabled"):
                problems.append("enable_eplb=False, the job rebalances experts (eplb.enabled: true): enable_eplb=True")
            have = _redundant_of(parallel)
            if eplb_on and have is not None and int(have) != redundant:
                problems.append(f"num_redundant_experts={have} (eplb_config), the job's eplb.num_redundant_experts "
                                f"gives {redundant}")
            strategy = getattr(parallel, "expert_placement_strategy", None)
            if strategy is not None and inf.get("enable_ep") and strategy != "linear":
                problems.append(f"expert_placement_strategy={strategy!r}; the plan assumes 'linear' (the default)")
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None:
        quant = getattr(model_config, "quantization", None)
        if quant:
            problems.append(f"quantization={quant!r}; the sync writes unquantized weights (quantization=None)")
        dtype = getattr(model_config, "dtype", None)
        dtypes = Counter(plan.local_dtype[i] for i in plan.locals_of(rank))
        if isinstance(dtype, torch.dtype) and dtypes:
            from sync.tensors import TORCH_DTYPES

            want = dtypes.most_common(1)[0][0]
            if TORCH_DTYPES[want] != dtype:
                problems.append(f"dtype={str(dtype).removeprefix('torch.')}, the plan's weights are {want} (dtype={want!r})")
    if problems:
        raise EngineConfigError(f"vLLM engine settings do not fit the plan (inference rank {rank}): " + "; ".join(problems))


class RLSyncWorkerExtension:
    """Methods mixed into vLLM's GPU worker (``self`` is the worker: ``self.model_runner``)."""

    def rlsync_init(self, plan_json: dict[str, Any], engine_index: int, host: str, port: int,
                    backend: str = "nccl", ipc: bool | str = False) -> int:
        """Join the sync group. ``ipc``: trainer processes share this worker's GPU (colocated, separate
        processes): their chunks arrive by CUDA IPC ("arena" or "direct", see ``PlanExecutor``); use
        ``backend="gloo"`` then, for control only (NCCL cannot join two processes of one GPU)."""
        from vllm.distributed import parallel_state as vps

        from sync.session import Session, settings_of
        from sync.transport import standalone_transport

        plan = SyncPlan.from_dict(plan_json)
        settings = settings_of(plan)
        layout = InferenceLayout(**{k: plan.meta["inference"][k] for k in ("tp", "pp", "dp", "enable_ep", "engines")})
        if not 0 <= engine_index < layout.engines:
            raise EngineConfigError(f"engine_index {engine_index} is outside the job's {layout.engines} engines")
        groups = {"tp": vps.get_tp_group(), "pp": vps.get_pp_group(), "dp": vps.get_dp_group()}
        rank = engine_global_rank(plan.num_trainer, layout, engine_index, groups["dp"].rank_in_group,
                                  groups["pp"].rank_in_group, groups["tp"].rank_in_group)
        check_engine_config(plan, rank, getattr(self, "vllm_config", None),
                            {k: g.world_size for k, g in groups.items() if hasattr(g, "world_size")})
        runner = self.model_runner
        target = ParamTarget(plan, rank, _model_of(runner), model_runner=runner)
        transport = standalone_transport(rank, plan.num_ranks, host, port, settings.timeout_s, backend)
        self._rlsync = Session.open(plan, rank, transport, target=target, settings=settings, ipc=ipc)
        self._rlsync_versions = 0
        return rank

    def rlsync_sync(self, plan_json: dict[str, Any] | None = None, version: int | None = None) -> dict[str, Any]:
        """One refresh (``version``: what the trainer syncs; by default one more than the last)."""
        if plan_json is not None:  # e.g. a new EPLB placement: same group, new plan (checked before any byte moves)
            self._rlsync.replan(SyncPlan.from_dict(plan_json))
        self._rlsync_versions = self._rlsync_versions + 1 if version is None else version
        stats = self._rlsync.sync(self._rlsync_versions)
        return {"rank": stats.rank, "seconds": stats.global_seconds, "verified": stats.verified,
                "bytes_received": stats.bytes_received, "mismatched": stats.mismatched,
                "engine": dict(vars(self._rlsync.target.state))}

    @property
    def _rlsync_target(self) -> ParamTarget:
        """The engine's parameters as a sync target (inside its versioned wrapper)."""
        return self._rlsync.target.inner
