"""Byte runs (what batched copy kernels execute) move exactly what the plan's chunks move."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_properties import jobs

from planners import JobSpec, build_plan
from planners.buckets import bucketize
from planners.runs import BUFFER, RUN_DTYPE, apply_runs, chunk_runs, merge_runs
from sync.tensors import TORCH_DTYPES, block


def _locals(plan, seed: int) -> dict[int, np.ndarray]:
    """Random bytes in trainer tensors, a marker byte in engine tensors."""
    rng = np.random.default_rng(seed)
    out = {}
    for lid, shape in enumerate(plan.local_shape):
        n = int(np.prod(shape)) * TORCH_DTYPES[plan.local_dtype[lid]].itemsize
        trainer = plan.local_rank[lid] < plan.num_trainer
        out[lid] = rng.integers(0, 256, n, dtype=np.uint8) if trainer else np.full(n, 0xA5, dtype=np.uint8)
    return out


def _by_views(plan, ends: dict[int, np.ndarray]) -> None:
    """The executor's per-chunk reference: strided block views, one copy per chunk."""
    c = plan.chunks
    flats = {k: torch.from_numpy(v) for k, v in ends.items()}
    for row in np.argsort(c["stage"], kind="stable").tolist():
        t = plan.tensors[c["tensor"][row]]
        dt = TORCH_DTYPES[t.dtype]
        n = int(c["hi"][row] - c["lo"][row])
        view = lambda side: block(flats[int(c[f"{side}_local"][row])].view(dt), int(c[f"{side}_base"][row]),  # noqa: E731
                                  t.outer, int(c[f"{side}_dim"][row]), t.inner, int(c[f"{side}_off"][row]), n)
        view("dst").copy_(view("src"))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs(), st.integers(0, 2**16), st.sampled_from([64, 1000, 1 << 20]))
def test_runs_and_bucket_runs_equal_per_chunk_views(job, seed, bucket_bytes):
    plan = build_plan(job)
    want = _locals(plan, seed)
    _by_views(plan, want)
    direct = _locals(plan, seed)
    via_buckets = _locals(plan, seed)
    for stage in (1, 2):
        rows = np.flatnonzero(plan.chunks["stage"] == stage)
        apply_runs(chunk_runs(plan, rows), direct)
        for b in bucketize(plan, bucket_bytes, direct_bytes=1 << 62):
            if b.stage != stage:
                continue
            buf = np.full(b.nbytes, 0x5A, dtype=np.uint8)
            apply_runs(chunk_runs(plan, b.chunk, b.lo, b.hi, dst_buffer=b.offset), {**via_buckets, BUFFER: buf})
            apply_runs(chunk_runs(plan, b.chunk, b.lo, b.hi, src_buffer=b.offset), {**via_buckets, BUFFER: buf})
    for lid in want:
        np.testing.assert_array_equal(direct[lid], want[lid], err_msg=plan.local_name[lid])
        np.testing.assert_array_equal(via_buckets[lid], want[lid], err_msg=plan.local_name[lid])


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
