"""The vLLM adapter without vLLM (it cannot run here): name mapping, rank set-up through stub vLLM
modules, the engine-settings checks, EPLB maps written in place into vLLM-shaped state objects
(single-state and per-model layouts), and one real sync through the worker extension."""

from __future__ import annotations

import itertools
import sys
import types
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from planners import JobSpec, build_plan
from planners.eplb_stats import synthetic_load
from sync.endpoints import SyntheticSource, check_locals
from sync.engines import vllm as adapter
from sync.engines.vllm import (EngineConfigError, ParamTarget, RLSyncWorkerExtension, engine_global_rank,
                               map_parameter_names, moe_layer_rows)
from sync.tensors import TORCH_DTYPES, as_bits
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


# -- names and ranks -------------------------------------------------------------------------------

@pytest.mark.parametrize("routed", [False, True])
def test_targets_map_onto_vllm_parameters_of_either_naming(routed):
    job = JobSpec.from_dict(JOB)
    plan = build_plan(job)
    rank = plan.num_trainer + 3
    model = fake_vllm_model(plan, rank, routed)
    eplb = single_state(len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts)
    target = ParamTarget(plan, rank, model, FakeRunner(model, eplb))
    check_locals(plan, rank, target.local_tensors(), "target")
    assert any("routed_experts" in v for v in target.names.values()) == routed


def test_missing_parameters_are_listed():
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts.w2_weight"):
        map_parameter_names(["model.layers.0.mlp.experts.w2_weight"], ["model.layers.0.mlp.gate.weight"])


def test_global_ranks_follow_vllm_order():
    job = JobSpec.from_dict(JOB)
    lay, T = job.inference, job.trainer.world_size
    seen = set()
    for engine, dp, tp in itertools.product(range(2), range(2), range(2)):
        rank = engine_global_rank(T, lay, engine, dp, 0, tp)
        c = lay.coords(rank - T)
        assert (c.engine, c.dp, c.pp, c.tp) == (engine, dp, 0, tp)
        seen.add(rank)
    assert seen == set(range(T, T + lay.world_size))


# -- EPLB maps -------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["single", "per_model"])
def test_set_placement_writes_all_three_maps_in_place(layout):
    job, plan = rebalanced_plan()
    rank = plan.num_trainer + 5
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, rank, routed=False)
    state = single_state(L, E, P) if layout == "single" else per_model_state(model, L, E, P)
    holder = state if layout == "single" else state.model_states["main-hash"]
    drafter_before = None if layout == "single" else {
        k: v.clone() for k, v in vars(state.model_states["drafter-hash"]).items() if isinstance(v, torch.Tensor)}
    tensors = (holder.physical_to_logical_map, holder.logical_to_physical_map, holder.logical_replica_count)
    views = layer_views(holder, L)
    target = ParamTarget(plan, rank, model, model_runner=FakeRunner(model, state))

    target.set_placement(plan.placement)

    p2l, l2p, cnt = expected_maps(plan.placement.phy2log, E)
    assert (holder.physical_to_logical_map, holder.logical_to_physical_map, holder.logical_replica_count) == tensors
    for got, want in zip(tensors, (p2l, l2p, cnt)):
        assert got.dtype == torch.int64 and tuple(got.shape) == want.shape
        np.testing.assert_array_equal(got.numpy(), want)
    for i, (l2p_row, cnt_row) in enumerate(views):  # the layers route through the new maps
        np.testing.assert_array_equal(l2p_row.numpy(), l2p[i])
        np.testing.assert_array_equal(cnt_row.numpy(), cnt[i])
    assert (cnt.sum(axis=1) == P).all() and (cnt > 1).any()
    if drafter_before is not None:  # another model's state is left alone
        for k, v in drafter_before.items():
            assert torch.equal(getattr(state.model_states["drafter-hash"], k), v), k
    assert target.placement is plan.placement

    # back to vLLM's initial placement: replicas beyond the new counts are -1 again
    from planners.placement import Placement

    target.set_placement(Placement.identity(L, E, P))
    for got, want in zip(tensors, initial_maps(L, E, P).values()):
        assert torch.equal(got, want)


