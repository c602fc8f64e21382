"""A new expert placement replans only the experts: the builder's cached part plus the placement's part
equals a plan built from scratch for that placement, whatever the builder planned before."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import assert_simulates_exactly
from planners.build import PlanBuilder, build_plan_from_parts
from planners.eplb import rebalance
from planners.eplb.stats import synthetic_load
from strategies import jobs


def builder_of(job) -> PlanBuilder:
    return PlanBuilder(job.model, job.trainer, job.inference, job.deployment, job.placement(None), job.links,
                       job.describe(), (job.trainer_kind, job.engine_kind))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs(), st.lists(st.integers(0, 2**16), min_size=2, max_size=4))
def test_replanning_a_placement_equals_planning_it_from_scratch(job, seeds):
    assume(job.model.is_moe)
    builder = builder_of(job)
    groups, nodes, gpus = job.eplb_shape()
    for seed in seeds:
        load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, zipf=1.5, seed=seed)
        placement = rebalance(load, job.num_physical_experts, groups, nodes, gpus)
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
