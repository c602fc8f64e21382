"""vLLM as the adapter sees it, without vLLM (its engine cannot run here): stub modules for
``vllm.distributed.parallel_state``, a worker with ``model_runner``/``vllm_config``, models named and
shaped as vLLM's, EPLB states of both layouts, and a transport that never carries traffic."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import numpy as np
import torch

from planners import JobSpec, build_plan
from planners.eplb.stats import synthetic_load
from sync.ends.vllm import RLSyncWorkerExtension
from sync.ends.vllm_processing import RECORDS, ProcessingRecord
from sync.tensors import TORCH_DTYPES
from sync.transport import Transport

JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
           inference=dict(tp=2, dp=2, enable_ep=True, engines=2), eplb=dict(num_redundant_experts=4))
EPLB_JOB = {**JOB, "eplb": dict(enabled=True, num_redundant_experts=4)}
VLLM_REPLICA_CAPACITY = 1024  # vLLM sizes logical_to_physical_map's last axis for up to 1023 redundant replicas


def rebalanced_plan(job_dict=EPLB_JOB, seed=3):
    job = JobSpec.from_dict(job_dict)
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=seed)
    plan = build_plan(job, load)
    phy2log = plan.placement.phy2log
    assert not np.array_equal(phy2log, np.tile(np.arange(phy2log.shape[1]) % job.model.num_experts, (len(phy2log), 1)))
    return job, plan


def fake_vllm_model(plan, rank, routed: bool) -> torch.nn.Module:
    """A module whose parameters are named and shaped as vLLM's would be for this rank."""
    model = torch.nn.Module()
    for i in plan.locals_of(rank):
        name = plan.local_name[i]
        if routed:
            name = name.replace(".experts.w13_weight", ".experts.routed_experts.w13_weight")
            name = name.replace(".experts.w2_weight", ".experts.routed_experts.w2_weight")
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(leaf, torch.nn.Parameter(
            torch.zeros(plan.local_shape[i], dtype=TORCH_DTYPES[plan.local_dtype[i]]), requires_grad=False))
    return model


def initial_maps(layers: int, experts: int, slots: int) -> dict[str, torch.Tensor]:
    """vLLM's maps at load time: slot s serves expert s % experts; int64, -1 padded replica lists."""
    p2l = torch.tensor([s % experts for s in range(slots)]).repeat(layers, 1)
    l2p = torch.full((layers, experts, VLLM_REPLICA_CAPACITY), -1)
    cnt = torch.zeros((layers, experts), dtype=torch.long)
    for s in range(slots):
        e = s % experts
        l2p[:, e, cnt[0, e]] = s
        cnt[:, e] += 1
    return dict(physical_to_logical_map=p2l, logical_to_physical_map=l2p, logical_replica_count=cnt)


def expected_maps(phy2log: np.ndarray, experts: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Oracle: expert -> its slots in ascending order, -1 padded to vLLM's capacity; replica counts."""
    L, P = phy2log.shape
    l2p = np.full((L, experts, VLLM_REPLICA_CAPACITY), -1, dtype=np.int64)
    cnt = np.zeros((L, experts), dtype=np.int64)
    for layer in range(L):
        for slot in range(P):
            e = phy2log[layer, slot]
            l2p[layer, e, cnt[layer, e]] = slot
            cnt[layer, e] += 1
    return phy2log, l2p, cnt


class FakeRunner:
    """vLLM's GPU model runner as the adapter sees it: ``get_model()`` and ``eplb_state``."""

    def __init__(self, model, eplb_state=None):
        self.model, self.eplb_state = model, eplb_state

    def get_model(self):
        return self.model


def single_state(layers, experts, slots):
    """The older layout: the three maps on the EPLB state itself."""
    return SimpleNamespace(**initial_maps(layers, experts, slots), expert_load_pass=torch.zeros(layers, slots))


def per_model_state(model, layers, experts, slots):
    """The newer layout: one state per model (here the main model and an MoE drafter)."""
    drafter = torch.nn.Linear(2, 2)
    return SimpleNamespace(model_states={
        "drafter-hash": SimpleNamespace(**initial_maps(1, experts, slots), model=drafter),
        "main-hash": SimpleNamespace(**initial_maps(layers, experts, slots), model=model),
    })


def layer_views(holder, layers):
    """What each FusedMoE layer keeps (``set_eplb_state``): row views of two of the maps."""
    return [(holder.logical_to_physical_map[i], holder.logical_replica_count[i]) for i in range(layers)]


def stub_vllm(monkeypatch, *, tp=(0, 2), pp=(0, 1), dp=(0, 2)) -> None:
    """Put the pieces of vLLM that ``rlsync_init`` imports into sys.modules: (rank, size) per group."""
    def group(rank_size):
        return lambda: SimpleNamespace(rank_in_group=rank_size[0], world_size=rank_size[1])

    ps = types.ModuleType("vllm.distributed.parallel_state")
    ps.get_tp_group, ps.get_pp_group, ps.get_dp_group = group(tp), group(pp), group(dp)
    dist_mod = types.ModuleType("vllm.distributed")
    dist_mod.parallel_state = ps
    root = types.ModuleType("vllm")
    root.distributed = dist_mod
    for name, mod in (("vllm", root), ("vllm.distributed", dist_mod), ("vllm.distributed.parallel_state", ps)):
        monkeypatch.setitem(sys.modules, name, mod)


class FakeWorker(RLSyncWorkerExtension):
    """vLLM's GPU worker as the extension sees it: ``model_runner`` and ``vllm_config``."""

    def __init__(self, model, eplb_state=None, processing: ProcessingRecord | None = ProcessingRecord(), **settings):
        """``processing``: what this fake vLLM's post-load processing did (by default: nothing at all)."""
        self.model_runner = FakeRunner(model, eplb_state)
        if processing is not None:
            RECORDS[model] = processing
        parallel = dict(tensor_parallel_size=2, pipeline_parallel_size=1, data_parallel_size=2,
                        enable_expert_parallel=True, enable_eplb=eplb_state is not None,
                        eplb_config=SimpleNamespace(num_redundant_experts=4), expert_placement_strategy="linear")
        model_cfg = dict(dtype=torch.bfloat16, quantization=None)
        quant_config = settings.pop("quant_config", None)
        parallel.update({k: v for k, v in settings.items() if k not in model_cfg})
        model_cfg.update({k: v for k, v in settings.items() if k in model_cfg})
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(**parallel),
                                           model_config=SimpleNamespace(**model_cfg), quant_config=quant_config)


def record_transport(monkeypatch) -> list:
    """No network: the sync group is a transport object that is never used for traffic here."""
    calls = []

    def fake(rank, world_size, host, port, timeout_s, backend="gloo", store_on_rank0=True):
        calls.append((rank, world_size, host, port, timeout_s, backend))
        return Transport(group=None, rank=rank, size=world_size, store=None, timeout_s=timeout_s)

    monkeypatch.setattr("sync.transport.standalone_transport", fake)
    return calls
