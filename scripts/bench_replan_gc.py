"""What Python's garbage collector costs the first sync after a new expert placement, on CPU.

The DeepSeek-V3-like colocated case of ``rlsync bench gpu -- --replan`` with every endpoint tensor on the
meta device (the ~72,000 tensors and the plan's objects are there, the 41 GB of bytes are not, so it
runs on any machine): for each of ``--changes`` placements, the session's rebind then the first sync,
timing the collections that run inside that sync (``gc.callbacks``), with the collector paused during
syncs (the default) and allowed to run (``collect_during_sync=True``), each in a fresh process.

Usage: python scripts/bench_replan_gc.py [--changes 5]
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing as mp
import statistics
import time


def _run(collect: bool, changes: int) -> dict:
    import torch

    import sync.executor as executor
    from planners import JobSpec, SyncSettings
    from planners.build import PlanBuilder
    from planners.eplb.stats import synthetic_load
    from sync.bench.gpu import CASES, Tensors
    from sync.bench.timing import Collections
    from sync.ends.base import end_locals
    from sync.session import Session
    from sync.tensors import TORCH_DTYPES
    from sync.transport import SoloTransport

    finish = executor.finish_sync  # its all-reduce of the sync's time reads a number back: not on meta
    executor.finish_sync = lambda stats, flats, verifier, transport, wait, device, targets=None, plan=None: finish(
        stats, flats, verifier, transport, wait, torch.device("cpu"), targets, plan)
    job = JobSpec.from_dict(CASES["dsv3-like tp2ep4->dp8ep8+32"])
    builder = PlanBuilder.for_job(job)
    loads = [synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=s) for s in range(changes + 1)]
    plan = builder.plan(job.placement(loads[0]))
    sources, targets = {}, {}
    for r in range(plan.num_ranks):
        tensors = {plan.local_name[i]: torch.empty(plan.local_shape[i], dtype=TORCH_DTYPES[plan.local_dtype[i]],
                                                   device="meta") for i in end_locals(plan, r)}
        (sources if r < plan.num_trainer else targets)[r] = Tensors(tensors)
    session = Session.open(plan, range(plan.num_ranks), SoloTransport(), sources, targets, SyncSettings(),
                           collect_during_sync=collect)
    session.executor.sync(session.sources, session.targets, verify=False)
    collections, firsts = Collections(), []
    for load in loads[1:]:
        session.replan(builder.plan(job.placement(load)))
        with collections:
            t0 = time.perf_counter()
            session.executor.sync(session.sources, session.targets, verify=False)
            seconds = time.perf_counter() - t0
        firsts.append(seconds)
    return dict(collect_during_sync=collect, first_sync_s=statistics.median(firsts), first_syncs_s=firsts,
                collecting_inside_s=collections.seconds, tracked_objects=len(gc.get_objects()))


def _child(collect: bool, changes: int, queue) -> None:
    queue.put(_run(collect, changes))


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--changes", type=int, default=5)
    args = ap.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for collect in (True, False):
        queue = ctx.Queue()
        p = ctx.Process(target=_child, args=(collect, args.changes, queue))
        p.start()
        rows.append(queue.get())
        p.join()
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
