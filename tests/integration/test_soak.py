"""A short placement-change soak (scripts/soak_placements.py runs the long one)."""

from __future__ import annotations

from planners import JobSpec
from sync.run.soak import run_soak


def test_every_slot_exact_through_many_placement_and_engine_count_changes():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                                 inference=dict(tp=2, dp=2, enable_ep=True, engines=2), deployment=dict(gpus_per_node=4)))
    out = run_soak(job, iterations=12, seed=1)
    assert out["verified"] == 12 and out["distinct_placements"] >= 10
    assert out["engine_counts"] == [1, 2]  # engines joined and left between syncs
