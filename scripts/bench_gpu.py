"""Colocated refresh on one GPU (see ``sync/bench/gpu.py``): ``python scripts/bench_gpu.py [--ipc] [--out FILE]``."""

from sync.bench.gpu import main

if __name__ == "__main__":
    main()
