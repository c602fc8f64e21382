"""EPLB placements: DeepSeek's algorithm exactly, a default policy never worse, statistics, plans."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import assert_plan_exact
from planners import JobSpec
from planners.eplb import POLICIES, EplbError, PlacementError, balance_report, gpu_loads, rebalance
from planners.eplb.loop import rebalance_loop
from planners.eplb.stability import moved_slots
from planners.eplb.placement import EnginePlacements, Placement, placement_from_phy2log
from planners.eplb.stats import EngineLoadWindows, ExpertLoadWindow, read_load, synthetic_load


def test_deepseek_readme_example():
    load = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                     [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
    p = rebalance(load, 16, num_groups=4, num_nodes=2, num_gpus=8, policy="deepseek")
    assert p.phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    assert p.logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]


@st.composite
def shapes(draw):
    groups = draw(st.sampled_from([1, 2, 4, 8]))
    experts = groups * draw(st.sampled_from([1, 2, 3, 4, 8]))
    nodes = draw(st.sampled_from([1, 2, 4]))
    gpus = nodes * draw(st.sampled_from([1, 2, 4]))
    per_gpu = -(-experts // gpus) + draw(st.integers(0, 2))
    layers = draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    rng = np.random.default_rng(seed)
    skew = draw(st.sampled_from([0.0, 0.6, 1.0, 1.5]))
    load = rng.permutation(10**6)[: layers * experts].reshape(layers, experts) + 1  # distinct: tie-free
    if skew:
        load = (load.astype(np.float64) ** (1 + skew)).round()
    return load, per_gpu * gpus, groups, nodes, gpus


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(shapes())
def test_deepseek_policy_equals_the_loop_reference(case):
    load, P, groups, nodes, gpus = case
    assert np.array_equal(rebalance(load, P, groups, nodes, gpus, policy="deepseek").phy2log,
                          rebalance_loop(load, P, groups, nodes, gpus))


@SETTINGS
@given(shapes(), st.sampled_from(["deepseek", "default"]))
def test_placement_invariants(case, policy):
    load, P, groups, nodes, gpus = case
    L, E = load.shape
    p = rebalance(load, P, groups, nodes, gpus, policy=policy)
    assert p.phy2log.shape == (L, P)
    counts = p.logcnt
    assert counts.shape == (L, E) and (counts >= 1).all() and (counts.sum(axis=1) == P).all()
    log2phy = p.log2phy(E)
    for layer in range(L):
        for e in range(E):
            slots = log2phy[layer, e][log2phy[layer, e] >= 0]
            assert len(slots) == counts[layer, e] and (p.phy2log[layer, slots] == e).all()


@SETTINGS
@given(shapes())
def test_default_policy_is_never_worse(case):
    load, P, groups, nodes, gpus = case
    ds = gpu_loads(load, rebalance(load, P, groups, nodes, gpus, policy="deepseek").phy2log, gpus).max(axis=1)
    ours = gpu_loads(load, rebalance(load, P, groups, nodes, gpus).phy2log, gpus).max(axis=1)
    assert (ours <= ds * (1 + 1e-12)).all()


def test_default_policy_helps_hot_groups():
    load = synthetic_load(8, 64, zipf=1.0, seed=3)
    ds = balance_report(load, rebalance(load, 80, 8, 8, 16, policy="deepseek"), 16, 8)
    ours = balance_report(load, rebalance(load, 80, 8, 8, 16), 16, 8)
    assert ours.max_gpu_load.sum() < 0.9 * ds.max_gpu_load.sum()
    assert ours.max_over_bound >= 1.0 - 1e-9 and ds.max_over_bound >= ours.max_over_bound


@SETTINGS
@given(shapes())
def test_group_bound_holds_for_group_confined_placements(case):
    load, P, groups, nodes, gpus = case
    if groups % nodes:
        return
    report = balance_report(load, rebalance(load, P, groups, nodes, gpus, policy="deepseek"), gpus, nodes, groups)
    assert (report.max_gpu_load >= report.group_bound * (1 - 1e-12)).all()
    assert (report.max_gpu_load >= report.bound * (1 - 1e-12)).all()


def test_deepseek_policy_equals_the_loop_reference_with_ties_and_zeros():
    rng = np.random.default_rng(11)
    for layers, experts, P, groups, nodes, gpus in [(3, 32, 48, 4, 2, 8), (2, 64, 80, 8, 4, 16), (4, 16, 32, 2, 1, 4)]:
        for load in (rng.integers(0, 4, (layers, experts)).astype(float),  # many ties, zeros
                     np.where(rng.random((layers, experts)) < 0.5, 0.0, rng.random((layers, experts))),
                     np.zeros((layers, experts))):
            assert np.array_equal(rebalance(load, P, groups, nodes, gpus, policy="deepseek").phy2log,
                                  rebalance_loop(load, P, groups, nodes, gpus))


def test_balance_report_has_per_gpu_and_per_node_loads():
    load = synthetic_load(4, 32, 1.0, seed=5)
    report = balance_report(load, rebalance(load, 48, 4, 2, 8), 8, 2, num_groups=4)
    assert report.gpu_load.shape == (4, 8) and report.node_load.shape == (4, 2)
    assert np.allclose(report.gpu_load.sum(axis=1), load.sum(axis=1))
    assert np.allclose(report.node_load, report.gpu_load.reshape(4, 2, 4).sum(axis=2))
    assert np.array_equal(report.max_gpu_load, report.gpu_load.max(axis=1))
    assert (report.max_gpu_load >= report.bound * (1 - 1e-12)).all() and 0 < report.balancedness <= 1


def test_default_policy_avoids_two_replicas_of_one_expert_on_a_gpu():
    window = np.stack([synthetic_load(12, 256, 1.0, seed=s) for s in range(3)]).sum(axis=0)  # [window, L, E] summed
    for nodes in (4, 8):
        ds = balance_report(window, rebalance(window, 288, 8, nodes, 48, policy="deepseek"), 48, nodes)
        ours = balance_report(window, rebalance(window, 288, 8, nodes, 48), 48, nodes)
        assert ds.duplicates > 0 and ours.duplicates == 0
        assert ours.max_over_bound < ds.max_over_bound


@pytest.mark.parametrize("slots,gpus,nodes", [(288, 32, 1), (288, 32, 4), (288, 32, 8), (320, 64, 8)])
def test_default_policy_balances_moderate_skew(slots, gpus, nodes):
    load = synthetic_load(8, 256, 0.6, seed=4)
    report = balance_report(load, rebalance(load, slots, 8, nodes, gpus), gpus, nodes)
    assert report.max_over_bound <= 1.03


def test_policies_are_deterministic():
    load = synthetic_load(6, 64, 1.0, seed=9)
    for policy in POLICIES:
        first = rebalance(load, 96, 8, 4, 16, policy=policy).phy2log
        assert np.array_equal(first, rebalance(load.copy(), 96, 8, 4, 16, policy=policy).phy2log)


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_physical=10, num_gpus=4), "multiple of num_gpus"),
    (dict(num_physical=8, num_groups=3), "multiple of num_groups"),
    (dict(num_physical=4), r"must be >= the number of experts"),
    (dict(num_physical=8, num_gpus=4, num_nodes=3), "multiple of num_nodes"),
    (dict(num_physical=8, policy="magic"), "policy 'magic'"),
])
def test_bad_arguments_name_themselves(kwargs, message):
    with pytest.raises(EplbError, match=message):
        rebalance(np.ones((2, 8)), **kwargs)


@pytest.mark.parametrize("bad,message", [(-1.0, "negative"), (np.nan, "NaN")])
def test_bad_loads(bad, message):
    load = np.ones((2, 8))
    load[1, 3] = bad
    with pytest.raises(EplbError, match=message):
        rebalance(load, 8)


def test_old_placement_keeps_experts_in_place_without_changing_balance():
    old_load, new_load = synthetic_load(4, 32, 1.0, seed=1), synthetic_load(4, 32, 1.0, seed=1) * 1.01
    old = rebalance(old_load, 48, 4, 2, 8)
    fresh = rebalance(new_load, 48, 4, 2, 8)
    kept = rebalance(new_load, 48, 4, 2, 8, old_placement=old)
    assert np.allclose(np.sort(gpu_loads(new_load, kept.phy2log, 8), axis=1),
                       np.sort(gpu_loads(new_load, fresh.phy2log, 8), axis=1))
    assert moved_slots(kept.phy2log, old.phy2log) <= moved_slots(fresh.phy2log, old.phy2log)
    assert moved_slots(kept.phy2log, old.phy2log) == 0  # same ranking of loads: nothing needs to move


def test_load_window_folds_slots_and_slides(tmp_path):
    w = ExpertLoadWindow(num_layers=1, num_experts=3, window=2)
    phy2log = np.array([[0, 1, 2, 0]])  # expert 0 has two slots
    w.record(np.array([[1, 2, 3, 4]]), phy2log)
    assert w.load().tolist() == [[5, 2, 3]]
    w.record(np.array([[1, 1, 1, 1]]), phy2log)
    w.record(np.array([[0, 0, 10, 0]]), phy2log)  # the first pass falls out of the window
    assert w.load().tolist() == [[2, 1, 11]]
    other = ExpertLoadWindow(1, 3, 2)
    other.record_logical(np.array([[1, 1, 1]]))
    assert w.merge(other).load().tolist() == [[3, 2, 12]]
    path = tmp_path / "window.json"
    path.write_text(json.dumps(w.to_dict()))
    assert read_load(path).tolist() == [[2, 1, 11]]
    np.save(tmp_path / "load.npy", np.ones((5, 1, 3)))
    assert read_load(tmp_path / "load.npy").tolist() == [[5, 5, 5]]
    with pytest.raises(ValueError, match="non-negative"):
        w.record_logical(np.array([[-1, 0, 0]]))


def test_engine_windows_keep_each_engines_load_or_one_for_all():
    phy2log = [np.array([[0, 1, 2, 0]]), np.array([[0, 1, 2, 1]])]  # engine 1 replicates expert 1
    counts = [np.array([[1, 2, 3, 4]]), np.array([[1, 1, 1, 1]])]
    placements = EnginePlacements(tuple(Placement(p) for p in phy2log))
    own = EngineLoadWindows(1, 3, engines=2, per_engine=True)
    own.record(counts, placements)
    assert own.load().tolist() == [[[5, 2, 3]], [[1, 2, 1]]]
    shared = EngineLoadWindows(1, 3, engines=2)
    shared.record(counts, placements)  # summed in logical experts, each engine by its own slots
    assert shared.load().tolist() == [[6, 4, 4]]
    own.resize(3)  # a new engine starts from nothing
    assert own.load().shape == (3, 1, 3) and own.load()[2].sum() == 0
    with pytest.raises(ValueError, match="2 engines for 3"):
        own.record(counts, placements)


def test_per_engine_loads_give_each_engine_its_own_placement():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                                 inference=dict(tp=2, dp=2, enable_ep=True, engines=2),
                                 eplb=dict(enabled=True, num_redundant_experts=4)))
    L, E = len(job.model.moe_layers), job.model.num_experts
    hot = [synthetic_load(L, E, zipf=1.5, seed=s) for s in (1, 2)]
    placement = job.placement(np.stack(hot))
    for k in range(2):  # each engine's own: what a shared load of its traffic alone would give
        assert np.array_equal(placement.of_engine(k).phy2log, job.placement(hot[k]).phy2log)
    assert job.balancedness(np.stack(hot), placement) == min(job.balancedness(hot[k], job.placement(hot[k]))
                                                             for k in range(2))
    again = placement_from_phy2log(placement.phy2log.tolist())
    assert isinstance(again, EnginePlacements) and np.array_equal(again.phy2log, placement.phy2log)
    with pytest.raises(EplbError, match=r"expected \[2 engines \(inference.engines\)"):
        job.placement(np.stack(hot * 2))
    with pytest.raises(PlacementError, match="engine 1's placement: MoE layer 0 has no slot"):
        bad = placement.phy2log.copy()
        bad[1, 0] = 0
        job.placement(None)  # the identity is fine
        from planners.build import PlanBuilder
        PlanBuilder.for_job(job).plan(placement_from_phy2log(bad))


@pytest.mark.parametrize("preset,inference,redundant", [
    ("tiny_qwen3_moe", dict(tp=2, dp=2, enable_ep=True, engines=2), 4),
    ("tiny_deepseek_v3", dict(tp=2, dp=2, enable_ep=True), 8),
    ("tiny_mixtral", dict(tp=2, pp=2, enable_ep=True), 4),
    ("tiny_glm4_moe", dict(tp=2, dp=2, enable_ep=True), 4),
])
def test_plans_fill_a_rebalanced_placement_exactly(preset, inference, redundant):
    job = JobSpec.from_dict(dict(model=dict(preset=preset), trainer=dict(tp=2, ep=2), inference=inference,
                                 eplb=dict(enabled=True, num_redundant_experts=redundant),
                                 deployment=dict(gpus_per_node=2)))
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, zipf=1.2, seed=7)
    plan = assert_plan_exact(job, load=load)
    assert not np.array_equal(plan.placement.phy2log, job.placement().phy2log)  # not the initial placement
    assert plan.placement.logcnt.max() > 1  # hot experts got replicas
