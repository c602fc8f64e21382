"""The plan as data: validate() rejects every kind of broken plan; buckets and transfers line up."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from planners import JobSpec, PlanError, SyncPlan, build_plan


@pytest.fixture(scope="module")
def plan():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2, dp=2),
                                 inference=dict(tp=2, dp=2, enable_ep=True, engines=2),
                                 deployment=dict(gpus_per_node=4), eplb=dict(num_redundant_experts=4)))
    return build_plan(job).validate()


def broken(plan, edit):
    chunks = plan.chunks.copy()
    chunks = edit(chunks)
    return dataclasses.replace(plan, chunks=chunks)


def first(chunks, stage):
    return int(np.flatnonzero(chunks["stage"] == stage)[0])


def _set(chunks, i, **values):
    for k, v in values.items():
        chunks[k][i] = v
    return chunks


@pytest.mark.parametrize("edit,message", [
    (lambda c: np.delete(c, len(c) - 1), "not written exactly once"),
    (lambda c: np.concatenate([c, c[:1]]), "written twice"),
    (lambda c: _set(c, len(c) - 1, dst_off=c["dst_off"][-1] + 1), "destination block does not hold"),
    (lambda c: _set(c, len(c) - 1, src_off=c["src_off"][-1] + 1), "source block does not hold"),
    (lambda c: _set(c, first(c, 1), src=(c["src"][first(c, 1)] + 1) % 8), "source block does not hold"),
    (lambda c: _set(c, first(c, 2), src_local=c["dst_local"][first(c, 2)], src=c["dst"][first(c, 2)],
                    src_base=c["dst_base"][first(c, 2)], src_off=c["dst_off"][first(c, 2)]),
     "did not receive"),
    (lambda c: _set(c, 0, link=(c["link"][0] + 1) % 3), "link class"),
    (lambda c: _set(c, 0, nbytes=c["nbytes"][0] + 2), "byte count"),
    (lambda c: _set(c, first(c, 1), stage=3), "stage 1 or 2"),
])
def test_validate_rejects_broken_plans(plan, edit, message):
    with pytest.raises(PlanError, match=message):
        broken(plan, edit).validate()


def test_bucket_offsets_pack_each_pair_back_to_back(plan):
    offsets = plan.bucket_offsets()
    total = 0
    for tr in plan.transfers():
        rows = np.flatnonzero((plan.chunks["stage"] == tr.stage) & (plan.chunks["src"] == tr.src)
                              & (plan.chunks["dst"] == tr.dst))
        assert offsets[rows[0]] == 0
        assert np.array_equal(offsets[rows][1:], np.cumsum(plan.chunks["nbytes"][rows])[:-1])
        total += tr.nbytes
    assert total == plan.chunks["nbytes"].sum()


def test_json_round_trip(plan, tmp_path):
    path = tmp_path / "plan.json"
    plan.to_json(path)
    again = SyncPlan.from_json(path).validate()
    assert np.array_equal(again.chunks, plan.chunks)
    assert again.predicted_time() == pytest.approx(plan.predicted_time())
    assert again.lower_bound() == pytest.approx(plan.lower_bound())


def test_traffic_totals_agree(plan):
    assert plan.traffic_matrix().sum() == plan.chunks["nbytes"].sum()
    assert sum(plan.bytes_by_stage().values()) == sum(plan.bytes_by_link().values())
    assert plan.bytes_out().sum() == plan.bytes_in().sum()


def test_two_slots_of_one_expert_on_one_rank_arrive_once():
    """Redundant slots of one expert on the same rank: one network copy, then a copy on the GPU;
    the bound counts those bytes once too."""
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1),
                                 inference=dict(tp=1, enable_ep=True), eplb=dict(num_redundant_experts=2),
                                 deployment=dict(gpus_per_node=2)))
    plan = build_plan(job).validate()
    self_copies = plan.chunks[(plan.chunks["stage"] == 2)]
    assert len(self_copies) and (self_copies["src"] == self_copies["dst"]).all() and (self_copies["link"] == 0).all()
    assert plan.predicted_time() >= plan.lower_bound()
