"""Where a CUDA IPC direct sync's time goes beyond its pull kernel: two processes on one GPU (the
dense 1.7B case of ``rlsync bench gpu --ipc``), each profiled over many syncs (cProfile, sorted by
own time), after the median of unprofiled syncs. ``python scripts/profile_ipc_direct.py OUT_DIR``."""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from pathlib import Path


def _timeline(ex, syncs) -> dict:
    """Each step's median start and end in ms from the sync's start, over ``syncs()`` (wrapped methods)."""
    import torch

    import sync.executor as executor

    marks: list[tuple[str, float, float]] = []

    def wrap(owner, name: str, label: str) -> None:
        fn = getattr(owner, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                marks.append((label, t0, time.perf_counter()))
        setattr(owner, name, timed)

    for name in ("_sync", "_endpoint_tensors", "_launch_kept", "_local_copies", "_recheck", "_count_lent",
                 "_pull_from_lenders", "_launch_pulls", "_run_rounds", "_derive"):
        wrap(ex, name, name)
    for name in ("begin", "start", "borrow", "pulled", "end"):
        wrap(ex.direct_ipc, name, f"ipc.{name}")
    wrap(torch.cuda, "synchronize", "cuda.synchronize")
    wrap(executor, "finish_sync", "finish_sync")
    per_sync = []
    for _ in range(syncs):
        marks.clear()
        ex_start = time.perf_counter()
        yield
        per_sync.append([(label, (a - ex_start) * 1e3, (b - ex_start) * 1e3) for label, a, b in marks])
    steps: dict[str, list] = {}
    for marks_of in per_sync:
        seen: dict[str, int] = {}
        for label, a, b in sorted(marks_of, key=lambda m: m[1]):
            i = seen[label] = seen.get(label, -1) + 1
            steps.setdefault(f"{label}#{i}", []).append((a, b))
    return {k: [round(statistics.median(a for a, _ in v), 4), round(statistics.median(b for _, b in v), 4)]
            for k, v in sorted(steps.items(), key=lambda kv: statistics.median(a for a, _ in kv[1]))}


def _worker(rank: int, port: int, out: str, reps: int) -> dict:
    import torch

    from planners import JobSpec, SyncSettings, build_plan
    from sync.bench.gpu import CASES, endpoints
    from sync.session import Session
    from sync.transport import standalone_transport

    torch.cuda.set_device(0)
    plan = build_plan(JobSpec.from_dict(CASES["dense 1.7B tp1->tp1"])).validate()
    transport = standalone_transport(rank, 2, "127.0.0.1", port, 300, store_on_rank0=False)
    sources, targets = endpoints(plan, [rank])
    session = Session.open(plan, rank, transport, sources, targets, SyncSettings(bucket_mb=256, timeout_s=300),
                           ipc="direct")
    ex, source, target = session.executor, session.source, session.target
    for _ in range(5):
        ex.sync(source, target, verify=False)
    times, own = [], []
    for _ in range(reps):
        transport.barrier().wait()
        stats = ex.sync(source, target, verify=False)
        times.append(stats.global_seconds)
        own.append(stats.seconds)
    profile = cProfile.Profile()
    for _ in range(reps):
        transport.barrier().wait()
        profile.enable()
        ex.sync(source, target, verify=False)
        profile.disable()
    timeline = {}
    steps = _timeline(ex, reps)
    for _ in range(reps):
        transport.barrier().wait()
        next(steps)
        ex.sync(source, target, verify=False)
    try:
        next(steps)
    except StopIteration as done:
        timeline = done.value
    Path(out, f"timeline_{rank}.json").write_text(json.dumps(timeline, indent=1))
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(40)
    pstats.Stats(profile, stream=text).sort_stats("cumtime").print_stats(40)
    Path(out, f"profile_{rank}.txt").write_text(text.getvalue())
    return dict(global_ms=statistics.median(times) * 1e3, own_ms=statistics.median(own) * 1e3)


def main() -> None:
    from sync.run.local import host_store, spawn_ranks

    out = sys.argv[1]
    Path(out).mkdir(parents=True, exist_ok=True)
    store = host_store(timeout_s=300)
    results, _ = spawn_ranks(2, _worker, (store.port, out, 100), timeout_s=600)
    print(results)


if __name__ == "__main__":
    main()
