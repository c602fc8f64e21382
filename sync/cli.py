"""The ``rlsync`` command line.

``rlsync plan JOB.yaml [--json PATH] [--explain TENSOR]`` builds, validates and summarizes a plan.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from planners import JobError, JobSpec, PlanError, build_plan
from planners.cost import LINK_NAMES
from planners.model import catalog

__all__ = ["main"]


def _gb(n: float) -> str:
    if n >= 1e12:
        return f"{n / 1e12:,.2f} TB"
    if n >= 1e9:
        return f"{n / 1e9:,.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:,.2f} MB"
    return f"{n / 1e3:,.2f} KB"


def _seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:,.2f} us"
    return f"{s * 1e3:,.2f} ms" if s < 1 else f"{s:,.2f} s"


def cmd_plan(args: argparse.Namespace, console: Console) -> int:
    t0 = time.perf_counter()
    job = JobSpec.from_yaml(args.job)
    plan = build_plan(job)
    t1 = time.perf_counter()
    plan.validate()
    t2 = time.perf_counter()

    spec, tr, inf = job.model, job.trainer, job.inference
    cat = catalog(spec)
    console.print(f"[bold]{job.name}[/]: {spec.model_type}, {len(cat):,} logical tensors, "
                  f"{_gb(cat.nbytes)} of weights ({spec.dtype})")
    ranks = Table(title="Ranks", title_justify="left")
    for col in ("side", "layout", "ranks", "devices"):
        ranks.add_column(col)
    ranks.add_row("trainer", f"TP{tr.tp} CP{tr.cp} DP{tr.dp} PP{tr.pp} | ETP{tr.etp} EP{tr.ep} EDP{tr.edp} ({tr.order})",
                  str(tr.world_size), "")
    ep = f" EP{inf.ep_size}" if inf.enable_ep else ""
    slots = f", {job.num_physical_experts} expert slots" if spec.is_moe else ""
    ranks.add_row("inference", f"{inf.engines} engine(s) x DP{inf.dp} PP{inf.pp} TP{inf.tp}{ep}{slots}",
                  str(inf.world_size), "")
    n_nodes = job.deployment.num_nodes(tr, inf)
    ranks.add_row("deployment", job.deployment.mode, str(plan.num_ranks),
                  f"{len(set(plan.devices.tolist()))} GPUs on {n_nodes} node(s) of {job.deployment.gpus_per_node}")
    console.print(ranks)

    traffic = Table(title="Bytes per stage and link", title_justify="left")
    traffic.add_column("stage")
    for name in LINK_NAMES:
        traffic.add_column(name, justify="right")
    traffic.add_column("chunks", justify="right")
    traffic.add_column("predicted", justify="right")
    times = plan.stage_times()
    for stage in (1, 2):
        by_link = plan.bytes_by_link(stage)
        n = int((plan.chunks["stage"] == stage).sum())
        traffic.add_row(str(stage), *(_gb(by_link[k]) for k in LINK_NAMES), f"{n:,}", _seconds(times[stage]))
    console.print(traffic)

    out, inc = plan.bytes_out(), plan.bytes_in()
    s, r = int(out.argmax()), int(inc.argmax())
    console.print(f"busiest sender:   rank {s} ({'trainer' if s < plan.num_trainer else 'inference'}) {_gb(out[s])} out")
    console.print(f"busiest receiver: rank {r} {_gb(inc[r])} in")
    predicted, bound = plan.predicted_time(), plan.lower_bound()
    ratio = predicted / bound if bound > 0 else 1.0
    console.print(f"predicted {_seconds(predicted)} vs lower bound {_seconds(bound)} (x{ratio:.2f}); "
                  f"links: NVLink {job.links.nvlink_gbps:g} GB/s, NIC {job.links.nic_gbps:g} GB/s per GPU")
    console.print(f"[green]plan valid[/]: every inference byte written exactly once "
                  f"(built in {t1 - t0:.2f} s, validated in {t2 - t1:.2f} s)")
    if args.explain:
        _explain(plan, args.explain, console)
    if args.json:
        plan.to_json(args.json)
        console.print(f"plan written to {args.json}")
    return 0


def _explain(plan, name: str, console: Console) -> None:
    ids = [i for i, t in enumerate(plan.tensors) if t.name == name]
    if not ids:
        raise JobError(f"--explain: no logical tensor named {name!r}")
    c = plan.chunks[plan.chunks["tensor"] == ids[0]]
    table = Table(title=f"Chunks of {name}", title_justify="left")
    for col in ("stage", "src", "dst", "slice", "from", "into", "bytes", "link"):
        table.add_column(col)
    for row in c:
        table.add_row(str(row["stage"]), str(row["src"]), str(row["dst"]), f"[{row['lo']}:{row['hi']}]",
                      plan.local_name[row["src_local"]], plan.local_name[row["dst_local"]], _gb(row["nbytes"]),
                      LINK_NAMES[row["link"]])
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlsync", description="Trainer -> inference weight sync planner and runner")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="build, validate and summarize a sync plan for a job")
    p.add_argument("job", help="YAML job spec")
    p.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    p.add_argument("--explain", metavar="TENSOR", help="list every chunk of one logical tensor (HF name)")
    args = parser.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        return {"plan": cmd_plan}[args.command](args, console)
    except (JobError, PlanError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
