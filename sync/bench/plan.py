"""Time and memory of planning at scale: build, validate and bound each job in a fresh process.

Usage: rlsync bench plan [JOB.yaml ...]   (default: the DeepSeek-V3 and Kimi-K2 examples)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_JOBS = ["examples/deepseek_v3_plan.yaml", "examples/kimi_k2_plan.yaml"]

CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from planners import JobSpec, build_plan
t_import = time.perf_counter()
job = JobSpec.from_yaml(sys.argv[1])
plan = build_plan(job)
t_build = time.perf_counter()
plan.validate()
t_valid = time.perf_counter()
predicted, bound = plan.predicted_time(), plan.lower_bound()
t_cost = time.perf_counter()
print(json.dumps(dict(
    job=sys.argv[1], ranks=plan.num_ranks, tensors=len(plan.tensors), chunks=len(plan.chunks),
    import_s=t_import - t0, build_s=t_build - t_import, validate_s=t_valid - t_build, cost_s=t_cost - t_valid,
    total_s=t_cost - t0, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    predicted_s=predicted, lower_bound_s=bound,
)))
"""


def main(argv: list[str] | None = None) -> None:
    jobs = list(argv if argv is not None else sys.argv[1:]) or DEFAULT_JOBS
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Planning at scale (one fresh process per job)")
    for col in ("job", "ranks", "tensors", "chunks", "build s", "validate s", "cost s", "total s", "peak RSS MB",
                "predicted s", "bound s"):
        table.add_column(col, justify="right")
    for job in jobs:
        out = subprocess.run([sys.executable, "-c", CHILD, job], cwd=ROOT, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        table.add_row(Path(job).stem, str(r["ranks"]), f"{r['tensors']:,}", f"{r['chunks']:,}", f"{r['build_s']:.2f}",
                      f"{r['validate_s']:.2f}", f"{r['cost_s']:.2f}", f"{r['total_s']:.2f}",
                      f"{r['peak_rss_mb']:.0f}", f"{r['predicted_s']:.3f}", f"{r['lower_bound_s']:.3f}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
