"""vLLM adapter: the engine settings a sync needs, the parameter names it writes, and the worker
extension for vLLM versions without the weight-transfer API (importable without vLLM).

Two routes lead into a vLLM engine, with one engine end behind both (``sync.ends.vllm_engine``):

* vLLM's weight-transfer API (vLLM with ``vllm.distributed.weight_transfer``): the ``rlsync`` backend,
  ``sync.ends.vllm_backend`` -- ``weight_transfer_config=WeightTransferConfig(backend="rlsync")``; the
  rlsync vLLM plugin (``sync.ends.vllm_plugin``, an entry point every vLLM process runs) registers it;
* the worker extension here: ``worker_extension_cls="sync.ends.vllm.RLSyncWorkerExtension"``, driven by
  ``llm.collective_rpc(name, args=...)`` on every worker:

  1. ``rlsync_init(plan_json, engine_index, host, port, backend, ipc, mode="auto")`` -- checks the
     engine's settings against the plan, joins the sync's standalone group (trainer ranks join the same
     store), binds the rank's tensors in the chosen mode; returns its global sync rank. Every sync
     setting (buckets, timeout, verification, staging) is the job's, carried by the plan.
  2. ``rlsync_sync(plan_json=None, version=None)`` -- one refresh (a new plan, e.g. with a new EPLB
     placement, may be passed): receives, verifies, installs the placement, resets the expert loads;
     returns the report (mode, verified, what the engine serves).
  3. ``rlsync_expert_load()`` -- the expert load since the last sync, ``[moe layers, experts]``.

Either way the engine end writes *in place* only where vLLM's post-load processing provably left every
tensor the sync writes as loaded (the plugin records what processing did while vLLM loads the model),
and otherwise uses vLLM's layerwise reload, re-running vLLM's own processing on the verified bytes; a
processing that does not reproduce what vLLM's load gave is refused with the old version kept. The
report says which mode ran and why.

Engine settings
---------------
Every engine of the job is one ``LLM`` (or ``vllm serve``) whose settings mirror the job spec::

    LLM(model=...,                                  # the same architecture and sizes as job.model
        weight_transfer_config=WeightTransferConfig(backend="rlsync"),  # or worker_extension_cls=...
        tensor_parallel_size=job.inference.tp,
        pipeline_parallel_size=job.inference.pp,    # 1 unless the job sets inference.pp
        data_parallel_size=job.inference.dp,
        enable_expert_parallel=job.inference.enable_ep,
        # MoE with job.eplb.num_redundant_experts = R > 0, or job.eplb.enabled:
        enable_eplb=True,
        eplb_config={"num_redundant_experts": R},   # vLLM 0.10.x: num_redundant_experts=R; the engine end
                                                    #   counts loads itself and vLLM never rearranges
        dtype="bfloat16",                           # the plan's inference dtype (bf16 by default)
        quantization=None,                          # or "fp8" with 128x128 blocks for inference.quantization: fp8_block
        load_format="dummy",                        # optional: the first sync brings the weights
        # leave expert_placement_strategy at its default "linear" (slots of an EP rank contiguous)
    )

``engine_index`` numbers the job's engines (``job.inference.engines``): global sync rank =
trainer ranks + ``engine_index * dp * pp * tp`` + vLLM's (DP rank, PP rank, TP rank) in that order,
read from vLLM's ``parallel_state`` groups. Joining refuses (``EngineConfigError``) an engine whose
TP/PP/DP sizes, expert parallelism, redundant experts, dtype or quantization disagree with the plan,
and a plan with redundant slots or a non-identity placement when the engine's EPLB is off. Where the
EPLB maps live and how loads are read: ``sync.ends.vllm_experts``.

Parameter names: vLLM 0.11 to 0.23 (``mlp.experts.w13_weight``) and 0.24+
(``mlp.experts.routed_experts.w13_weight``); checked against vLLM 0.33.0's own model classes and
loaders by ``tests/vllm``.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

from planners.layouts import InferenceLayout
from planners.plan import SyncPlan
from planners.quant import FP8
from sync.ends.base import end_locals
from sync.ends.vllm_experts import EngineConfigError, ExpertMaps, find_eplb_maps, moe_layer_rows

__all__ = ["RLSyncWorkerExtension", "map_parameter_names", "engine_global_rank", "ParamTarget", "EngineConfigError",
           "find_eplb_maps", "check_engine_config", "moe_layer_rows"]


def engine_global_rank(num_trainer: int, layout: InferenceLayout, engine: int, dp: int, pp: int, tp: int) -> int:
    """Global sync rank of an engine worker from vLLM's own coordinates (ExternalDP x DP x PP x TP)."""
    return num_trainer + layout.grid.rank(engine=engine, dp=dp, pp=pp, tp=tp)


