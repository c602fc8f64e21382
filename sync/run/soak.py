"""Placement-change soak: many successive EPLB placements, redundant-slot counts and engine counts,
a verified sync after each, on one set of local processes.

Every rank derives the same sequence of jobs and plans from the seed, so no driver is needed:
iteration i draws a skew, a redundant-slot count and a number of engines (1 to the job's), computes
the placement from a synthetic load, plans, and syncs new weights into freshly zeroed engines (so a
joining engine's full weights are checked like everyone's); every engine tensor's checksum must
match every time. Processes of engines that sit an iteration out wait; each engine count syncs
over its own subgroup of the processes (made once, by every process, in the same order).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from planners import JobSpec, build_plan
from planners.eplb.stats import synthetic_load

__all__ = ["soak_jobs", "run_soak"]


def soak_jobs(job: JobSpec, iterations: int, seed: int = 0):
    """(job, load) of every iteration: the same on every rank."""
    rng = np.random.default_rng(seed)
    ep = job.inference.ep_size
    for i in range(iterations):
        redundant = int(rng.integers(0, 3)) * ep  # keeps slots divisible by the EP size
        engines = int(rng.integers(1, job.inference.engines + 1))
        j = replace(job, eplb=job.eplb.model_copy(update=dict(enabled=True, num_redundant_experts=redundant)),
                    inference=replace(job.inference, engines=engines))
        load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, float(rng.uniform(0, 1.5)),
                              seed=seed * 100003 + i)
        yield j, load


def _worker(rank: int, job: JobSpec, iterations: int, seed: int, port: int, timeout_s: float) -> dict[str, Any]:
    from planners import SyncSettings
    from sync.ends.base import fill_from_full
    from sync.ends.synthetic import BufferTarget, SyntheticSource, synthetic_tensor
    from sync.session import Session
    from sync.transport import standalone_transport

    T, E = job.trainer.world_size, job.inference.engine_size
    transport = standalone_transport(rank, T + E * job.inference.engines, "127.0.0.1", port, timeout_s,
                                     store_on_rank0=False)
    groups = {k: transport.subgroup(list(range(T + E * k))) for k in range(1, job.inference.engines + 1)}
    source = None
    settings = SyncSettings(bucket_mb=1 / 16, timeout_s=timeout_s)  # 64 KiB buckets: many rounds per sync
    verified, placements, engine_counts = 0, set(), set()
    for i, (j, load) in enumerate(soak_jobs(job, iterations, seed)):
        group = groups[j.inference.engines]
        if group is None:  # this engine sits the iteration out
            continue
        plan = build_plan(j, load)
        placements.add(plan.placement.phy2log.tobytes())
        engine_counts.add(j.inference.engines)
        if rank < plan.num_trainer:
            if source is None:
                source = SyntheticSource(plan, rank, seed, i)
            else:
                fill_from_full(plan, rank, source.local_tensors(),
                               lambda tid: synthetic_tensor(plan.tensors[tid], tid, seed, i))
            target = None
        else:
            target = BufferTarget(plan, rank)  # zeroed: the slot count may have changed, or the engine is new
        stats = Session.open(plan, rank, group, source, target, settings).sync(i)
        if not stats.verified:
            raise AssertionError(f"iteration {i}: verification failed on some rank: {stats.mismatched}")
        verified += 1
    return {"verified": verified, "distinct_placements": len(placements), "engine_counts": sorted(engine_counts)}


def run_soak(job: JobSpec, iterations: int, seed: int = 0, timeout_s: float = 60.0) -> dict[str, Any]:
    from sync.run.local import host_store, spawn_ranks

    store = host_store(timeout_s=timeout_s)

    world = job.trainer.world_size + job.inference.world_size
    results, _ = spawn_ranks(world, _worker, (job, iterations, seed, store.port, timeout_s),
                             timeout_s=timeout_s * (iterations + 2))
    return results[0]
