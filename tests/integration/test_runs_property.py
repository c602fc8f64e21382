"""Byte runs and bucket runs move exactly what the plan's chunks move, on random layout pairs (slow:
a Python reference executor over every run)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planners import build_plan
from planners.schedule.buckets import bucketize
from planners.schedule.runs import BUFFER, apply_runs, chunk_runs
from strategies import jobs
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
