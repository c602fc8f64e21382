"""EPLB benchmark at DeepSeek-V3 shape: time and balance of the placement policies, side by side.

For 58 MoE layers x 256 experts in 8 groups, slot counts 288/320, 32/64 GPUs on 1/4/8 nodes and Zipf
loads 0/0.6/1.0/1.3, it times a plain per-layer Python-loop implementation of DeepSeek's algorithm
(``planners.eplb.loop``, the baseline), the vectorized ``deepseek`` policy and the ``default`` policy,
and reports max GPU load / lower bound on the load the placement was computed from and on the next
window of a drifting load.

Times are CPU time (``time.process_time``, median of several runs): the wall clock of a shared
machine is noisy. ``deepseek`` is checked equal to the baseline on every case.

Usage: rlsync bench eplb (or python scripts/bench_eplb.py) [--quick] [--json PATH] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from planners.eplb import balance_report, rebalance
from planners.eplb.loop import rebalance_loop
from planners.eplb.stats import drift, synthetic_load

LAYERS, EXPERTS, GROUPS = 58, 256, 8


def timed(fn, repeats: int):
    """(result, median CPU seconds, min CPU seconds) over ``repeats`` runs."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.process_time()
        out = fn()
        times.append(time.process_time() - t0)
    return out, statistics.median(times), min(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    parser.add_argument("--json", help="write the rows as JSON")
    parser.add_argument("--repeats", type=int, default=7, help="runs of each vectorized policy (the loop runs 3)")
    args = parser.parse_args(argv)
    shapes = [(288, 32), (320, 32), (320, 64)]
    nodes_list, skews, reps, loop_reps = [1, 4, 8], [0.0, 0.6, 1.0, 1.3], args.repeats, 3
    if args.quick:
        shapes, nodes_list, skews, reps, loop_reps = [(288, 32)], [1, 8], [0.0, 1.0], 3, 1

    table = Table(title=f"EPLB at DeepSeek-V3 shape: {LAYERS} layers x {EXPERTS} experts, {GROUPS} groups "
                        "(CPU ms, median)")
    for col in ("slots", "GPUs", "nodes", "zipf", "loop ms", "deepseek ms", "default ms", "deepseek x", "default x",
                "max/bound deepseek", "max/bound default", "deepseek/group bound", "next deepseek", "next default",
                "repeats ds/def"):
        table.add_column(col, justify="right")
    rows = []
    for slots, gpus in shapes:
        for nodes in nodes_list:
            for zipf in skews:
                load = synthetic_load(LAYERS, EXPERTS, zipf, seed=0)
                nxt = drift(load, 0.3, seed=1)
                ref, t_loop, _ = timed(lambda: rebalance_loop(load, slots, GROUPS, nodes, gpus), loop_reps)
                ds, t_ds, t_ds_min = timed(lambda: rebalance(load, slots, GROUPS, nodes, gpus, policy="deepseek"), reps)
                de, t_de, t_de_min = timed(lambda: rebalance(load, slots, GROUPS, nodes, gpus, policy="default"), reps)
                if not np.array_equal(ds.phy2log, ref):
                    raise SystemExit(f"deepseek policy differs from the loop baseline at {slots}/{gpus}/{nodes}/{zipf}")
                r_ds = balance_report(load, ds, gpus, nodes, GROUPS)
                r_de = balance_report(load, de, gpus, nodes, GROUPS)
                r = dict(slots=slots, gpus=gpus, nodes=nodes, zipf=zipf, loop_s=t_loop, deepseek_s=t_ds,
                         default_s=t_de, deepseek_min_s=t_ds_min, default_min_s=t_de_min,
                         speedup_deepseek=t_loop / t_ds, speedup_default=t_loop / t_de,
                         bound_deepseek=r_ds.max_over_bound, bound_default=r_de.max_over_bound,
                         group_bound_deepseek=r_ds.max_over_group_bound,
                         duplicates_deepseek=r_ds.duplicates, duplicates_default=r_de.duplicates,
                         next_deepseek=balance_report(nxt, ds, gpus, nodes).max_over_bound,
                         next_default=balance_report(nxt, de, gpus, nodes).max_over_bound)
                rows.append(r)
                table.add_row(str(slots), str(gpus), str(nodes), f"{zipf:g}", f"{t_loop * 1e3:.1f}", f"{t_ds * 1e3:.2f}",
                              f"{t_de * 1e3:.1f}", f"{r['speedup_deepseek']:.0f}x", f"{r['speedup_default']:.1f}x",
                              f"{r['bound_deepseek']:.4f}", f"{r['bound_default']:.4f}",
                              f"{r['group_bound_deepseek']:.4f}", f"{r['next_deepseek']:.4f}",
                              f"{r['next_default']:.4f}", f"{reps}/{reps}")
    console = Console(width=240)
    console.print(table)
    sp_ds = [r["speedup_deepseek"] for r in rows]
    sp_de = [r["speedup_default"] for r in rows]
    gain = statistics.median(r["bound_deepseek"] / r["bound_default"] for r in rows)
    console.print(f"speedup over the loop baseline: deepseek {min(sp_ds):.0f}-{max(sp_ds):.0f}x (median "
                  f"{statistics.median(sp_ds):.0f}x, {sum(s >= 50 for s in sp_ds)}/{len(rows)} >= 50x); default "
                  f"{min(sp_de):.1f}-{max(sp_de):.1f}x (median {statistics.median(sp_de):.1f}x); median max-load ratio "
                  f"deepseek/default {gain:.3f}")
    if args.json:
        meta = dict(layers=LAYERS, experts=EXPERTS, groups=GROUPS, timer="time.process_time, median",
                    repeats=dict(loop=loop_reps, policies=reps), python=platform.python_version(),
                    numpy=np.__version__, machine=platform.machine())
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
