"""Multi-process syncs over gloo: every engine tensor bit-identical to direct slices, every version."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from expected import expected_engine
from planners import JobSpec, build_plan
from sync.ends.base import EndpointError, check_locals
from sync.ends.synthetic import SyntheticSource
from sync.channels.faulty import Fault
from sync.run.local import LocalRun, run_local

CASES = {
    "tp3_to_tp2_dp3": dict(model=dict(hf_config=dict(
        model_type="llama", hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=6,
        head_dim=8, vocab_size=200, intermediate_size=96)), trainer=dict(tp=3), inference=dict(tp=2, dp=3)),
    "pp2_to_pp2_tied": dict(model=dict(preset="tiny_qwen3"), trainer=dict(tp=2, pp=2),
                            inference=dict(tp=1, pp=2, engines=2)),
    "moe_ep_eplb": dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                        inference=dict(tp=2, dp=2, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=4),
                        deployment=dict(gpus_per_node=2)),
    # two engines, each balanced by its own load: their slots differ, and both share one node's stage 1
    "moe_per_engine_eplb": dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                                inference=dict(tp=1, dp=2, enable_ep=True, engines=2),
                                eplb=dict(enabled=True, num_redundant_experts=2, per_engine=True),
                                deployment=dict(gpus_per_node=4)),
    "glm4_moe_ep_eplb": dict(model=dict(preset="tiny_glm4_moe"), trainer=dict(tp=2, ep=2),
                             inference=dict(tp=2, dp=2, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=4),
                             deployment=dict(gpus_per_node=2)),
    "deepseek_colocated": dict(model=dict(preset="tiny_deepseek_v3", overrides=dict(num_hidden_layers=2)), trainer=dict(tp=2, ep=2, pp=1, dp=2),
                               inference=dict(tp=2, dp=2, enable_ep=True), deployment=dict(mode="colocated")),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_syncs_are_bit_exact_every_version(name):
    job = JobSpec.from_dict(CASES[name])
    load = None
    if job.eplb.enabled:
        from planners.eplb.stats import synthetic_load

        load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=3)
        if job.eplb.per_engine:
            load = np.stack([synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=3 + k)
                             for k in range(job.inference.engines)])
    plan = build_plan(job, load).validate()
    if job.eplb.per_engine:
        first, second = plan.placement.of_engine(0).phy2log, plan.placement.of_engine(1).phy2log
        assert not np.array_equal(first, second)
    versions = [1, 2, 3]
    results, _ = run_local(plan, LocalRun(versions=versions, bucket_bytes=8 << 10, timeout_s=30, return_tensors=True))
    for i, version in enumerate(versions):
        want = expected_engine(job, plan, version)
        for rank, tensors in want.items():
            got = results[rank]["tensors"][i]
            assert sorted(got) == sorted(tensors)
            for tname, w in tensors.items():
                np.testing.assert_array_equal(got[tname], w, err_msg=f"v{version} rank {rank} {tname}")
    for rank, r in results.items():
        assert all(s.verified for s in r["stats"]["plan"]), rank


ALONE_CASES = {  # which ways chunks travel with a low threshold for sending them alone
    "moe_ep_eplb": {"direct", "from source", "packed"},  # TP shards of experts landing as parts of rows
    "tp1_to_tp2": {"direct", "to destination", "packed"},  # engine shards gathered from parts of the trainer's rows
    "tp3_to_tp2_dp3": {"direct", "from source", "packed"},
}
CASES["tp1_to_tp2"] = dict(model=dict(preset="tiny_llama"), trainer=dict(tp=1), inference=dict(tp=2))


@pytest.mark.parametrize("name", sorted(ALONE_CASES))
def test_chunks_sent_as_their_own_messages_are_bit_exact(name):
    """With a low threshold every large chunk travels alone: direct where it is contiguous at both ends,
    from its source into the receiver's bucket where only there, packed by the sender and received
    into the destination where only there; the rest packed. Every engine tensor is exact and verified."""
    from planners.schedule.buckets import bucketize

    job = JobSpec.from_dict(CASES[name])
    plan = build_plan(job).validate()
    threshold = 64
    kinds = {"direct" if b.direct else "from source" if b.from_source else "to destination" if b.to_destination
             else "packed" for b in bucketize(plan, 8 << 10, direct_bytes=threshold)}
    assert kinds == ALONE_CASES[name]
    results, _ = run_local(plan, LocalRun(versions=[1, 2], bucket_bytes=8 << 10, timeout_s=30, return_tensors=True,
                                          direct_bytes=threshold))
    for i, version in enumerate([1, 2]):
        for rank, tensors in expected_engine(job, plan, version).items():
            for tname, w in tensors.items():
                np.testing.assert_array_equal(results[rank]["tensors"][i][tname], w, err_msg=f"v{version} rank {rank} {tname}")
    assert all(s.verified for r in results.values() for s in r["stats"]["plan"])


def test_broadcast_baseline_is_bit_exact_too():
    job = JobSpec.from_dict(CASES["moe_ep_eplb"])
    plan = build_plan(job).validate()
    results, _ = run_local(plan, LocalRun(versions=[4], executor="broadcast", timeout_s=30, return_tensors=True))
    want = expected_engine(job, plan, 4)
    for rank, tensors in want.items():
        for tname, w in tensors.items():
            np.testing.assert_array_equal(results[rank]["tensors"][0][tname], w)
    assert all(r["stats"]["broadcast"][0].verified for r in results.values())


def test_a_rank_stalled_mid_sync_makes_the_others_time_out_naming_it():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=dict(tp=2), inference=dict(tp=2)))
    plan = build_plan(job)
    timeout = 3
    t0 = time.monotonic()
    run = LocalRun(versions=[1, 2], timeout_s=timeout, versioned=True, bucket_bytes=4 << 10,
                   fault=Fault("stall", 0, 1, 2, bucket=0))  # rank 0 hangs as it posts its first bucket of sync 2
    results, errors = run_local(plan, run, allow_failures=True)
    elapsed = time.monotonic() - t0
    assert "rank 0 gave no result" in errors[0]  # the launcher names the hung rank
    survivors = {r: res for r, res in results.items() if r != 0}
    assert len(survivors) == plan.num_ranks - 1
    failures = {r: res["stats"]["plan"][1] for r, res in survivors.items()}
    assert all(isinstance(e, str) and "no answer within 3 s" in e for e in failures.values()), failures
    # whoever waited on rank 0 says so; the rest time out in a later step of the same sync
    assert any("stage 1" in e and "rank 0" in e for e in failures.values()), failures
    for rank in plan.inference_ranks:
        first, second = survivors[rank]["states"]
        assert first["serving"] == 1 and second["serving"] is None and not second["complete"]
    assert elapsed < 10 * timeout + 20  # a few timed-out steps, process start, the launcher's grace


def test_a_source_that_does_not_match_the_plan_is_refused():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=dict(tp=2), inference=dict(tp=1)))
    plan = build_plan(job)
    src = SyntheticSource(plan, 0).local_tensors()
    name = next(iter(src))
    src[name] = src[name].to(torch.int16)
    del src[sorted(src)[-1]]
    with pytest.raises(EndpointError, match="dtype torch.int16, plan expects bfloat16.*missing"):
        check_locals(plan, 0, src, "source")
    src = SyntheticSource(plan, 0).local_tensors()
    src[name] = src[name].to(torch.float32)  # a wider float source is fine: cast on the way
    check_locals(plan, 0, src, "source")


class _WiderSource:
    """A trainer holding every weight in float32 (the plan's wire dtype is bfloat16)."""

    def __init__(self, plan, rank: int, version: int) -> None:
        self.tensors = {k: v.to(torch.float32) for k, v in SyntheticSource(plan, rank, version=version).local_tensors().items()}

    def local_tensors(self):
        return self.tensors


def _wider_rank(rank: int, plan, port: int, versions: list[int]):
    from sync.ends.synthetic import BufferTarget
    from sync.executor import PlanExecutor
    from sync.tensors import as_bits
    from sync.transport import standalone_transport

    transport = standalone_transport(rank, plan.num_ranks, "127.0.0.1", port, 30, store_on_rank0=False)
    ex = PlanExecutor(plan, rank, transport, bucket_bytes=8 << 10, timeout_s=30, direct_bytes=64)
    target = BufferTarget(plan, rank) if rank >= plan.num_trainer else None
    source = None
    out = []
    for version in versions:
        if rank < plan.num_trainer:  # the same dict, its tensors refilled in place: the binding (and its casts) kept
            fresh = _WiderSource(plan, rank, version).tensors
            if source is None:
                source = _WiderSource(plan, rank, version)
            for name, t in source.tensors.items():
                t.copy_(fresh[name])
        stats = ex.sync(source, target)
        out.append((stats.verified, None if target is None else {k: as_bits(t).numpy() for k, t in target.tensors.items()}))
    return out


def test_a_wider_source_sent_directly_is_cast_at_every_sync():
    """Large chunks of a float32 trainer travel straight from their tensors as bfloat16: cast into a
    buffer of their own that the sync's messages keep, refilled at every sync (not the first's bytes)."""
    from planners.schedule.buckets import bucketize
    from sync.run.local import host_store, spawn_ranks

    job = JobSpec.from_dict(CASES["tp1_to_tp2"])
    plan = build_plan(job).validate()
    assert any(b.direct for b in bucketize(plan, 8 << 10, direct_bytes=64))
    store = host_store()
    results, _ = spawn_ranks(plan.num_ranks, _wider_rank, (plan, store.port, [1, 2]), timeout_s=120)
    for i, version in enumerate([1, 2]):
        for rank, tensors in expected_engine(job, plan, version).items():
            assert results[rank][i][0]
            for name, want in tensors.items():
                np.testing.assert_array_equal(results[rank][i][1][name], want, err_msg=f"v{version} rank {rank} {name}")
