"""Colocated refresh on one GPU (see ``sync/bench_gpu.py``): ``python scripts/bench_gpu.py [--ipc] [--out FILE]``."""

from sync.bench_gpu import main

if __name__ == "__main__":
    main()
