"""What tests expect to find at the ends of a sync, computed without the executor."""

from __future__ import annotations

import numpy as np

from planners.schedule.runs import RUN_DTYPE
from sync.ends.base import fill_from_full
from sync.ends.synthetic import BufferTarget, SyntheticSource, synthetic_tensor
from sync.tensors import as_bits
from vllm_reference import reference_rank


def expected_engine(job, plan, version, seed=0, held_as=None):
    """Every engine rank's tensors, cut from the synthetic weights of ``version``. ``held_as``: logical
    tensor name -> the narrower dtype the trainer holds it in (its values rounded so before they travel)."""
    held_as = held_as or {}

    def weight(i, t):
        w = synthetic_tensor(t, i, seed, version)
        return w.to(held_as[t.name]).to(w.dtype) if t.name in held_as else w

    full = {t.name: as_bits(weight(i, t)).numpy() for i, t in enumerate(plan.tensors)}
    T = job.trainer.world_size

    def phy2log(rank):  # its engine's own placement, where engines have their own
        placement = plan.placement_of(rank)
        return placement.phy2log if placement is not None else None

    return {T + r: reference_rank(job.model, job.inference, phy2log(T + r), r % job.inference.engine_size, full)
            for r in range(job.inference.world_size)}


def source_shards(plan, rank, version):
    want = BufferTarget(plan, rank)
    fill_from_full(plan, rank, want.tensors, lambda tid: synthetic_tensor(plan.tensors[tid], tid, 0, version))
    return want.tensors


def endpoints(plan, ranks, version, device="cpu"):
    sources = {r: SyntheticSource(plan, r, version=version, device=device) for r in ranks if r < plan.num_trainer}
    targets = {r: BufferTarget(plan, r, device=device) for r in ranks if r >= plan.num_trainer}
    return sources, targets


def random_runs(rng, sizes: list[int], n: int) -> np.ndarray:
    """Non-overlapping destination blocks, sources anywhere; odd offsets, lengths and strides included."""
    runs = np.zeros(n, dtype=RUN_DTYPE)
    cursor = [0] * len(sizes)
    for j in range(n):
        d, s = int(rng.integers(len(sizes))), int(rng.integers(len(sizes)))
        length = int(rng.choice([1, 2, 3, 16, 100, 4096, 9000, 70001, 262144]))
        rows = int(rng.choice([1, 1, 3, 64]))
        src_stride = length + int(rng.choice([0, 2, 16, 1000]))
        dst_stride = length + int(rng.choice([0, 16, 48]))
        align = int(rng.choice([1, 2, 4, 16]))
        start = -(-cursor[d] // align) * align + int(rng.choice([0, 0, 1, 2]))
        if start + (rows - 1) * dst_stride + length > sizes[d]:
            continue
        src_room = sizes[s] - (rows - 1) * src_stride - length
        if src_room <= 0:
            continue
        runs[j] = (s + 100, int(rng.integers(0, src_room)), d + 200, start, length, rows, src_stride, dst_stride)
        cursor[d] = start + (rows - 1) * dst_stride + length
    return runs[runs["nbytes"] > 0]
