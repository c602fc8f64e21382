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
replans, placing, peaks = [], [], []
for seed in range(int(sys.argv[2])):  # new placements from new loads, as every EPLB refresh brings
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, zipf=1.2, seed=seed)
    a = time.perf_counter()
    placement = rebalance(load, job.num_physical_experts, *job.eplb_shape())
    b = time.perf_counter()
    builder.plan(placement)
    c = time.perf_counter()
    tracemalloc.start()  # its own pass: tracing slows the allocations it counts
    builder.plan(placement)
    peaks.append(tracemalloc.get_traced_memory()[1] / 2**20)
    tracemalloc.stop()
    placing.append(b - a)
    replans.append(c - b)
print(json.dumps(dict(
    job=sys.argv[1], ranks=plan.num_ranks, tensors=len(plan.tensors), chunks=len(plan.chunks),
    import_s=t_import - t0, build_s=t_build - t_import, validate_s=t_valid - t_build, cost_s=t_cost - t_valid,
    total_s=t_cost - t0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    predicted_s=predicted, lower_bound_s=bound,
    build_seconds=t_valid - t_import, replan_seconds=statistics.median(replans), replan_spread=[min(replans), max(replans)],
    rank_replan_seconds=statistics.median(replans), rank_peak_mb=max(peaks), placement_seconds=statistics.median(placing),
    bound_seconds=bound,
)))
"""


def main(argv: list[str] | None = None) -> None:
    """``[JOB.yaml ...] [--json] [--loads N]``: one fresh process per job (first build, validated), then N
    new placements replanned by the job's PlanBuilder. Every rank replans the same way today, so
    ``rank_replan_seconds`` is the whole replan and ``rank_peak_mb`` what it allocates."""
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
                              "placement_seconds": r["placement_seconds"], "chunks": r["chunks"], "ranks": r["ranks"]}))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Planning at scale (one fresh process per job)")
    for col in ("job", "ranks", "chunks", "build s", "validate s", "cost s", "replan s (min-max)", "rank peak MB",
                "placement s", "peak RSS MB", "bound s", "replan / bound"):
        table.add_column(col, justify="right")
    for r in results:
        lo, hi = r["replan_spread"]
        table.add_row(Path(r["job"]).stem, str(r["ranks"]), f"{r['chunks']:,}", f"{r['build_s']:.2f}",
                      f"{r['validate_s']:.2f}", f"{r['cost_s']:.2f}",
                      f"{r['replan_seconds']:.3f} ({lo:.3f}-{hi:.3f})", f"{r['rank_peak_mb']:.0f}",
                      f"{r['placement_seconds']:.3f}", f"{r['peak_rss_mb']:.0f}", f"{r['bound_seconds']:.3f}",
                      f"{r['replan_seconds'] / r['bound_seconds']:.1%}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
