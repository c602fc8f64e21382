"""The vLLM adapter without vLLM (it cannot run here): name mapping, rank set-up through stub vLLM
modules, the engine-settings checks, EPLB maps written in place into vLLM-shaped state objects
(single-state and per-model layouts). One real sync through the extension: tests/integration."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fake_vllm import (EPLB_JOB, JOB, FakeRunner, FakeWorker, expected_maps, fake_vllm_model, initial_maps, layer_views,
                       per_model_state, rebalanced_plan, record_transport, single_state, stub_vllm)
from planners import JobSpec, build_plan
from sync.ends.base import check_locals
from sync.ends.vllm import EngineConfigError, ParamTarget, engine_global_rank, map_parameter_names, moe_layer_rows

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
    from planners.eplb.placement import Placement

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

def test_rlsync_init_joins_as_the_rank_of_vllms_coordinates_with_the_models_parameters(monkeypatch):
    job, plan = rebalanced_plan({**EPLB_JOB, "sync": dict(timeout_s=30.0)})
    engine, dp, tp = 1, 1, 0
    want = plan.num_trainer + job.inference.grid.rank(engine=engine, dp=dp, pp=0, tp=tp)
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, want, routed=True)
    worker = FakeWorker(model, per_model_state(model, L, E, P))
    stub_vllm(monkeypatch, tp=(tp, 2), dp=(dp, 2))
    calls = record_transport(monkeypatch)

    rank = worker.rlsync_init(plan.to_dict(), engine, "10.0.0.1", 29555, "gloo")

    assert rank == want == plan.num_trainer + 6
    assert calls == [(want, plan.num_ranks, "10.0.0.1", 29555, 30.0, "gloo")]
    assert worker._rlsync.ranks == [want] and worker._rlsync.executor.timeout_s == 30.0  # the job's timeout
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
        worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, "gloo")
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
        worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, "gloo")


def test_a_new_plan_the_engine_cannot_take_is_refused_before_any_byte_moves(monkeypatch):
    job, plan = rebalanced_plan()
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, plan.num_trainer, routed=False)
    worker = FakeWorker(model, single_state(L, E, P))
    stub_vllm(monkeypatch)
    record_transport(monkeypatch)
    worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, "gloo")
    executor, before = worker._rlsync.executor, worker._rlsync.plan
    _, wider = rebalanced_plan({**EPLB_JOB, "eplb": dict(enabled=True, num_redundant_experts=8)})
    with pytest.raises(EngineConfigError, match="vLLM has 12 physical expert slots per layer, the plan 16"):
        worker.rlsync_sync(wider.to_dict())
    assert worker._rlsync.executor is executor and worker._rlsync.plan is before


def test_the_engine_takes_every_sync_setting_from_the_plan_as_the_trainer_does(monkeypatch):
    """The extension and a trainer rank open their ranks from the same job: the same buckets (a
    non-default bucket_mb), and the engine versioned with the job's staging."""
    from sync.ends.synthetic import SyntheticSource
    from sync.session import Session
    from sync.ends.versioned import VersionedTarget

    job, plan = rebalanced_plan({**EPLB_JOB, "sync": dict(bucket_mb=0.002, staging=True, timeout_s=7.0)})
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    engine = plan.num_trainer
    worker = FakeWorker(fake_vllm_model(plan, engine, routed=True), single_state(L, E, P))
    stub_vllm(monkeypatch)
    calls = record_transport(monkeypatch)
    worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, "gloo")
    from sync.transport import standalone_transport  # the stub installed by record_transport

    trainer = Session.open(plan, 0, standalone_transport(0, plan.num_ranks, "127.0.0.1", 1, 7.0),
                           source=SyntheticSource(plan, 0))

    def between(executor):
        return [(b.stage, b.index, b.chunk.tolist(), b.lo.tolist(), b.hi.tolist(), b.offset.tolist(), b.nbytes)
                for b in executor.buckets if b.src == 0 and b.dst == engine]

    ours = between(worker._rlsync.executor)
    assert ours and ours == between(trainer.executor)
    assert len(ours) > len(between(Session.open(plan, 0, trainer.transport, settings=job.sync.model_copy(
        update=dict(bucket_mb=256.0))).executor))  # the job's small buckets, not the default 256 MB
    assert calls[0][4] == 7.0  # the job's timeout
    assert worker._rlsync_end.mode == "in_place"  # the fake vLLM's processing touched nothing
    target = worker._rlsync.target.versioned
    assert isinstance(target, VersionedTarget) and target.staging and target.staging_bytes > 0


@pytest.mark.parametrize("offload, setting", [(dict(uva=SimpleNamespace(cpu_offload_gb=4.0)), "cpu_offload_gb=4"),
                                              (dict(prefetch=SimpleNamespace(offload_group_size=2)),
                                               "offload_group_size=2")])
def test_weight_offloading_is_refused_naming_the_setting(offload, setting):
    from sync.ends.vllm import check_engine_config

    plan = build_plan(JobSpec.from_dict(JOB))
    config = SimpleNamespace(offload_config=SimpleNamespace(**offload))
    with pytest.raises(EngineConfigError, match=setting):
        check_engine_config(plan, plan.num_trainer, config)
    check_engine_config(plan, plan.num_trainer, SimpleNamespace(offload_config=SimpleNamespace()))


def test_an_fp8_job_takes_only_a_block_fp8_engine(monkeypatch):
    """inference.quantization: fp8_block: vLLM must run quantization='fp8' with 128 x 128 blocks; its FP8
    weights and their weight_scale_inv are bound in place, the plan's own buffers are not asked of it."""
    from fp8_cases import CASES

    job = JobSpec.from_dict(CASES["mla tp2"])
    plan = build_plan(job)
    rank = plan.num_trainer
    model = fake_vllm_model(plan, rank, routed=False)
    for name, block in (("main", [128, 128]), (None, None), ("fp8", [64, 64])):
        settings = dict(tensor_parallel_size=2, data_parallel_size=1, enable_eplb=False)
        if name == "main":
            settings.update(quantization="fp8", quant_config=SimpleNamespace(weight_block_size=block))
        elif name == "fp8":
            settings.update(quantization="fp8", quant_config=SimpleNamespace(weight_block_size=block))
        worker = FakeWorker(model, None, **settings)
        stub_vllm(monkeypatch, tp=(0, 2), dp=(0, 1))
        record_transport(monkeypatch)
        if name == "main":
            worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, "gloo")
            target = worker._rlsync_target
            assert "model.layers.0.self_attn.q_b_proj.weight_scale_inv" in target.names
            assert not any(":" in n for n in target.names)
        else:
            with pytest.raises(EngineConfigError, match="weight_block_size" if block else "quantization=None"):
                worker.rlsync_init(plan.to_dict(), 0, "127.0.0.1", 1, "gloo")
