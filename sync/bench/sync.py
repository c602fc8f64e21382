"""``rlsync bench sync``: the plan executor against the rank-0 broadcast baseline, side by side.

All ranks run as local processes: one per rank, or (``hosted``) one per device hosting the ranks on
it, as colocated GPUs must (NCCL cannot join two processes of one GPU). With ``backend="nccl"``
each process works on its GPU (``plan.devices`` modulo the GPUs here). Each repetition runs, in
turn, the plan executor, the baseline (not with ``hosted``) and a *raw* exchange: the plan's bytes
between each pair of processes sent as plain bucket-sized messages, with no packing, at the same
concurrency. The raw exchange gives the bandwidth a process gets here; the bound is the plan's lower
bound with that bandwidth on every link between devices (and, on GPUs, a measured device copy for
same-device chunks). Medians over the repetitions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from planners.cost import Links
from planners.plan import SyncPlan
from sync.bench.timing import usable_cores

__all__ = ["bench_sync"]


def _raw_plan(plan: SyncPlan, ranks: list[int], bucket_bytes: int, process_of) -> list[tuple[int, int, int, int]]:
    """(stage, round, peer process, nbytes) messages of the process hosting ``ranks``: every pair's
    bytes of a stage, in messages of the pair's share of a round (as the executor's buckets), message
    k of every pair in round k -- the plan's traffic between processes without packing."""
    from planners.schedule.buckets import fanout, pair_share

    fan = fanout(plan, np.asarray(process_of))
    c = plan.chunks
    hosted = np.isin(np.arange(plan.num_ranks), ranks)
    me = int(process_of[ranks[0]])
    out = []
    for stage in (1, 2):
        s = c[(c["stage"] == stage) & (hosted[c["src"]] != hosted[c["dst"]])]
        pairs: dict[tuple[int, int], int] = {}
        for src, dst, n in zip(process_of[s["src"]].tolist(), process_of[s["dst"]].tolist(), s["nbytes"].tolist()):
            pairs[(src, dst)] = pairs.get((src, dst), 0) + n
        for (src, dst), total in sorted(pairs.items()):
            peer = dst if src == me else src
            sign = 1 if src == me else -1  # + send, - receive
            size = pair_share(fan, stage, src, dst, bucket_bytes)
            for k, start in enumerate(range(0, total, size)):
                out.append((stage, k, peer, sign * min(size, total - start)))
    return sorted(out)


def _raw_exchange(transport, messages, buffer: torch.Tensor, timeout_s: float) -> float:
    from sync.channels import wait_all

    t0 = time.perf_counter()
    rounds: dict[tuple[int, int], list] = {}
    for stage, k, peer, n in messages:
        rounds.setdefault((stage, k), []).append((peer, n))
    for key in sorted(rounds):
        ops, offset = [], 0
        for peer, n in rounds[key]:
            ops.append((n > 0, buffer[offset: offset + abs(n)], peer))
            offset += abs(n)
        wait_all(transport.batch(ops), [f"raw exchange round {key}"] * len(ops), timeout_s)
    return time.perf_counter() - t0


def _max_seconds(transport, seconds: float, device) -> float:
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    transport.all_reduce(t, dist.ReduceOp.MAX).wait()
    return float(t.item())


