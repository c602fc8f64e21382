"""One process hosting several plan ranks: chunks among them are local batched copies, bit-exact."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expected import endpoints, source_shards
from planners import JobSpec, build_plan
from sync.ends.synthetic import BufferTarget
from sync.executor import DIRECT_BYTES, PlanExecutor
from sync.run.local import host_store, spawn_ranks
from sync.tensors import as_bits
from sync.transport import SoloTransport

JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2), inference=dict(tp=2, dp=2, enable_ep=True),
           deployment=dict(mode="colocated", gpus_per_node=4), eplb=dict(num_redundant_experts=4))


@pytest.mark.parametrize("copies", ["auto", "slices"])
def test_one_process_hosting_every_rank_syncs_bit_exactly(copies):
    plan = build_plan(JobSpec.from_dict(JOB)).validate()
    ex = PlanExecutor(plan, range(plan.num_ranks), SoloTransport(), bucket_bytes=4096, copies=copies)
    for version in (1, 2):
        sources, targets = endpoints(plan, range(plan.num_ranks), version)
        stats = ex.sync(sources, targets)
        assert stats.verified and stats.bytes_sent == 0 and stats.bytes_copied == plan.chunks["nbytes"].sum()
        for r, target in targets.items():
            for name, want in source_shards(plan, r, version).items():
                assert torch.equal(as_bits(target.tensors[name]), as_bits(want)), (r, name)


def test_bound_programs_are_reused_until_the_tensors_move():
    plan = build_plan(JobSpec.from_dict(JOB)).validate()
    ex = PlanExecutor(plan, range(plan.num_ranks), SoloTransport())
    sources, targets = endpoints(plan, range(plan.num_ranks), 1)
    first = ex.sync(sources, targets)
    binding = ex._binding
    for s in sources.values():
        s.set_version(2)  # in place: same tensors, new values
    second = ex.sync(sources, targets)
    assert ex._binding is binding and first.bind_seconds > 0 and second.bind_seconds == 0 and second.verified
    moved = next(iter(targets.values()))
    name = next(iter(moved.tensors))
    moved.tensors[name] = moved.tensors[name].clone()  # a new tensor under the same name
    third = ex.sync(sources, targets)
    assert ex._binding is not binding and third.verified


def _per_device(rank: int, plan, port: int, groups: list[list[int]], version: int):
    from sync.transport import standalone_transport

    process_of = np.zeros(plan.num_ranks, dtype=np.int64)
    for p, ranks in enumerate(groups):
        process_of[ranks] = p
    transport = standalone_transport(rank, len(groups), "127.0.0.1", port, 60, store_on_rank0=False)
    ex = PlanExecutor(plan, groups[rank], transport, bucket_bytes=2048, timeout_s=60, process_of=process_of)
    sources, targets = endpoints(plan, groups[rank], version)
    stats = ex.sync(sources, targets)
    return stats.verified, stats.bytes_copied, stats.bytes_sent, {
        r: {k: as_bits(v).numpy() for k, v in t.tensors.items()} for r, t in targets.items()}


def test_colocated_one_process_per_device_copies_locally_and_sends_the_rest():
    plan = build_plan(JobSpec.from_dict(JOB)).validate()
    groups = [np.flatnonzero(plan.devices == d).tolist() for d in np.unique(plan.devices)]
    assert all(len(g) == 2 for g in groups)  # a trainer rank and an engine rank on each GPU
    store = host_store()
    results, _ = spawn_ranks(len(groups), _per_device, (plan, store.port, groups, 3), timeout_s=120)
    same_device = plan.devices[plan.chunks["src"]] == plan.devices[plan.chunks["dst"]]
    assert sum(r[1] for r in results.values()) == plan.chunks["nbytes"][same_device].sum() > 0
    assert sum(r[2] for r in results.values()) > 0
    for verified, _, _, tensors in results.values():
        assert verified
        for r, got in tensors.items():
            for name, want in source_shards(plan, r, 3).items():
                np.testing.assert_array_equal(got[name], as_bits(want).numpy(), err_msg=f"rank {r} {name}")


@pytest.mark.parametrize("mode", ["arena", "direct"])
def test_cuda_ipc_on_cpu_tensors_is_refused_before_any_byte_moves(mode):
    job = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1), inference=dict(tp=1),
               deployment=dict(mode="colocated"))
    plan = build_plan(JobSpec.from_dict(job)).validate()

    class Store:  # the executor wants a store for IPC signals; this test never gets that far
        def set(self, key, value):  # where a process publishes its mailbox
            pass

    transport = SoloTransport()
    transport.store = Store()
    ex = PlanExecutor(plan, 1, transport, process_of=[0, 1], ipc=mode)
    target = BufferTarget(plan, 1)
    with pytest.raises(ValueError, match="ipc=.*CUDA tensors.*ipc=False"):
        ex.sync(None, target)
    assert all(not t.any() for t in target.tensors.values())


class _NcclLike(SoloTransport):
    backend = "nccl"  # only what bucketing looks at; nothing is sent


def test_direct_messages_depend_on_the_backend(monkeypatch):
    # NCCL pays per message, so mid-size chunks are packed there; gloo sends them as they are
    plan = build_plan(JobSpec.from_dict({**JOB, "deployment": dict(mode="disaggregated", gpus_per_node=8)})).validate()
    monkeypatch.setitem(DIRECT_BYTES, "solo", 1024)  # this tiny model's chunks are at most 16 KB
    assert DIRECT_BYTES["solo"] <= plan.chunks["nbytes"].max() < DIRECT_BYTES["nccl"]
    gloo = PlanExecutor(plan, 0, SoloTransport())
    nccl = PlanExecutor(plan, 0, _NcclLike())
    assert any(b.direct for b in gloo.buckets) and not any(b.direct for b in nccl.buckets)
    assert sum(b.nbytes for b in gloo.buckets) == sum(b.nbytes for b in nccl.buckets)


@pytest.mark.parametrize("made", ["by one builder", "read back from JSON"])
def test_a_new_expert_placement_rebinds_only_the_expert_copies(made):
    """After a placement change the new executor keeps the old one's checked views and the copy programs
    of every placement-free chunk, builds the experts' anew, and syncs bit-exactly by the new plan; an
    endpoint whose tensors moved meanwhile is bound from scratch. Plans of one builder share their
    placement-free chunks (``plan.fixed_part``); plans read back from JSON are compared chunk by chunk."""
    from planners.build import PlanBuilder
    from planners.eplb import rebalance
    from planners.eplb.stats import synthetic_load
    from planners.plan import SyncPlan

    job = JobSpec.from_dict(JOB)
    builder = PlanBuilder.for_job(job)
    plans = [builder.plan(rebalance(synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.5, seed=s),
                                    job.num_physical_experts, *job.eplb_shape())) for s in (1, 2, 3)]
    if made == "read back from JSON":
        plans = [SyncPlan.from_dict(p.to_dict()) for p in plans]
        assert all(p.fixed_part is None for p in plans)
    else:
        assert plans[0].same_fixed_part(plans[1])
    assert not np.array_equal(plans[0].pieces, plans[1].pieces)  # the experts did move
    ranks = range(plans[0].num_ranks)
    sources, targets = endpoints(plans[0], ranks, 1)
    old = PlanExecutor(plans[0], ranks, SoloTransport())
    assert old.sync(sources, targets).verified
    new = PlanExecutor(plans[1], ranks, SoloTransport())
    new.adopt(old)
    stats = new.sync(sources, targets)
    assert stats.verified and stats.bind_seconds > 0
    assert new._binding.flats is old._binding.flats
    assert all(new._binding.local_fixed[s] is old._binding.local_fixed[s] for s in (1, 2))
    for r, target in targets.items():
        for name, want in source_shards(plans[1], r, 1).items():
            assert torch.equal(as_bits(target.tensors[name]), as_bits(want)), (r, name)
    moved = next(iter(targets.values()))
    name = next(iter(moved.tensors))
    moved.tensors[name] = moved.tensors[name].clone()
    third = PlanExecutor(plans[2], ranks, SoloTransport())
    third.adopt(new)
    assert third.sync(sources, targets).verified
    assert third._binding.flats is not new._binding.flats
    for r, target in targets.items():
        for name, want in source_shards(plans[2], r, 1).items():
            assert torch.equal(as_bits(target.tensors[name]), as_bits(want)), (r, name)
    if made == "read back from JSON":  # one placement-free chunk unlike the adopted plan's: its stage is rebuilt
        changed = SyncPlan.from_dict(plans[0].to_dict())
        fixed = np.flatnonzero((changed.table.expert[changed.chunks["tensor"]] < 0) & (changed.chunks["stage"] == 1))
        changed.chunks["link"][fixed[0]] += 1
        fourth = PlanExecutor(changed, ranks, SoloTransport())
        fourth.adopt(third)
        assert fourth.sync(sources, targets).verified
        assert fourth._binding.local_fixed[1] is not third._binding.local_fixed[1]
        assert fourth._binding.local_fixed[2] is third._binding.local_fixed[2]


def _own_part_per_device(rank: int, port: int, groups: list[list[int]], seeds: list[int]):
    """A process per GPU syncing by its own ranks' part of the plan, replanned for each new placement."""
    from planners.build import PlanBuilder
    from sync.session import Session
    from sync.transport import standalone_transport

    job = JobSpec.from_dict({**JOB, "eplb": dict(enabled=True, num_redundant_experts=4)})
    builder = PlanBuilder.for_job(job)
    process_of = np.zeros(job.trainer.world_size + job.inference.world_size, dtype=np.int64)
    for p, ranks in enumerate(groups):
        process_of[ranks] = p
    transport = standalone_transport(rank, len(groups), "127.0.0.1", port, 60, store_on_rank0=False)
    loads = [load_of(job, seed) for seed in seeds]
    plan = builder.rank_plan(job.placement(loads[0]), groups[rank])
    sources, targets = endpoints(plan, groups[rank], 1)
    session = Session.open(plan, groups[rank], transport, sources, targets, process_of=process_of)
    out = []
    for version, load in enumerate(loads, start=1):
        if version > 1:
            session.replan(builder.rank_plan(job.placement(load), groups[rank]))
        for s in sources.values():
            s.set_version(version)
        stats = session.sync(version)
        out.append((stats.verified, {r: {k: as_bits(v).numpy() for k, v in t.tensors.items()}
                                     for r, t in targets.items()}))
    return out


