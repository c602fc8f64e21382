"""The engine end's decisions without vLLM: what vLLM's post-load processing did (from snapshots), which
mode follows, padding zeroed as vLLM's loaders leave it, expert loads counted on an EPLB state, and the
placement held back until the weights are committed. vLLM's own code: tests/vllm."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fake_vllm import JOB, FakeRunner, fake_vllm_model, per_model_state, rebalanced_plan
from planners import JobSpec, build_plan
from sync.ends.base import zero_unwritten
from sync.ends.vllm_engine import EngineEnd, SyncReport, choose_mode
from sync.ends.vllm_experts import EngineConfigError, LoadCounter
from sync.ends.vllm_processing import RECORDS, ProcessingRecord, compare, snapshot


def model_with(**tensors) -> torch.nn.Module:
    model = torch.nn.Module()
    for name, t in tensors.items():
        layer = torch.nn.Module()
        layer.register_parameter("weight", torch.nn.Parameter(t.clone(), requires_grad=False))
        model.add_module(name, layer)
    return model


def processed(model, process) -> ProcessingRecord:
    before = snapshot(model)
    process(model)
    return compare(before, snapshot(model))


def test_processing_that_leaves_the_weights_is_the_identity_even_in_fresh_storage():
    model = model_with(a=torch.randn(4, 3), b=torch.randn(2, 2))
    record = processed(model, lambda m: setattr(m.a, "weight", torch.nn.Parameter(m.a.weight.data.clone())))
    assert record.changed == {}


@pytest.mark.parametrize("process, expect", [
    (lambda m: m.a.weight.data.copy_(m.a.weight.data.flip(0)), "re-laid (same shape, other values)"),
    (lambda m: setattr(m.a, "weight", torch.nn.Parameter(torch.empty(0))), "weight float32[4, 3] became float32[0]"),
    (lambda m: setattr(m.a, "weight", torch.nn.Parameter(m.a.weight.data.t())), "weight float32[4, 3] became"),
    (lambda m: setattr(m.a, "weight", torch.nn.Parameter(m.a.weight.data.t().contiguous().t())), "re-strided"),
    (lambda m: setattr(m.a, "weight", torch.nn.Parameter(m.a.weight.data.double())), "became float64"),
])
def test_processing_that_relays_a_weight_is_named(process, expect):
    record = processed(model_with(a=torch.randn(4, 3), b=torch.randn(2, 2)), process)
    assert list(record.changed) == ["a"] and expect in record.changed["a"]
    assert record.blocking({"b"}) == record.changed  # not a scalar: it may feed anything


def test_a_packed_copy_hidden_in_a_closure_or_a_kernel_object_is_found():
    model = model_with(a=torch.randn(4, 3))

    def pack(m):
        packed = m.a.weight.data.t().contiguous()
        m.a.cpu_linear = lambda x, weight, bias: x @ packed
        m.a.quant_method = SimpleNamespace(kernel=SimpleNamespace(workspace=torch.zeros(8)))

    record = processed(model, pack)
    assert "derived tensors" in record.changed["a"]
    assert "cpu_linear.closure0" in record.changed["a"] and "quant_method.kernel.workspace" in record.changed["a"]
    # a native kernel handle in a closure (oneDNN's, holding its own copy of the weights) cannot be looked into
    handle = model_with(a=torch.randn(4, 3))
    native = torch.Generator()  # an object of C++ with nothing to look into, as such a handle is
    record = processed(handle, lambda m: setattr(m.a, "cpu_linear", lambda x, weight, bias: (native, x)))
    assert "cpu_linear.closure0" in record.changed["a"]
    # a closure over the layer's own weight derives nothing
    plain = model_with(a=torch.randn(4, 3))
    assert processed(plain, lambda m: setattr(m.a, "cpu_linear", lambda x, w=m.a.weight: x @ w.t())).changed == {}


def test_scalar_resets_elsewhere_do_not_block_in_place_but_do_in_the_written_modules():
    model = model_with(a=torch.randn(4, 3))
    attn = torch.nn.Module()
    attn.register_parameter("_k_scale", torch.nn.Parameter(torch.tensor(0.37), requires_grad=False))
    model.add_module("attn", attn)
    record = processed(model, lambda m: m.attn._k_scale.data.fill_(1.0))
    assert record.scalars_only == {"attn"}
    assert record.blocking({"a"}) == {}
    assert "attn" in record.blocking({"attn"})


def test_mode_follows_what_processing_did_and_in_place_is_never_assumed():
    model = model_with(a=torch.randn(2, 2))
    assert choose_mode(model, {"a"})[0] == "reload"  # nobody watched it load
    with pytest.raises(EngineConfigError, match="nothing recorded"):
        choose_mode(model, {"a"}, "in_place")
    RECORDS[model] = ProcessingRecord()
    assert choose_mode(model, {"a"}) == ("in_place", "vLLM's post-load processing left every tensor the sync writes "
                                                     "as loaded")
    RECORDS[model] = ProcessingRecord({"a": "weight re-laid (same shape, other values)"}, relaid={"a"})
    mode, why = choose_mode(model, {"a"})
    assert mode == "reload" and "a: weight re-laid" in why
    with pytest.raises(EngineConfigError, match="in_place' asked for.*a: weight re-laid"):
        choose_mode(model, {"a"}, "in_place")
    assert choose_mode(model, None)[0] == "reload"  # a plan tensor processing dropped: nothing to write in place
    with pytest.raises(EngineConfigError, match="not one of"):
        choose_mode(model, {"a"}, "inplace")


def test_vocabulary_padding_is_zeroed_and_nothing_else_touched():
    plan = build_plan(JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1),
                                             inference=dict(tp=2))))
    rank = plan.num_trainer + 1
    tensors = {plan.local_name[i]: torch.randn(tuple(plan.local_shape[i])).to(torch.bfloat16)
               for i in plan.locals_of(rank)}
    before = {k: v.clone() for k, v in tensors.items()}
    zeroed = zero_unwritten(plan, rank, tensors)
    assert sorted(zeroed) == ["lm_head.weight", "model.embed_tokens.weight"]
    vocab = JobSpec.from_dict(JOB).model.config["vocab_size"]  # 250, padded to 256: rank 1 holds rows 128..255
    for name in zeroed:
        real = vocab - 128
        assert torch.equal(tensors[name][:real], before[name][:real])
        assert not tensors[name][real:].any()
    for name in set(tensors) - set(zeroed):
        assert torch.equal(tensors[name], before[name])


def fake_eplb_state(layers=2, slots=6, window=3):
    model_state = SimpleNamespace(expert_load_pass=torch.zeros(layers, slots, dtype=torch.int32),
                                  expert_load_window=torch.zeros(window, layers, slots, dtype=torch.int32))
    calls = []
    state = SimpleNamespace(model_states={"main": model_state}, should_record_tensor=torch.tensor(False),
                            expert_load_window_step=2, step=lambda *a: calls.append(a))
    return state, model_state, calls


def test_loads_are_counted_pass_by_pass_and_vllm_never_rearranges():
    state, model_state, vllm_calls = fake_eplb_state()
    model_state.expert_load_window[1].fill_(2)  # what vLLM had recorded before the counter took over
    counter = LoadCounter.on(state)
    assert LoadCounter.on(state) is counter and bool(state.should_record_tensor)  # the layers always record
    for k in range(4):
        model_state.expert_load_pass.fill_(k + 1)
        state.step()
    model_state.expert_load_pass.fill_(100)
    state.step(is_dummy=True)  # a dummy pass counts nothing
    state.step(False, True)  # profiling still reaches vLLM
    assert vllm_calls == [(False, True, False)]
    assert torch.equal(counter.physical(model_state), torch.full((2, 6), 1 + 2 + 3 + 4 + 2, dtype=torch.int64))
    counter.reset(model_state)
    assert not counter.physical(model_state).any() and state.expert_load_window_step == 0


def test_the_placement_waits_for_committed_weights_and_then_resets_the_loads():
    job, plan = rebalanced_plan()
    rank = plan.num_trainer
    L, E, P = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
    model = fake_vllm_model(plan, rank, routed=True)
    eplb = per_model_state(model, L, E, P)
    holder = eplb.model_states["main-hash"]
    holder.expert_load_pass = torch.ones(L, P, dtype=torch.int32)
    RECORDS[model] = ProcessingRecord()
    end = EngineEnd(plan, rank, model, runner=FakeRunner(model, eplb), settings=job.sync)
    initial = holder.physical_to_logical_map.clone()

    def sync(version, verified):
        end.start()
        end.target.begin(version)
        end.target.set_placement(plan.placement)  # what the executor does once verified
        if verified:
            end.target.commit(version)
        else:
            end.target.abort("verification failed", [])
        end.report = SyncReport(rank, end.mode, end.mode_reason, version, verified)
        return end.finish()

    sync(1, verified=False)
    assert torch.equal(holder.physical_to_logical_map, initial) and holder.expert_load_pass.all()
    report = sync(2, verified=True)
    np.testing.assert_array_equal(holder.physical_to_logical_map.numpy(), plan.placement.phy2log)
    assert report.placement_installed and report.placement_moved and not holder.expert_load_pass.any()


def test_a_failed_update_ends_the_round_as_vllms_worker_does():
    """vLLM's worker ends an update whose ``update_weights`` raised and sends no ``finish_weight_update``:
    the next ``start_weight_update`` must open a new round, and the held-back placement is dropped."""
    from planners.errors import SyncError

    job, plan = rebalanced_plan()
    rank = plan.num_trainer
    model = fake_vllm_model(plan, rank, routed=True)
    eplb = per_model_state(model, len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts)
    RECORDS[model] = ProcessingRecord()
    end = EngineEnd(plan, rank, model, runner=FakeRunner(model, eplb), settings=job.sync)

    def refused(version):
        end.target.pending = plan.placement
        raise SyncError("the trainer went away")

    end.session = SimpleNamespace(sync=refused)
    end.start()
    with pytest.raises(SyncError):
        end.receive(1)
    assert end.report.error and end.report.verified is None and end.target.pending is None
    end.start()  # a new round, not "called twice"
    with pytest.raises(RuntimeError, match="called twice"):
        end.start()
