"""Long placement-change soak: thousands of successive EPLB placements, redundant-slot counts and
engine counts, with a verified sync after each.

Usage: python scripts/soak_placements.py [JOB.yaml] [--iterations N] [--seed S]
"""

from __future__ import annotations

import argparse
import time

from planners import JobSpec
from sync.run.soak import run_soak

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("job", nargs="?", default="examples/tiny_moe.yaml")
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    t0 = time.perf_counter()
    out = run_soak(JobSpec.from_yaml(args.job), args.iterations, args.seed)
    print(f"{out['verified']} verified syncs over {out['distinct_placements']} distinct placements, "
          f"engine counts {out['engine_counts']}, in {time.perf_counter() - t0:.0f} s")