def test_maps_keep_vllm_dtypes_and_cover_the_pipeline_stage_only():
    job_dict = {**EPLB_JOB, "inference": dict(tp=2, pp=2, dp=2, enable_ep=True, engines=1)}
    job, plan = rebalanced_plan(job_dict)
    E, P = job.model.num_experts, job.num_physical_experts
    rank = plan.num_trainer + job.inference.grid.rank(engine=0, dp=1, pp=1, tp=0)
    assert moe_layer_rows(plan, rank) == [2, 3]
    model = fake_vllm_model(plan, rank, routed=True)
    maps = initial_maps(2, E, P)
    state = SimpleNamespace(physical_to_logical_map=maps["physical_to_logical_map"].to(torch.int32),
                            logical_to_physical_map=maps["logical_to_physical_map"].to(torch.int32),
                            logical_replica_count=maps["logical_replica_count"])
    ParamTarget(plan, rank, model, FakeRunner(model, state)).set_placement(plan.placement)
    p2l, l2p, cnt = expected_maps(plan.placement.phy2log[2:], E)
    assert state.physical_to_logical_map.dtype == state.logical_to_physical_map.dtype == torch.int32
    np.testing.assert_array_equal(state.physical_to_logical_map.numpy(), p2l)
    np.testing.assert_array_equal(state.logical_to_physical_map.numpy(), l2p)
    np.testing.assert_array_equal(state.logical_replica_count.numpy(), cnt)


def test_model_runner_v2_keeps_the_state_on_its_eplb_controller():
    job, plan = rebalanced_plan()
    rank = plan.num_trainer
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, rank, routed=True)
    runner = SimpleNamespace(model=model, eplb=SimpleNamespace(state=per_model_state(model.model, L, E, P)))
    ParamTarget(plan, rank, model, runner).set_placement(plan.placement)
    got = runner.eplb.state.model_states["main-hash"].physical_to_logical_map
    np.testing.assert_array_equal(got.numpy(), plan.placement.phy2log)


def test_engine_without_eplb_refuses_rebalanced_or_redundant_placements_naming_the_setting():
    _, plan = rebalanced_plan()
    rank = plan.num_trainer + 1
    model = fake_vllm_model(plan, rank, routed=False)
    with pytest.raises(EngineConfigError, match="enable_eplb=True"):
        ParamTarget(plan, rank, model, FakeRunner(model, None))
    plan = build_plan(JobSpec.from_dict(JOB))  # identity placement, but 4 redundant slots
    model = fake_vllm_model(plan, rank, routed=False)
    with pytest.raises(EngineConfigError, match="num_redundant_experts': 4"):
        ParamTarget(plan, rank, model, FakeRunner(model, None))
    plain = {**JOB, "eplb": {}}  # no redundant slots, identity placement: no EPLB needed
    plan = build_plan(JobSpec.from_dict(plain))
    model = fake_vllm_model(plan, rank, routed=False)
    ParamTarget(plan, rank, model, FakeRunner(model, None)).set_placement(plan.placement)


def test_engine_with_other_redundant_slots_is_refused():
    job, plan = rebalanced_plan()
    rank = plan.num_trainer
    model = fake_vllm_model(plan, rank, routed=False)
    state = single_state(len(job.model.moe_layers), job.model.num_experts, job.model.num_experts + 8)
    with pytest.raises(EngineConfigError, match="12 physical expert slots|num_redundant_experts': 4"):
        ParamTarget(plan, rank, model, FakeRunner(model, state))


# -- rlsync_init through stub vLLM modules ---------------------------------------------------------

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

    def __init__(self, model, eplb_state=None, **settings):
        self.model_runner = FakeRunner(model, eplb_state)
        parallel = dict(tensor_parallel_size=2, pipeline_parallel_size=1, data_parallel_size=2,
                        enable_expert_parallel=True, enable_eplb=eplb_state is not None,
                        eplb_config=SimpleNamespace(num_redundant_experts=4), expert_placement_strategy="linear")
        model_cfg = dict(dtype=torch.bfloat16, quantization=None)
        parallel.update({k: v for k, v in settings.items() if k not in model_cfg})
        model_cfg.update({k: v for k, v in settings.items() if k in model_cfg})
        self.vllm_config = SimpleNamespace(parallel_config=SimpleNamespace(**parallel),
                                           model_config=SimpleNamespace(**model_cfg))


