"""Byte runs (what batched copy kernels execute) move exactly what the plan's chunks move."""

from __future__ import annotations

import numpy as np

from planners import JobSpec, build_plan
from planners.schedule.runs import RUN_DTYPE, chunk_runs, merge_runs


def test_row_split_tensors_between_equal_layouts_merge_into_one_run():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1), inference=dict(tp=1),
                                 deployment=dict(mode="colocated")))
    plan = build_plan(job)
    runs = chunk_runs(plan, np.arange(len(plan.chunks)))
    assert runs["nbytes"].sum() == plan.chunks["nbytes"].sum()
    o_proj = [lid for lid, name in enumerate(plan.local_name) if name.endswith("self_attn.o_proj.weight")]
    assert o_proj and plan.tensors[0].outer == 1
    for lid in o_proj:  # split along dim 1: one strided block of `hidden` rows, contiguous at both ends
        assert plan.local_shape[lid][0] > 1
        assert (runs["dst"] == lid).sum() == 1, plan.local_name[lid]


def test_merge_joins_only_runs_continuing_at_both_ends():
    runs = np.array([(0, 0, 1, 100, 8, 1, 8, 8), (0, 8, 1, 108, 8, 1, 8, 8), (0, 16, 1, 200, 8, 1, 8, 8),
                     (2, 24, 1, 208, 8, 1, 8, 8), (2, 32, 1, 216, 8, 2, 64, 8), (2, 48, 1, 232, 8, 1, 8, 8)],
                    dtype=RUN_DTYPE)
    merged = merge_runs(runs)  # a strided run (rows 2) neither joins nor is joined
    assert merged.tolist() == [(0, 0, 1, 100, 16, 1, 16, 16), (0, 16, 1, 200, 8, 1, 8, 8), (2, 24, 1, 208, 8, 1, 8, 8),
                               (2, 32, 1, 216, 8, 2, 64, 8), (2, 48, 1, 232, 8, 1, 8, 8)]


def test_row_split_resharding_makes_one_strided_run_per_chunk():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2), inference=dict(tp=4)))
    plan = build_plan(job)
    rows = np.flatnonzero([plan.local_name[c["dst_local"]].endswith("o_proj.weight") for c in plan.chunks])
    runs = chunk_runs(plan, rows)
    hidden = plan.local_shape[plan.chunks["dst_local"][rows[0]]][0]
    assert len(runs) == len(rows) and (runs["rows"] == hidden).all()
    assert (runs["src_stride"] == 2 * runs["nbytes"]).all() and (runs["dst_stride"] == runs["nbytes"]).all()
