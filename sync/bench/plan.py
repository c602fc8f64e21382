"""Time and memory of planning at scale: build, validate and bound each job in a fresh process.

Usage: rlsync bench plan [JOB.yaml ...] [--json] [--loads N]   (default: the DeepSeek-V3 and Kimi-K2 examples)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JOBS = ["examples/deepseek_v3_plan.yaml", "examples/kimi_k2_plan.yaml"]

CHILD = r"""
import json, resource, statistics, sys, time, tracemalloc
t0 = time.perf_counter()
from planners import JobSpec
from planners.build import PlanBuilder
from planners.eplb import rebalance
from planners.eplb.stats import synthetic_load
t_import = time.perf_counter()
job = JobSpec.from_yaml(sys.argv[1])
builder = PlanBuilder(job.model, job.trainer, job.inference, job.deployment, job.placement(None), job.links,
                      job.describe(), (job.trainer_kind, job.engine_kind))
plan = builder.plan(job.placement(None))
t_build = time.perf_counter()
plan.validate()
t_valid = time.perf_counter()
predicted, bound = plan.predicted_time(), plan.lower_bound()
t_cost = time.perf_counter()
world = plan.num_ranks
T = plan.num_trainer
# ranks whose own replan is timed: spread over the trainer and the engines (each rank routes only its part)
sample = sorted({*range(0, T, max(T // 12, 1)), T - 1, *range(T, world, max((world - T) // 12, 1)), world - 1})
for r in sample:
    builder.rank_plan(job.placement(None), [r])  # its placement-free share, once per job (as at start-up)
replans, placing, rank_times, rank_peaks = [], [], {r: [] for r in sample}, {r: 0.0 for r in sample}
for seed in range(int(sys.argv[2])):  # new placements from new loads, as every EPLB refresh brings
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, zipf=1.2, seed=seed)
    a = time.perf_counter()
    placement = rebalance(load, job.num_physical_experts, *job.eplb_shape())
    b = time.perf_counter()
    builder.plan(placement)
    c = time.perf_counter()
    placing.append(b - a)
    replans.append(c - b)
    for r in sample:
        d = time.perf_counter()
        builder.rank_plan(placement, [r])
        rank_times[r].append(time.perf_counter() - d)
        tracemalloc.start()  # its own pass: tracing slows the allocations it counts
        builder.rank_plan(placement, [r])
        rank_peaks[r] = max(rank_peaks[r], tracemalloc.get_traced_memory()[1] / 2**20)
        tracemalloc.stop()
slowest = max(sample, key=lambda r: statistics.median(rank_times[r]))
print(json.dumps(dict(
    job=sys.argv[1], ranks=plan.num_ranks, tensors=len(plan.tensors), chunks=len(plan.chunks),
    import_s=t_import - t0, build_s=t_build - t_import, validate_s=t_valid - t_build, cost_s=t_cost - t_valid,
    total_s=t_cost - t0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    predicted_s=predicted, lower_bound_s=bound,
    build_seconds=t_valid - t_import, replan_seconds=statistics.median(replans), replan_spread=[min(replans), max(replans)],
    rank_replan_seconds=statistics.median(rank_times[slowest]), slowest_rank=slowest,
    rank_replan_spread=[min(rank_times[slowest]), max(rank_times[slowest])], ranks_timed=len(sample),
    rank_peak_mb=max(rank_peaks.values()), placement_seconds=statistics.median(placing),
    bound_seconds=bound,
)))
"""


def main(argv: list[str] | None = None) -> None:
    """``[JOB.yaml ...] [--json] [--loads N]``: one fresh process per job (first build, validated), then N
    new placements replanned by the job's PlanBuilder: the whole plan (``replan_seconds``, what a driver or
    report needs), and each of about 26 ranks spread over the job replanning its own part
    (``PlanBuilder.rank_plan``, what a rank syncs by): ``rank_replan_seconds`` is the slowest of them
    (median over the loads) and ``rank_peak_mb`` the most any of them allocates."""
    import argparse

    parser = argparse.ArgumentParser(prog="rlsync bench plan")
    parser.add_argument("jobs", nargs="*", default=DEFAULT_JOBS)
    parser.add_argument("--json", action="store_true", help="one JSON object per job")
    parser.add_argument("--loads", type=int, default=5, help="new placements to replan (median reported)")
    args = parser.parse_args(list(argv if argv is not None else sys.argv[1:]))
    results = []
    for job in args.jobs or DEFAULT_JOBS:
        out = subprocess.run([sys.executable, "-c", CHILD, job, str(args.loads)], cwd=ROOT, capture_output=True,
                             text=True, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    if args.json:
        keys = ("job", "build_seconds", "replan_seconds", "rank_replan_seconds", "rank_peak_mb", "bound_seconds")
        for r in results:
            print(json.dumps({**{k: r[k] for k in keys}, "replan_spread": r["replan_spread"],
                              "rank_replan_spread": r["rank_replan_spread"], "slowest_rank": r["slowest_rank"],
                              "ranks_timed": r["ranks_timed"], "placement_seconds": r["placement_seconds"],
                              "chunks": r["chunks"], "ranks": r["ranks"]}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Planning at scale (one fresh process per job)")
    for col in ("job", "ranks", "chunks", "build s", "validate s", "cost s", "whole replan s (min-max)",
                "rank replan s (min-max)", "rank peak MB", "placement s", "peak RSS MB", "bound s", "rank replan / bound"):
        table.add_column(col, justify="right")
    for r in results:
        lo, hi = r["replan_spread"]
        rank_lo, rank_hi = r["rank_replan_spread"]
        table.add_row(Path(r["job"]).stem, str(r["ranks"]), f"{r['chunks']:,}", f"{r['build_s']:.2f}",
                      f"{r['validate_s']:.2f}", f"{r['cost_s']:.2f}",
                      f"{r['replan_seconds']:.3f} ({lo:.3f}-{hi:.3f})",
                      f"{r['rank_replan_seconds']:.4f} ({rank_lo:.4f}-{rank_hi:.4f})", f"{r['rank_peak_mb']:.1f}",
                      f"{r['placement_seconds']:.3f}", f"{r['peak_rss_mb']:.0f}", f"{r['bound_seconds']:.3f}",
                      f"{r['rank_replan_seconds'] / r['bound_seconds']:.2%}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
