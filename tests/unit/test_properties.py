"""Properties over random models and layout pairs: plans validate and simulate bit-exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import assert_plan_exact
from planners import SyncPlan, build_plan
from strategies import jobs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs(), st.integers(0, 2**16))
def test_random_layouts_validate_and_simulate_exactly(job, seed):
    m, t, i = job.model, job.trainer, job.inference
    event(f"family {m.family}")
    event(f"deployment {job.deployment.mode}")
    event(f"inference EP {i.enable_ep}, redundant {job.eplb.num_redundant_experts > 0}")
    event(f"TP {t.tp}->{i.tp}, PP {t.pp}->{i.pp}")
    if not m.is_mla and i.tp > m.attention.num_kv_heads:
        event("kv heads replicated (tp > kv heads)")
    assert_plan_exact(job, seed)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs())
def test_plans_round_trip_and_respect_the_bound(job):
    plan = build_plan(job)
    again = SyncPlan.from_dict(plan.to_dict())
    assert np.array_equal(again.chunks, plan.chunks) and np.array_equal(again.pieces, plan.pieces)
    assert again.local_name == plan.local_name and again.tensors == plan.tensors
    again.validate()
    assert plan.predicted_time() >= plan.lower_bound() * (1 - 1e-9)
    # every stage-1 sender is a trainer rank, no network pair shares a GPU
    s1 = plan.chunks[plan.chunks["stage"] == 1]
    assert (s1["src"] < plan.num_trainer).all()
    net = plan.chunks[plan.chunks["link"] != 0]
    assert (plan.devices[net["src"]] != plan.devices[net["dst"]]).all()
