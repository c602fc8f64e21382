"""The training-loop API: every rank calls Synchronizer.sync each iteration; EPLB loads replan."""

from __future__ import annotations

from planners import JobSpec
from planners.eplb.stats import synthetic_load
from sync.run.local import host_store, spawn_ranks

JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2), inference=dict(tp=2, dp=2, enable_ep=True),
           eplb=dict(enabled=True, num_redundant_experts=4), sync=dict(timeout_s=30))


def _rank(rank: int, port: int):
    from sync.api import Synchronizer
    from sync.ends.synthetic import BufferTarget, SyntheticSource

    job = JobSpec.from_dict(JOB)
    sync = Synchronizer.from_job(job, rank, port=port, store_on_rank0=False)
    if rank < job.trainer.world_size:
        sync.source = SyntheticSource(sync.plan, rank, version=1)
    else:
        sync.target = BufferTarget(sync.plan, rank)
    first = sync.sync(1)
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.3, seed=2)
    if sync.source is not None:  # the new plan may shard nothing differently on the trainer, but rebuild anyway
        sync.source = SyntheticSource(build(job, load), rank, version=2)
    second = sync.sync(2, expert_load=load)
    if sync.target is not None:  # engines know what they serve
        assert first.engine.serving == 1 and second.engine.serving == 2 and second.engine.complete
        assert 0 < second.balancedness <= 1
    return first.verified, second.verified, second.placement.logcnt.max(), first.placement.logcnt.max()


def build(job, load):
    from planners import build_plan

    return build_plan(job, load)


def test_training_loop_api_syncs_and_replans():
    store = host_store()
    results, _ = spawn_ranks(8, _rank, (store.port,), timeout_s=120)
    for rank, (v1, v2, replicas_after, replicas_before) in results.items():
        assert v1 and v2, rank
        assert replicas_after > replicas_before  # hot experts got replicas from the loads


def test_a_source_for_another_layout_is_refused_at_start_up():
    import pytest

    from planners import build_plan
    from sync.api import Synchronizer
    from sync.ends.base import EndpointError
    from sync.ends.synthetic import SyntheticSource
    from sync.transport import SoloTransport

    job = JobSpec.from_dict(JOB)
    other = JobSpec.from_dict({**JOB, "trainer": dict(tp=1, ep=2)})  # the model was built for TP1
    source = SyntheticSource(build_plan(other), 0)
    with pytest.raises(EndpointError, match="source of rank 0 does not match the plan"):
        Synchronizer(job, 0, SoloTransport(), source=source)


PER_ENGINE = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                  inference=dict(tp=1, dp=2, enable_ep=True, engines=2),
                  eplb=dict(enabled=True, num_redundant_experts=2, per_engine=True), sync=dict(timeout_s=30))


def _per_engine_rank(rank: int, port: int):
    import numpy as np

    from expected import expected_engine
    from sync.api import Synchronizer
    from sync.ends.synthetic import BufferTarget, SyntheticSource
    from sync.tensors import as_bits

    class PlacedTarget(BufferTarget):  # an engine that routes by the placement it was given
        placement = None

        def set_placement(self, placement):
            self.placement = placement

    job = JobSpec.from_dict(PER_ENGINE)
    sync = Synchronizer.from_job(job, rank, port=port, store_on_rank0=False)
    target = None
    if rank < job.trainer.world_size:
        sync.source = SyntheticSource(sync.plan, rank, version=1)
    else:
        sync.target = target = PlacedTarget(sync.plan, rank)
    sync.sync(1)
    L, E = len(job.model.moe_layers), job.model.num_experts
    load = np.stack([synthetic_load(L, E, 1.3, seed=2), synthetic_load(L, E, 1.3, seed=5)])  # each engine's own
    sync.prepare(load)  # as soon as the loads are in: planned and bound while the trainer steps
    if sync.source is not None:
        sync.source.set_version(2)
    report = sync.sync(2)
    if target is None:
        return report.verified, None, None
    want = expected_engine(job, sync.plan, 2)[rank]
    exact = all(np.array_equal(as_bits(target.tensors[name]).numpy(), w) for name, w in want.items())
    engine = (rank - job.trainer.world_size) // job.inference.engine_size
    own = np.array_equal(target.placement.phy2log, report.placement.of_engine(engine).phy2log)
    return report.verified, exact, (engine, own, report.placement.of_engine(engine).phy2log.tolist())


def test_each_engine_gets_its_own_placement_from_its_own_load():
    store = host_store()
    results, _ = spawn_ranks(8, _per_engine_rank, (store.port,), timeout_s=120)
    placements = {}
    for rank, (verified, exact, placed) in results.items():
        assert verified, rank
        if placed is not None:
            engine, own, phy2log = placed
            assert exact and own, rank  # its slots hold its engine's experts, and it routes by them
            placements.setdefault(engine, phy2log)
            assert placements[engine] == phy2log  # the ranks of one engine agree
    assert placements[0] != placements[1]
