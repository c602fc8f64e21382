"""The CPU checksum kernel against one running sum and a plain read, side by side on this machine.

``tile_sums_flat`` (contiguous tiles in sixteen lanes) is timed against ``tile_sums_rows`` given each tile
as one row (the same sums with one running sum, as the flat kernel had before) and against a numba
loop that only adds the words up (what reading the bytes costs). 64 KB tiles over ``--mb`` MB of 16-bit
(bf16) and 32-bit words; the three alternate for ``--reps`` rounds, medians with the spread, and the two
checksums must agree.

Usage: python scripts/bench_cpu_checksums.py [--mb 512] [--reps 8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numba
import numpy as np

from sync.verify.cpu_kernel import tile_sums_flat, tile_sums_rows


@numba.njit(parallel=True, nogil=True)
def _read(base, table, out):
    for t in numba.prange(table.shape[0]):
        total = np.uint64(0)
        for k in range(table[t, 1]):
            total += np.uint64(base[table[t, 0] + k])
        out[t, 0] = np.int64(total)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=512)
    ap.add_argument("--reps", type=int, default=8)
    args = ap.parse_args(argv)
    nbytes = args.mb << 20
    rows = []
    for word in (np.uint16, np.uint32):
        n = nbytes // np.dtype(word).itemsize
        base = np.random.default_rng(0).integers(0, np.iinfo(word).max, size=n, dtype=word)
        tile = (64 << 10) // np.dtype(word).itemsize + 3  # a few elements past a whole number of lanes
        first = np.arange(0, n - tile, tile)
        flat = np.stack([first, np.full_like(first, tile)], 1).astype(np.int64)
        one_row = np.stack([first, np.ones_like(first), np.full_like(first, tile), np.full_like(first, tile),
                            np.zeros_like(first)], 1).astype(np.int64)
        variants = {"lanes": (tile_sums_flat, flat), "one running sum": (tile_sums_rows, one_row), "read": (_read, flat)}
        outs, times = {}, {name: [] for name in variants}
        for rep in range(args.reps + 1):  # the first compiles
            for name, (kernel, table) in variants.items():
                out = np.zeros((len(table), 2), dtype=np.int64)
                t0 = time.perf_counter()
                kernel(base, table, out)
                if rep:
                    times[name].append(time.perf_counter() - t0)
                outs[name] = out
        if not np.array_equal(outs["lanes"], outs["one running sum"]):
            raise SystemExit("the two checksum kernels disagree")
        med = {name: statistics.median(t) for name, t in times.items()}
        row = dict(word_bits=8 * np.dtype(word).itemsize, mb=args.mb,
                   **{f"{name} GB/s": round(nbytes / med[name] / 1e9, 2) for name in variants},
                   lanes_over_one_sum=round(med["one running sum"] / med["lanes"], 2),
                   lanes_over_read=round(med["read"] / med["lanes"], 2),
                   spread={name: [round(min(t) / med[name], 2), round(max(t) / med[name], 2)] for name, t in times.items()})
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
