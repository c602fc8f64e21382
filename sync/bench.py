"""``rlsync bench sync``: the plan executor against the rank-0 broadcast baseline, side by side.

All ranks run as local processes. Each repetition runs, in turn, the plan executor, the baseline and
a *raw* exchange: the plan's bytes between each pair sent as plain bucket-sized messages, with no
packing, at the same concurrency (every rank shares this machine's cores, so a single-pair figure
would flatter the bound). The raw exchange gives the bandwidth a rank gets here; the bound
is the plan's lower bound with that bandwidth on every link class. Medians over the repetitions.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from typing import Any

import torch
import torch.distributed as dist

from planners.cost import Links
from planners.plan import SyncPlan

__all__ = ["bench_sync"]


def _raw_plan(plan: SyncPlan, rank: int, bucket_bytes: int) -> list[tuple[int, int, int, int]]:
    """(stage, round, peer, nbytes) messages of this rank: every pair's bytes of a stage, in
    bucket-sized messages, message k of every pair in round k -- the plan's traffic without packing."""
    c = plan.chunks
    out = []
    for stage in (1, 2):
        s = c[(c["stage"] == stage) & (c["src"] != c["dst"]) & ((c["src"] == rank) | (c["dst"] == rank))]
        pairs: dict[tuple[int, int], int] = {}
        for src, dst, n in zip(s["src"].tolist(), s["dst"].tolist(), s["nbytes"].tolist()):
            pairs[(src, dst)] = pairs.get((src, dst), 0) + n
        for (src, dst), total in sorted(pairs.items()):
            peer = dst if src == rank else src
            sign = 1 if src == rank else -1  # + send, - receive
            for k, start in enumerate(range(0, total, bucket_bytes)):
                out.append((stage, k, peer, sign * min(bucket_bytes, total - start)))
    return sorted(out)


def _raw_exchange(transport, messages, buffer: torch.Tensor, timeout_s: float) -> float:
    from sync.executor import wait_all

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


def _max_seconds(transport, seconds: float) -> float:
    t = torch.tensor([seconds], dtype=torch.float64)
    transport.all_reduce(t, dist.ReduceOp.MAX).wait()
    return float(t.item())


def _worker(rank: int, plan: SyncPlan, reps: int, bucket_bytes: int, timeout_s: float, port: int) -> dict[str, Any]:
    from sync.baseline import BroadcastExecutor
    from sync.endpoints import BufferTarget, SyntheticSource
    from sync.executor import PlanExecutor
    from sync.transport import standalone_transport

    transport = standalone_transport(rank, plan.num_ranks, "127.0.0.1", port, timeout_s, store_on_rank0=False)
    is_trainer = rank < plan.num_trainer
    source = SyntheticSource(plan, rank, 0, 1) if is_trainer else None
    target = None if is_trainer else BufferTarget(plan, rank)
    plan_ex = PlanExecutor(plan, rank, transport, bucket_bytes, timeout_s)
    base_ex = BroadcastExecutor(plan, rank, transport, timeout_s)
    messages = _raw_plan(plan, rank, bucket_bytes)
    per_round: dict[tuple[int, int], int] = {}
    for stage, k, _, n in messages:
        per_round[(stage, k)] = per_round.get((stage, k), 0) + abs(n)
    buffer = torch.empty(max(per_round.values(), default=1), dtype=torch.uint8)
    out: dict[str, Any] = {"plan": [], "broadcast": [], "raw": [], "verified": True, "sent": 0, "received": 0}
    for i in range(reps):
        for mode in ("plan", "broadcast", "raw") if i % 2 == 0 else ("raw", "broadcast", "plan"):
            transport.barrier().wait()
            if mode == "raw":
                out["raw"].append(_max_seconds(transport, _raw_exchange(transport, messages, buffer, timeout_s)))
                continue
            ex = plan_ex if mode == "plan" else base_ex
            stats = ex.sync(source, target, verify=i == 0)
            out[mode].append(stats.global_seconds)
            if i == 0:
                out["verified"] &= bool(stats.verified)
                if mode == "plan":
                    out["sent"], out["received"] = stats.bytes_sent, stats.bytes_received
    return out


def bench_sync(plan: SyncPlan, reps: int = 5, bucket_bytes: int = 64 << 20, timeout_s: float = 300.0) -> dict[str, Any]:
    from sync.launch import host_store, spawn_ranks

    store = host_store(timeout_s=timeout_s)

    results, _ = spawn_ranks(plan.num_ranks, _worker, (plan, reps, bucket_bytes, timeout_s, store.port),
                             timeout_s=timeout_s * (3 * reps + 2))
    r0 = results[0]
    sync_s, base_s, raw_s = (statistics.median(r0[k]) for k in ("plan", "broadcast", "raw"))
    per_rank = max(max(r["sent"], r["received"]) for r in results.values())
    gbps = per_rank / raw_s / 1e9  # what one rank moves per second here, all ranks at once
    measured = Links(same_device_gbps=gbps, nvlink_gbps=gbps, nic_gbps=gbps)
    bound = replace(plan, links=measured).lower_bound()
    moved = int(plan.chunks["nbytes"].sum())
    return {
        "sync_seconds": sync_s,
        "baseline_seconds": base_s,
        "raw_seconds": raw_s,
        "bound_seconds": bound,
        "measured_gbps_per_rank": gbps,
        "bytes_moved": moved,
        "max_bytes_per_rank": per_rank,
        "sync_gbps": moved / sync_s / 1e9,
        "sync_over_bound": sync_s / bound if bound else float("nan"),
        "baseline_over_sync": base_s / sync_s,
        "verified": all(r["verified"] for r in results.values()),
        "ranks": plan.num_ranks,
        "repetitions": reps,
    }