def load_of(job, seed):
    from planners.eplb.stats import synthetic_load

    return synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.5, seed=seed)


def test_processes_syncing_by_their_own_part_of_the_plan_are_bit_exact_across_placements():
    """Each process plans only its ranks' part (PlanBuilder.rank_plan) and learns its peers' fan-out
    from them; after every new placement each engine holds exactly the whole plan's expected tensors."""
    from planners.build import PlanBuilder

    job = JobSpec.from_dict({**JOB, "eplb": dict(enabled=True, num_redundant_experts=4)})
    whole = PlanBuilder.for_job(job)
    plan = whole.plan(None)
    groups = [np.flatnonzero(plan.devices == d).tolist() for d in np.unique(plan.devices)]
    seeds = [1, 2, 3]
    store = host_store()
    results, _ = spawn_ranks(len(groups), _own_part_per_device, (store.port, groups, seeds), timeout_s=120)
    for i, seed in enumerate(seeds):
        expected_plan = whole.plan(job.placement(load_of(job, seed))).validate()
        for per_version in results.values():
            verified, tensors = per_version[i]
            assert verified
            for r, got in tensors.items():
                for name, want in source_shards(expected_plan, r, i + 1).items():
                    np.testing.assert_array_equal(got[name], as_bits(want).numpy(), err_msg=f"v{i + 1} rank {r} {name}")