_ROUTED = re.compile(r"\.experts\.(w13_weight|w2_weight|w13_weight_scale_inv|w2_weight_scale_inv)$")


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


def _model_of(runner) -> torch.nn.Module:
    """The runner's model, unwrapped (CUDA-graph wrappers are no modules): ``get_model()`` when there."""
    get = getattr(runner, "get_model", None)
    return get() if callable(get) else runner.model


class ParamTarget:
    """A sync target over a live model's parameters (renamed to the plan's names, written in place).

    ``model_runner``: vLLM's model runner, where the EPLB maps live (see ``find_eplb_maps``; without
    one, the states the rlsync plugin saw vLLM fill); with EPLB off in the engine only the identity
    placement without redundant slots fits."""

    def __init__(self, plan: SyncPlan, rank: int, model: torch.nn.Module, model_runner=None) -> None:
        from sync.ends.base import check_locals, zero_unwritten

        params = dict(model.named_parameters())
        params.update({n: b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
        names = [plan.local_name[i] for i in end_locals(plan, rank)]  # not the plan's own buffers
        self.names = map_parameter_names(names, list(params))
        self.tensors = {ours: params[theirs].data for ours, theirs in self.names.items()}
        check_locals(plan, rank, self.tensors, "target")
        zero_unwritten(plan, rank, self.tensors)  # padding as vLLM's loaders leave it, whatever loaded the engine
        self.model, self.model_runner, self.rank = model, model_runner, rank
        self.experts = ExpertMaps(plan, rank, self.eplb_maps)
        self.moe_rows = self.experts.moe_rows
        if plan.placement is not None:
            self.experts.check(plan.placement_of(rank))  # fail now, before any byte moves, if the engine cannot take it

    @property
    def placement(self):
        return self.experts.placement

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def eplb_maps(self):
        """vLLM's object holding the three maps now (looked up each time: vLLM may rebuild it)."""
        return find_eplb_maps(self.model_runner, self.model)

    def check_placement(self, placement) -> None:
        """Refuse (EngineConfigError, before any byte moves) a placement the engine's EPLB maps cannot hold."""
        self.experts.check(placement)

    def set_placement(self, placement) -> None:
        """Install the EPLB maps matching the new weights, in place in vLLM's tensors."""
        self.experts.install(placement)


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
    offload = getattr(vllm_config, "offload_config", None)
    uva_gb = getattr(getattr(offload, "uva", None), "cpu_offload_gb", 0) or getattr(
        getattr(vllm_config, "cache_config", None), "cpu_offload_gb", 0) or 0
    prefetch = getattr(getattr(offload, "prefetch", None), "offload_group_size", 0) or 0
    if uva_gb > 0 or prefetch > 0:
        # offloaded weights live in host memory the transport cannot receive into, and vLLM's layerwise
        # reload does not compose with offloading
        setting = f"cpu_offload_gb={uva_gb:g}" if uva_gb > 0 else f"offload_group_size={prefetch}"
        problems.append(f"{setting}: the sync writes device-resident weights; start the engine without weight "
                        "offloading (cpu_offload_gb=0, offload_group_size=0)")
    model_config = getattr(vllm_config, "model_config", None)
    if model_config is not None:
        problems += _quantization_problems(inf.get("quantization"), getattr(model_config, "quantization", None),
                                           getattr(vllm_config, "quant_config", None))
        dtype = getattr(model_config, "dtype", None)
        # the model dtype: that of the tensors the engine holds unquantized
        dtypes = Counter(plan.local_dtype[i] for i in end_locals(plan, rank)
                         if plan.local_dtype[i] != FP8 and not plan.local_name[i].endswith("_scale_inv"))
        if isinstance(dtype, torch.dtype) and dtypes:
            from sync.tensors import TORCH_DTYPES

            want = dtypes.most_common(1)[0][0]
            if TORCH_DTYPES[want] != dtype:
                problems.append(f"dtype={str(dtype).removeprefix('torch.')}, the plan's weights are {want} (dtype={want!r})")
    if problems:
        raise EngineConfigError(f"vLLM engine settings do not fit the plan (inference rank {rank}): " + "; ".join(problems))


def _quantization_problems(job_quantization: str | None, quantization: str | None, quant_config) -> list[str]:
    """What in vLLM's quantization settings disagrees with the job's ``inference.quantization``."""
    if job_quantization is None:
        if quantization:
            return [f"quantization={quantization!r}; the job's engines hold unquantized weights (quantization=None, "
                    "or inference.quantization: fp8_block for block FP8)"]
        return []
    if quantization != "fp8":
        return [f"quantization={quantization!r}; the job's inference.quantization is fp8_block: start vLLM with "
                "quantization='fp8' and 128 x 128 weight blocks (as a block-FP8 checkpoint's config gives)"]
    block = getattr(quant_config, "weight_block_size", None) if quant_config is not None else None
    if quant_config is not None and (block is None or [int(x) for x in block] != [128, 128]):
        return [f"weight_block_size={block!r} (quantization='fp8'); the job's inference.quantization fp8_block "
                "means 128 x 128 blocks: weight_block_size=[128, 128]"]
    return []


class RLSyncWorkerExtension:
    """Methods mixed into vLLM's GPU worker (``self`` is the worker: ``self.model_runner``), for vLLM
    versions without the weight-transfer API; the same engine end as the ``rlsync`` backend."""

    def rlsync_init(self, plan_json: dict[str, Any], engine_index: int, host: str, port: int,
                    backend: str = "nccl", ipc: bool | str = False, mode: str = "auto") -> int:
        """Join the sync group; returns this worker's global sync rank. ``mode``: "auto" (in place only
        where vLLM's post-load processing was the identity, else reload), "in_place" or "reload"."""
        from sync.ends.vllm_engine import join

        runner = self.model_runner
        self._rlsync_end = join(SyncPlan.from_dict(plan_json), engine_index, host, port,
                                getattr(self, "vllm_config", None), _model_of(runner), runner, backend, ipc, mode)
        return self._rlsync_end.rank

    def rlsync_sync(self, plan_json: dict[str, Any] | None = None, version: int | None = None) -> dict[str, Any]:
        """One refresh (``version``: what the trainer syncs; by default one more than the last), with a
        new plan (e.g. a new EPLB placement) if given: receive, verify, install the placement, reset
        the expert loads. Returns the report (mode, verified, what the engine serves)."""
        end = self._rlsync_end
        end.start()
        try:
            end.receive(version, None if plan_json is None else SyncPlan.from_dict(plan_json))
        finally:
            report = end.finish()
        return report.as_dict()

    def rlsync_expert_load(self) -> dict[str, Any]:
        """The engine's expert load since the last sync: ``{"rows": MoE layers of the plan's placement this
        stage holds, "load": [rows, logical experts]}``, summed over the engine's expert-parallel ranks."""
        end = self._rlsync_end
        return {"rows": list(end.target.experts.moe_rows), "load": end.expert_load().tolist()}

    def rlsync_report(self) -> dict[str, Any] | None:
        """The last sync's report on this worker, through either route (the rlsync weight-transfer backend
        when the engine runs it, else this extension)."""
        backend = getattr(self, "weight_transfer_engine", None)
        end = getattr(backend, "end", None) or getattr(self, "_rlsync_end", None)
        return None if end is None or end.report is None else end.report.as_dict()

    @property
    def _rlsync(self):
        """The worker's sync session."""
        return self._rlsync_end.session

    @property
    def _rlsync_target(self):
        """The engine's weights as a sync target (in place: the live parameters)."""
        return self._rlsync_end.target.inner
