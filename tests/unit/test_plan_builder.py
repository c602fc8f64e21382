"""A new expert placement replans only the experts: the builder's cached part plus the placement's part
equals a plan built from scratch for that placement, whatever the builder planned before."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import assert_simulates_exactly
from planners.build import PlanBuilder, build_plan_from_parts
from planners.eplb import EnginePlacements, rebalance
from planners.eplb.stats import synthetic_load
from strategies import jobs


def builder_of(job) -> PlanBuilder:
    return PlanBuilder(job.model, job.trainer, job.inference, job.deployment, job.placement(None), job.links,
                       job.describe(), (job.trainer_kind, job.engine_kind))


def placement_of(job, seed: int, per_engine: bool):
    """A balanced placement for a synthetic load: one every engine shares, or one per engine."""
    groups, nodes, gpus = job.eplb_shape()

    def balanced(s):
        load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, zipf=1.5, seed=s)
        return rebalance(load, job.num_physical_experts, groups, nodes, gpus)

    if per_engine:
        return EnginePlacements(tuple(balanced(seed * 31 + k) for k in range(job.inference.engines)))
    return balanced(seed)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs(), st.lists(st.tuples(st.integers(0, 2**16), st.booleans()), min_size=2, max_size=4))
def test_replanning_a_placement_equals_planning_it_from_scratch(job, changes):
    """Shared and per-engine placements in any order: the cached part plus the placement's equals a
    from-scratch plan, and every engine rank simulates to its own engine's slots."""
    assume(job.model.is_moe)
    builder = builder_of(job)
    for seed, per_engine in changes:
        placement = placement_of(job, seed, per_engine)
        fresh = build_plan_from_parts(job.model, job.trainer, job.inference, job.deployment, placement, job.links,
                                      job.describe(), (job.trainer_kind, job.engine_kind))
        again = builder.plan(placement)
        assert np.array_equal(again.pieces, fresh.pieces)
        assert np.array_equal(again.chunks, fresh.chunks)
        assert again.local_name == fresh.local_name and again.local_shape == fresh.local_shape
        assert_simulates_exactly(job, again.validate(), seed)


def test_only_the_expert_slots_move():
    from planners import JobSpec

    job = JobSpec.from_yaml("examples/tiny_moe.yaml")
    builder = builder_of(job)
    one = builder.plan(job.placement(synthetic_load(len(job.model.moe_layers), job.model.num_experts, seed=1)))
    two = builder.plan(job.placement(synthetic_load(len(job.model.moe_layers), job.model.num_experts, seed=2)))
    expert = np.array([t.expert >= 0 for t in one.tensors])
    moved = one.pieces["tensor"] != two.pieces["tensor"]
    assert moved.any() and expert[one.pieces["tensor"][moved]].all()
    fixed = ~expert[one.chunks["tensor"]]
    assert np.array_equal(one.chunks[fixed], two.chunks[~expert[two.chunks["tensor"]]])


def test_engines_with_their_own_placements_share_stage_one_where_their_slots_coincide():
    """Two colocated engines on one node: slots serving the same expert in both cross into the node once
    (one stage-1 copy, then NVLink), and each engine's slots hold its own placement's experts."""
    from planners import JobSpec

    job = JobSpec.from_dict({"name": "two-engines", "model": {"preset": "tiny_qwen3_moe"}, "trainer": {"tp": 2, "ep": 2},
                             "inference": {"tp": 2, "dp": 1, "enable_ep": True, "engines": 2},
                             "deployment": {"mode": "disaggregated", "gpus_per_node": 4},  # both engines on node 1
                             "eplb": {"enabled": True, "num_redundant_experts": 4}})
    builder = builder_of(job)
    L, E = len(job.model.moe_layers), job.model.num_experts
    same = builder.plan(job.placement(np.stack([synthetic_load(L, E, seed=1)] * 2)))
    mixed = builder.plan(job.placement(np.stack([synthetic_load(L, E, seed=1), synthetic_load(L, E, seed=2)])))
    assert mixed.placement.engines is not None
    assert not np.array_equal(mixed.placement.of_engine(0).phy2log, mixed.placement.of_engine(1).phy2log)
    for plan in (same, mixed):
        assert_simulates_exactly(job, plan.validate())
        s1 = plan.chunks[plan.chunks["stage"] == 1]
        # no (tensor, range) crosses into the node twice: the node gets the model once, whatever each
        # engine's placement, and the second engine's copies come over NVLink
        keys = np.stack([s1["tensor"], s1["lo"], s1["hi"]], axis=1)
        assert len(np.unique(keys, axis=0)) == len(keys)
        assert plan.bytes_by_link(1)["cross node"] == sum(t.nbytes for t in plan.tensors)
        assert plan.bytes_by_link(2)["same node"] > 0


def scope_rows(plan, ranks) -> np.ndarray:
    """Rows of the whole plan that ``ranks`` sync by: sent, received, or fed by their stage-1 sends."""
    from planners.schedule.buckets import chunk_origins

    c = plan.chunks
    feeder = np.where(c["stage"] == 1, c["src"], c["src"][np.maximum(chunk_origins(c), 0)])
    return np.isin(c["src"], ranks) | np.isin(c["dst"], ranks) | np.isin(feeder, ranks)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs(), st.lists(st.tuples(st.integers(0, 2**16), st.booleans()), min_size=1, max_size=3), st.randoms())
def test_every_rank_derives_its_part_of_the_whole_schedule(job, changes, rng):
    """Each rank's own plan (routing only the deliveries it takes part in) holds exactly the whole plan's
    chunks it sends, receives or feeds, in the same order, and its own pieces: every rank derives the
    identical schedule. Also for the ranks one process hosts together."""
    builder = builder_of(job)
    world = job.trainer.world_size + job.inference.world_size
    for seed, per_engine in changes:
        placement = placement_of(job, seed, per_engine) if job.model.is_moe else None
        whole = builder.plan(placement)
        groups = [[r] for r in range(world)] + [sorted(rng.sample(range(world), min(3, world)))]
        for ranks in groups:
            part = builder.rank_plan(placement, ranks)
            assert part.scope == tuple(ranks)
            assert np.array_equal(part.chunks, whole.chunks[scope_rows(whole, ranks)]), ranks
            mine = np.isin(whole.local_rank[whole.pieces["local"]], ranks)
            assert np.array_equal(part.pieces, whole.pieces[mine]), ranks
