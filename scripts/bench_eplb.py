"""EPLB policies at DeepSeek-V3 shape (see ``sync/bench/eplb.py``): ``python scripts/bench_eplb.py [--quick] [--json PATH]``."""

from sync.bench.eplb import main

if __name__ == "__main__":
    main()