def _copy_gbps(device, nbytes: int = 1 << 30) -> float:
    """A flat device-to-device copy's payload bandwidth (what same-device chunks can reach)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times[1:]) / 1e9


_PARTS = ("seconds", "pack_seconds", "wait_seconds", "unpack_seconds")


def _worker(proc: int, plan: SyncPlan, groups: list[list[int]], reps: int, bucket_bytes: int, timeout_s: float,
            port: int, backend: str, gpus: int, direct_bytes: int | None) -> dict[str, Any]:
    from planners import SyncSettings
    from sync.baseline import BroadcastExecutor
    from sync.ends.synthetic import BufferTarget, SyntheticSource
    from sync.session import Session
    from sync.transport import standalone_transport

    ranks = groups[proc]
    process_of = np.zeros(plan.num_ranks, dtype=np.int64)
    for p, g in enumerate(groups):
        process_of[g] = p
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", int(plan.devices[ranks[0]]) % gpus)
        torch.cuda.set_device(device)
    transport = standalone_transport(proc, len(groups), "127.0.0.1", port, timeout_s, backend, store_on_rank0=False)
    sources = {r: SyntheticSource(plan, r, 0, 1, device=str(device)) for r in ranks if r < plan.num_trainer}
    targets = {r: BufferTarget(plan, r, device=str(device)) for r in ranks if r >= plan.num_trainer}
    alone = len(ranks) == 1
    one = lambda d: (next(iter(d.values())) if d else None) if alone else d  # noqa: E731
    session = Session.open(plan, ranks, transport, sources, targets,
                           SyncSettings(bucket_mb=bucket_bytes / (1 << 20), timeout_s=timeout_s),
                           process_of=process_of, direct_bytes=direct_bytes)
    plan_ex = session.executor
    # the baseline broadcasts full-precision tensors: none for FP8 engines (their bytes are made by the plan)
    base_ex = (BroadcastExecutor(plan, ranks[0], transport, timeout_s)
               if alone and len(groups) == plan.num_ranks and not plan.derived.size else None)
    messages = _raw_plan(plan, ranks, bucket_bytes, process_of)
    per_round: dict[tuple[int, int], int] = {}
    for stage, k, _, n in messages:
        per_round[(stage, k)] = per_round.get((stage, k), 0) + abs(n)
    buffer = torch.empty(max(per_round.values(), default=1), dtype=torch.uint8, device=device)
    # the plan executor with and without verification: what checksums add is the difference of their
    # end-to-end times (from a common barrier to the last process's return), measured in the same run
    # ("elements": verified with checksums read element by element, the words of earlier versions)
    modes = ["plan", "checked", "elements", "raw"] + (["broadcast"] if base_ex is not None else [])
    out: dict[str, Any] = {m: [] for m in modes}
    out.update(verified=True, sent=0, received=0, sent_to={}, parts=[], messages=len(plan_ex.buckets), verify=[],
               walls={"plan": [], "checked": [], "elements": []}, cpu={"plan": [], "checked": [], "elements": []}, copy_gbps=_copy_gbps(device) if device.type == "cuda" else None)
    for i in range(reps):
        for mode in modes if i % 2 == 0 else modes[::-1]:
            transport.barrier().wait()
            if mode == "raw":
                raw = _raw_exchange(transport, messages, buffer, timeout_s)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                out["raw"].append(_max_seconds(transport, raw, device))
                continue
            if mode in out["walls"]:  # the first sync of each (the first binds) is verified
                session.executor.verifier.read_words(mode != "elements")  # every process alike
                t0, cpu0 = time.perf_counter(), time.process_time()
                stats = session.sync(3 * i + modes.index(mode), verify=mode != "plan" or i == 0)
                cpu = time.process_time() - cpu0  # every thread of this process, kernel time included
                wall = _max_seconds(transport, time.perf_counter() - t0, device)
                if i > 0:
                    out["walls"][mode].append(wall)
                    out["cpu"][mode].append(cpu)
                    if mode == "checked":
                        out["verify"].append(stats.verify_seconds)
            else:
                stats = base_ex.sync(one(sources), one(targets), verify=i == 0)
            out[mode].append(stats.global_seconds)
            if mode == "plan" and i > 0:  # where this process's time went (the first sync also binds)
                out["parts"].append({k: getattr(stats, k) for k in _PARTS})
            if i == 0:
                out["verified"] &= bool(stats.verified)
                if mode == "plan":
                    out["sent"], out["received"], out["sent_to"] = stats.bytes_sent, stats.bytes_received, stats.sent_to
    return out


def bench_sync(plan: SyncPlan, reps: int = 5, bucket_bytes: int = 64 << 20, timeout_s: float = 300.0,
               backend: str = "gloo", hosted: bool = False, gpus: int | None = None,
               direct_bytes: int | None = None) -> dict[str, Any]:
    """``hosted``: one process per device hosting its ranks (no broadcast baseline then, nor for FP8 plans).
    ``direct_bytes``: the executor's (default: its backend's)."""
    from sync.run.local import host_store, spawn_ranks

    if backend == "nccl":
        gpus = gpus or torch.cuda.device_count()
        if not gpus:
            raise ValueError("backend 'nccl' needs CUDA GPUs")
    groups = ([np.flatnonzero(plan.devices == d).tolist() for d in np.unique(plan.devices)] if hosted
              else [[r] for r in range(plan.num_ranks)])
    store = host_store(timeout_s=timeout_s)
    results, _ = spawn_ranks(len(groups), _worker, (plan, groups, reps, bucket_bytes, timeout_s, store.port, backend,
                                                    gpus or 1, direct_bytes), timeout_s=timeout_s * (3 * reps + 2))
    r0 = results[0]
    sync_s, raw_s = statistics.median(r0["plan"]), statistics.median(r0["raw"])
    base_s = statistics.median(r0["broadcast"]) if "broadcast" in r0 else None
    per_rank = max(max(r["sent"], r["received"]) for r in results.values())
    copy = min((r["copy_gbps"] for r in results.values() if r["copy_gbps"]), default=None)
    if per_rank and raw_s > 0:
        gbps = per_rank / raw_s / 1e9  # what one process moves per second, all processes at once
    else:  # nothing crosses between processes: only same-device copies are bounded
        gbps = copy or 1.0
    copy = copy or gbps
    measured = Links(same_device_gbps=copy, nvlink_gbps=gbps, nic_gbps=gbps)
    bound = replace(plan, links=measured).lower_bound()
    moved = int(plan.chunks["nbytes"].sum())
    links = {}
    for p, r in results.items():  # achieved GB/s of each sending process to each peer rank
        for peer, n in r["sent_to"].items():
            links[f"{groups[p]}->{peer}"] = n / sync_s / 1e9
    walls = {mode: statistics.median(w) if w else None for mode, w in r0["walls"].items()}

    def added(mode: str) -> float | None:  # what verifying adds to the median unverified sync
        return None if walls["plan"] is None else walls[mode] - walls["plan"]

    # CPU time of a sync, summed over the processes (each one's median): with the wall time and the
    # cores, how busy the machine was -- checksums can hide only in the cores' idle time
    cpu = {mode: sum(statistics.median(r["cpu"][mode]) for r in results.values()) if walls[mode] is not None else None
           for mode in ("plan", "checked")}
    cores = usable_cores()

    return {
        "sync_seconds": sync_s,
        # what verification adds to a sync: median end-to-end time of verified syncs minus that of
        # unverified ones, alternating in one run (syncs after the first; needs reps > 1)
        "verify_seconds": added("checked"),
        "verified_sync_seconds": walls["checked"],
        # the same with checksums read element by element (no 4-byte words), alternating with the others
        "verify_elements_seconds": added("elements"),
        "unverified_sync_seconds": walls["plan"],
        # CPU seconds of an unverified and a verified sync, all processes together (threads and kernel time included)
        "process_cpu_seconds": {"unverified": cpu["plan"], "verified": cpu["checked"]},
        # the share of the cores' time an unverified sync keeps busy (CPU processes; GPU waits count as idle)
        "cpu_busy": cpu["plan"] / (walls["plan"] * cores) if walls["plan"] and backend == "gloo" else None,
        "cores": cores,
        # the slowest process's median time in verification (its checksums, the exchange, and waiting
        # there for the processes still moving bytes)
        "verify_process_seconds": max((statistics.median(r["verify"]) for r in results.values() if r["verify"]),
                                      default=None),
        "baseline_seconds": base_s,
        "raw_seconds": raw_s,
        "copy_gbps": copy,
        "link_gbps": links,
        "bound_seconds": bound,
        "measured_gbps_per_rank": gbps,
        "bytes_moved": moved,
        "max_bytes_per_rank": per_rank,
        "sync_gbps": moved / sync_s / 1e9,
        "sync_over_bound": sync_s / bound if bound else float("nan"),
        "baseline_over_sync": base_s / sync_s if base_s is not None else None,
        "verified": all(r["verified"] for r in results.values()),
        "messages_per_process": max(r["messages"] for r in results.values()),
        "bytes_per_process": {str(groups[p]): dict(sent=r["sent"], received=r["received"]) for p, r in sorted(results.items())},
        # the slowest process's median of each part of a sync after the first
        "parts_seconds": {k: max(statistics.median(p[k] for p in r["parts"]) for r in results.values())
                          for k in _PARTS} if reps > 1 else None,
        "ranks": plan.num_ranks,
        "processes": len(groups),
        "backend": backend,
        "repetitions": reps,
    }