def _replanning_session(seeds):
    """A session hosting every rank of an EPLB job, opened on the first of one builder's plans (one per
    seed's load): the plans, the session and its ends."""
    from planners import SyncSettings
    from planners.build import PlanBuilder
    from sync.session import Session

    job = JobSpec.from_dict({**JOB, "eplb": dict(enabled=True, num_redundant_experts=4)})
    builder = PlanBuilder.for_job(job)
    plans = [builder.plan(job.placement(load_of(job, seed))) for seed in seeds]
    ranks = list(range(plans[0].num_ranks))
    sources, targets = endpoints(plans[0], ranks, 1)
    session = Session.open(plans[0], ranks, SoloTransport(), sources, targets, SyncSettings(bucket_mb=0.01))
    return plans, session, sources, targets


def test_a_placement_prepared_ahead_syncs_with_its_programs_already_bound():
    """Session.prepare binds the new plan's copy programs before the sync (while the trainer steps):
    the sync binds nothing, is bit-exact, and a tensor that moved after the prepare is still caught."""
    plans, session, sources, targets = _replanning_session((1, 2, 3))
    assert session.sync(1).verified
    assert session.prepare(plans[1]) > 0
    stats = session.sync(1)
    assert stats.verified and stats.bind_seconds == 0
    for r, target in targets.items():
        for name, want in source_shards(plans[1], r, 1).items():
            assert torch.equal(as_bits(target.tensors[name]), as_bits(want)), (r, name)
    session.prepare(plans[2])
    moved = next(iter(targets.values()))
    name = next(iter(moved.tensors))
    moved.tensors[name] = moved.tensors[name].clone()  # after the prepare: the sync must rebind
    stats = session.sync(1)
    assert stats.verified and stats.bind_seconds > 0
    for r, target in targets.items():
        for name, want in source_shards(plans[2], r, 1).items():
            assert torch.equal(as_bits(target.tensors[name]), as_bits(want)), (r, name)