def record_transport(monkeypatch) -> list:
    """No network: the sync group is a transport object that is never used for traffic here."""
    calls = []

    def fake(rank, world_size, host, port, timeout_s, backend="gloo", store_on_rank0=True):
        calls.append((rank, world_size, host, port, timeout_s, backend))
        return Transport(group=None, rank=rank, size=world_size, store=None, timeout_s=timeout_s)

    monkeypatch.setattr("sync.transport.standalone_transport", fake)
    return calls


def test_rlsync_init_joins_as_the_rank_of_vllms_coordinates_with_the_models_parameters(monkeypatch):
    job, plan = rebalanced_plan()
    engine, dp, tp = 1, 1, 0
    want = plan.num_trainer + job.inference.grid.rank(engine=engine, dp=dp, pp=0, tp=tp)
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, want, routed=True)
    worker = FakeWorker(model, per_model_state(model, L, E, P))
    stub_vllm(monkeypatch, tp=(tp, 2), dp=(dp, 2))
    calls = record_transport(monkeypatch)

    rank = worker.rlsync_init(plan.to_dict(), engine, "10.0.0.1", 29555, 30.0, "gloo")

    assert rank == want == plan.num_trainer + 6
    assert calls == [(want, plan.num_ranks, "10.0.0.1", 29555, 30.0, "gloo")]
    assert worker._rlsync.rank == want and worker._rlsync.timeout_s == 30.0
    target = worker._rlsync_target
    params = dict(model.named_parameters())
    for ours, theirs in target.names.items():  # written in place: the model's own storage
        assert target.tensors[ours].data_ptr() == params[theirs].data_ptr()
    assert set(target.names) == {plan.local_name[i] for i in plan.locals_of(want)}
    assert target.moe_rows == list(range(L))
    assert target.eplb_maps() is worker.model_runner.eplb_state.model_states["main-hash"]


@pytest.mark.parametrize("setting, message", [
    (dict(tensor_parallel_size=4), "tensor_parallel_size=4"),
    (dict(enable_expert_parallel=False), "enable_expert_parallel=False"),
    (dict(eplb_config=SimpleNamespace(num_redundant_experts=2)), "num_redundant_experts=2"),
    (dict(dtype=torch.float16), "dtype=float16"),
    (dict(quantization="fp8"), "quantization='fp8'"),
    (dict(expert_placement_strategy="round_robin"), "expert_placement_strategy='round_robin'"),
])
def test_rlsync_init_refuses_engine_settings_that_do_not_fit_the_job(monkeypatch, setting, message):
    job, plan = rebalanced_plan()
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, plan.num_trainer, routed=False)
    worker = FakeWorker(model, single_state(L, E, P), **setting)
    stub_vllm(monkeypatch, tp=(0, setting.get("tensor_parallel_size", 2)))
    calls = record_transport(monkeypatch)
    with pytest.raises(EngineConfigError, match=message):
        worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, 5.0, "gloo")
    assert calls == []  # refused before joining the group


@pytest.mark.parametrize("redundant", [4, 0])
def test_rlsync_init_without_eplb_in_the_engine_names_enable_eplb(monkeypatch, redundant):
    job_dict = {**EPLB_JOB, "eplb": dict(enabled=True, num_redundant_experts=redundant)}
    plan = build_plan(JobSpec.from_dict(job_dict))  # vLLM's initial placement until loads come in
    worker = FakeWorker(fake_vllm_model(plan, plan.num_trainer, routed=False), None,
                        eplb_config=SimpleNamespace(num_redundant_experts=redundant))
    stub_vllm(monkeypatch)
    record_transport(monkeypatch)
    with pytest.raises(EngineConfigError, match="enable_eplb=True"):
        worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, 5.0, "gloo")


