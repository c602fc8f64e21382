"""EPLB benchmark at DeepSeek-V3 shape: time and balance of the placement policies, side by side.

For 58 MoE layers x 256 experts in 8 groups, slot counts 288/320, 32/64 GPUs on 1/4/8 nodes and Zipf
loads 0/0.6/1.0/1.3, it times a plain per-layer Python-loop implementation of DeepSeek's algorithm
(``planners.eplb_loop``, the baseline), the vectorized ``deepseek`` policy and the ``default`` policy
(median of several runs each), and reports max GPU load / lower bound on the load the placement was
computed from and on the next window of a drifting load.

Usage: python scripts/bench_eplb.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from rich.console import Console
from rich.table import Table

from planners.eplb import balance_report, rebalance
from planners.eplb_loop import rebalance_loop
from planners.eplb_stats import drift, synthetic_load

LAYERS, EXPERTS, GROUPS = 58, 256, 8


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    shapes = [(288, 32), (320, 32), (320, 64)]
    nodes_list, skews, reps = [1, 4, 8], [0.0, 0.6, 1.0, 1.3], 5
    if args.quick:
        shapes, nodes_list, skews, reps = [(288, 32)], [1, 4], [0.0, 1.0], 1

    table = Table(title=f"EPLB at DeepSeek-V3 shape: {LAYERS} layers x {EXPERTS} experts, {GROUPS} groups")
    for col in ("slots", "GPUs", "nodes", "zipf", "loop ms", "deepseek ms", "default ms", "deepseek x", "default x",
                "max/bound deepseek", "max/bound default", "next window deepseek", "next window default"):
        table.add_column(col, justify="right")
    rows = []
    for slots, gpus in shapes:
        for nodes in nodes_list:
            for zipf in skews:
                load = synthetic_load(LAYERS, EXPERTS, zipf, seed=0)
                nxt = drift(load, 0.3, seed=1)
                _, t_loop = timed(lambda: rebalance_loop(load, slots, GROUPS, nodes, gpus), max(1, reps // 2))
                ds, t_ds = timed(lambda: rebalance(load, slots, GROUPS, nodes, gpus, policy="deepseek"), reps)
                de, t_de = timed(lambda: rebalance(load, slots, GROUPS, nodes, gpus, policy="default"), reps)
                r = dict(slots=slots, gpus=gpus, nodes=nodes, zipf=zipf, loop_s=t_loop, deepseek_s=t_ds, default_s=t_de,
                         bound_deepseek=balance_report(load, ds, gpus, nodes).max_over_bound,
                         bound_default=balance_report(load, de, gpus, nodes).max_over_bound,
                         next_deepseek=balance_report(nxt, ds, gpus, nodes).max_over_bound,
                         next_default=balance_report(nxt, de, gpus, nodes).max_over_bound)
                rows.append(r)
                table.add_row(str(slots), str(gpus), str(nodes), f"{zipf:g}", f"{t_loop * 1e3:.1f}", f"{t_ds * 1e3:.2f}",
                              f"{t_de * 1e3:.2f}", f"{t_loop / t_ds:.0f}x", f"{t_loop / t_de:.1f}x",
                              f"{r['bound_deepseek']:.4f}", f"{r['bound_default']:.4f}", f"{r['next_deepseek']:.4f}",
                              f"{r['next_default']:.4f}")
    console = Console(width=220)
    console.print(table)
    speed_ds = statistics.median(r["loop_s"] / r["deepseek_s"] for r in rows)
    speed_de = statistics.median(r["loop_s"] / r["default_s"] for r in rows)
    gain = statistics.median(r["bound_deepseek"] / r["bound_default"] for r in rows)
    console.print(f"median speedup over the loop baseline: deepseek {speed_ds:.0f}x, default {speed_de:.1f}x; "
                  f"median max-load ratio deepseek/default {gain:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