@pytest.mark.parametrize("collect", [False, True])
def test_the_garbage_collector_waits_for_the_sync_and_resumes_after_it(collect):
    import gc

    plan = build_plan(JobSpec.from_dict(JOB)).validate()
    ex = PlanExecutor(plan, range(plan.num_ranks), SoloTransport(), collect_during_sync=collect)
    sources, targets = endpoints(plan, range(plan.num_ranks), 1)
    seen = []

    class Watched:  # an engine end that notes, when the sync asks for its tensors, whether gc may run
        def __init__(self, target):
            self.target = target

        def local_tensors(self):
            seen.append(gc.isenabled())
            return self.target.local_tensors()

    watched = {r: Watched(t) for r, t in targets.items()}
    assert gc.isenabled()
    ex.sync(sources, watched)
    assert seen and all(s is collect for s in seen) and gc.isenabled()
    with pytest.raises(ValueError, match="needs a target"):
        ex.sync(sources, {})  # a failed sync resumes it too
    assert gc.isenabled()


def test_moving_chunks_programmed_in_parts_then_merged_sync_bit_exactly(monkeypatch):
    """The GPU path of a first sync after a new placement, with Triton's interpreter on the CPU: the moving
    chunks' tiles cut in parts on the worker thread and launched part by part, then merged into one
    program that the next sync by the same plan runs."""
    from conftest import triton_kernels_run
    from sync.copier import CopyProgram
    import sync.executor as executor

    if not triton_kernels_run():
        pytest.skip("needs Triton (compiled on CUDA or interpreted)")
    monkeypatch.setattr(executor, "_FIRST_PENDING", 5)  # parts of 5, 10, 20, ... chunks
    monkeypatch.setattr(executor.PlanExecutor, "_compiled_tables", lambda self, device: True)
    merges = []
    merged = CopyProgram.merged.__func__
    monkeypatch.setattr(CopyProgram, "merged", classmethod(lambda cls, parts: merges.append(len(parts)) or merged(cls, parts)))
    early = []  # the adopted placement-free programs each sync launched before reading its plan's tables
    launch_kept = executor.PlanExecutor._launch_kept
    monkeypatch.setattr(executor.PlanExecutor, "_launch_kept", lambda self, given: early.append(launch_kept(self, given))
                        or early[-1])
    plans, session, sources, targets = _replanning_session((1, 2))
    version = 0
    for i, plan in enumerate(plans):
        if i:
            session.replan(plan)
        for repeat in range(2):  # programmed in parts, then merged; the second sync runs the merged programs
            version += 1
            for s in sources.values():
                s.set_version(version)
            assert session.sync(version).verified
            for r, target in targets.items():
                for name, want in source_shards(plan, r, version).items():
                    assert torch.equal(as_bits(target.tensors[name]), as_bits(want)), (version, r, name)
        assert merges and max(merges) > 1
        merges.clear()
        # the first plan laid itself out at once; the replanned one at its first sync, after launching the
        # adopted placement-free programs of both stages (one process hosts every rank)
        assert [sorted(e) for e in early] == ([[1, 2]] if i else [])
        assert not i or (early[0][1] and all(isinstance(p, CopyProgram) for ps in early[0].values() for p in ps))
        early.clear()


def test_a_replanned_executor_reads_its_tables_at_the_first_sync_and_still_catches_a_moved_tensor():
    """After ``Session.replan`` the new executor has not read its plan's tables yet: its first sync
    launches the adopted placement-free copies, then lays the plan out. A tensor that moved in between
    is caught by the sync's check (those first copies went to memory the old binding still holds), and
    the engines end bit-exact; an attribute of the layout read first lays it out."""

    plans, session, sources, targets = _replanning_session((1, 2, 3))
    assert session.executor._laid_out and session.sync(1).verified
    session.replan(plans[1])
    assert not session.executor._laid_out
    moved = next(iter(targets.values()))
    name = next(iter(moved.tensors))
    old_tensor = moved.tensors[name]
    moved.tensors[name] = old_tensor.clone().fill_(0)
    stats = session.sync(1)
    assert stats.verified and stats.bind_seconds > 0 and session.executor._laid_out
    for r, target in targets.items():
        for n, want in source_shards(plans[1], r, 1).items():
            assert torch.equal(as_bits(target.tensors[n]), as_bits(want)), (r, n)
    session.replan(plans[2])
    assert not session.executor._laid_out
    fresh = PlanExecutor(plans[2], session.ranks, SoloTransport(), session.settings.bucket_bytes)
    assert [b.nbytes for b in session.executor.buckets] == [b.nbytes for b in fresh.buckets]
    assert session.executor._laid_out
    with pytest.raises(AttributeError, match="no_such_thing"):
        session.executor.no_such_thing