# -- one real sync through the extension (gloo, local processes) ------------------------------------

SYNC_JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1),
                inference=dict(tp=1, dp=2, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=4),
                deployment=dict(gpus_per_node=2))


def _sync_rank(rank: int, plan_json: dict, port: int, version: int):
    from sync.executor import PlanExecutor
    from sync.transport import standalone_transport

    plan = adapter.SyncPlan.from_dict(plan_json)
    if rank < plan.num_trainer:
        transport = standalone_transport(rank, plan.num_ranks, "127.0.0.1", port, 60, store_on_rank0=False)
        stats = PlanExecutor(plan, rank, transport, timeout_s=60).sync(  # buckets as the extension's
            source=SyntheticSource(plan, rank, version=version), target=None)
        return {"verified": stats.verified}
    mp = pytest.MonkeyPatch()
    coords = JobSpec.from_dict(SYNC_JOB).inference.coords(rank - plan.num_trainer)
    stub_vllm(mp, tp=(coords.tp, 1), dp=(coords.dp, 2))
    L, E, P = 4, 8, 12
    model = fake_vllm_model(plan, rank, routed=True)
    worker = FakeWorker(model, per_model_state(model, L, E, P), tensor_parallel_size=1)
    holder = worker.model_runner.eplb_state.model_states["main-hash"]
    views = layer_views(holder, L)
    assert worker.rlsync_init(plan_json, 0, "127.0.0.1", port, 60, "gloo") == rank
    stats = worker.rlsync_sync()
    return {"stats": stats,
            "tensors": {ours: as_bits(t).numpy() for ours, t in worker._rlsync_target.tensors.items()},
            "maps": [t.numpy() for t in (holder.physical_to_logical_map, holder.logical_to_physical_map,
                                         holder.logical_replica_count)],
            "views": [(a.numpy(), b.numpy()) for a, b in views]}


def test_a_sync_through_the_extension_fills_the_model_and_installs_the_placement():
    from sync.launch import host_store, spawn_ranks
    from test_executor import expected_engine

    job, plan = rebalanced_plan(SYNC_JOB)
    store = host_store()
    results, _ = spawn_ranks(plan.num_ranks, _sync_rank, (plan.to_dict(), store.port, 2), timeout_s=120)
    want = expected_engine(job, plan, 2)
    p2l, l2p, cnt = expected_maps(plan.placement.phy2log, job.model.num_experts)
    for rank in plan.inference_ranks:
        got = results[rank]
        assert got["stats"]["verified"] and got["stats"]["rank"] == rank and not got["stats"]["mismatched"]
        assert sorted(got["tensors"]) == sorted(want[rank])
        for name, w in want[rank].items():
            np.testing.assert_array_equal(got["tensors"][name], w, err_msg=f"rank {rank} {name}")
        for have, expected in zip(got["maps"], (p2l, l2p, cnt)):
            np.testing.assert_array_equal(have, expected)
        for i, (l2p_row, cnt_row) in enumerate(got["views"]):
            np.testing.assert_array_equal(l2p_row, l2p[i])
            np.testing.assert_array_equal(cnt_row, cnt[i])
    assert results[0]["verified"]


def test_a_new_plan_the_engine_cannot_take_is_refused_before_any_byte_moves(monkeypatch):
    job, plan = rebalanced_plan()
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, plan.num_trainer, routed=False)
    worker = FakeWorker(model, single_state(L, E, P))
    stub_vllm(monkeypatch)
    record_transport(monkeypatch)
    worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, 5.0, "gloo")
    executor = worker._rlsync
    _, wider = rebalanced_plan({**EPLB_JOB, "eplb": dict(enabled=True, num_redundant_experts=8)})
    with pytest.raises(EngineConfigError, match="vLLM has 12 physical expert slots per layer, the plan 16"):
        worker.rlsync_sync(wider.to_dict())
    assert worker._rlsync is executor
