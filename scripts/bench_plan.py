"""Planning at scale (see ``sync/bench/plan.py``): ``python scripts/bench_plan.py [JOB.yaml ...]``."""

from sync.bench.plan import main

if __name__ == "__main__":
    main()
