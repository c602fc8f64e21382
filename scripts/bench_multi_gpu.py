"""Trainer and engines on the GPUs of one host (see ``sync/bench/multi_gpu.py``): ``python scripts/bench_multi_gpu.py [--cpu] [--out FILE]``."""

from sync.bench.multi_gpu import main

if __name__ == "__main__":
    main()
