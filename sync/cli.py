"""The ``rlsync`` command line.

``rlsync plan JOB.yaml [--json PATH] [--explain TENSOR]`` builds, validates and summarizes a plan.
``rlsync eplb ...`` computes an expert placement from a load file or a synthetic load and reports
its balance (table, placement JSON, PNG of per-GPU load before/after). ``rlsync run`` runs the
refresh loop on Ray; ``rlsync bench sync|gpu|multi-gpu|plan|eplb|probe|peer|quantize`` the benchmarks.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from planners import JobError, JobSpec, PlanError, build_plan
from planners.cost import LINK_NAMES
from planners.models import catalog

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


def _read_load(path: str):
    """A load file: .npy/.json by the planner, .pt (a torch tensor) here."""
    from planners.eplb.stats import load_array, read_load

    if path.endswith(".pt"):
        import torch

        return load_array(torch.load(path, map_location="cpu").double().numpy(), path)
    return read_load(path)


def cmd_eplb(args: argparse.Namespace, console: Console) -> int:
    import json

    from planners.eplb import EplbError, balance_report, rebalance
    from planners.eplb.stats import synthetic_load
    from planners.eplb.placement import Placement

    if args.job:
        job = JobSpec.from_yaml(args.job)
        if not job.model.is_moe:
            raise JobError(f"{args.job}: the model has no experts")
        groups, nodes, gpus = job.eplb_shape()
        layers, experts, slots = len(job.model.moe_layers), job.model.num_experts, job.num_physical_experts
        policy = args.policy or job.eplb.policy
    else:
        layers, experts, slots, gpus = args.layers, args.experts, args.slots, args.gpus
        groups, nodes, policy = args.groups, args.nodes, args.policy or "default"
        if slots is None:
            slots = experts
    try:
        load = _read_load(args.load) if args.load else synthetic_load(layers, experts, args.zipf, args.seed)
    except (OSError, ValueError) as e:
        raise JobError(f"--load: {e}") from None
    if load.shape[1] != experts:
        raise JobError(f"--load has {load.shape[1]} experts per layer; the model has {experts}")
    try:
        t0 = time.perf_counter()
        placement = rebalance(load, slots, groups, nodes, gpus, policy=policy)
        elapsed = time.perf_counter() - t0
    except EplbError as e:
        raise JobError(str(e)) from None
    initial = Placement.identity(load.shape[0], experts, slots)
    table = Table(title=f"{load.shape[0]} MoE layers, {experts} experts, {slots} slots on {gpus} GPUs "
                        f"({nodes} node(s), {groups} group(s))", title_justify="left")
    for col in ("placement", "max GPU load", "mean GPU load", "balancedness", "max / bound", "max / bound (own replicas)",
                "GPUs with duplicates"):
        table.add_column(col, justify="right")
    reports = {}
    for name, p in (("initial", initial), (policy, placement)):
        r = reports[name] = balance_report(load, p, gpus, nodes)
        table.add_row(name, f"{r.max_gpu_load.sum():,.0f}", f"{r.mean_gpu_load.sum():,.0f}", f"{r.balancedness:.4f}",
                      f"{r.max_over_bound:.4f}", f"{r.max_over_replica_bound:.4f}", str(r.duplicates))
    console.print(table)
    console.print(f"{policy} placement computed in {elapsed * 1e3:.1f} ms")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"phy2log": placement.phy2log.tolist(), "logcnt": placement.logcnt.tolist(),
                       "log2phy": placement.log2phy(experts).tolist(), "policy": policy}, f)
        console.print(f"placement written to {args.out}")
    if args.png:
        from planners.eplb import gpu_loads
        from sync.plots import plot_gpu_loads

        plot_gpu_loads(gpu_loads(load, initial.phy2log, gpus), gpu_loads(load, placement.phy2log, gpus), args.png,
                       title=f"per-GPU expert load, {policy} policy")
        console.print(f"picture written to {args.png}")
    return 0


def cmd_bench(args: argparse.Namespace, console: Console) -> int:
    import json

    if args.bench in ("gpu", "plan", "eplb", "multi-gpu", "probe", "peer", "quantize"):  # benchmarks with options of their own
        import importlib

        rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest  # "rlsync bench NAME -- --option"
        importlib.import_module(f"sync.bench.{args.bench.replace('-', '_')}").main(rest)
        return 0

    from dataclasses import replace

    from planners.cost import Links
    from sync.bench.sync import bench_sync

    job = JobSpec.from_yaml(args.job)
    if not args.job_links:  # plan for this machine: every rank talks over loopback, every link alike
        job = replace(job, links=Links(same_device_gbps=1.0, nvlink_gbps=1.0, nic_gbps=1.0))
    plan = build_plan(job).validate()
    bucket = int((args.bucket_mb or job.sync.bucket_mb) * (1 << 20))
    r = bench_sync(plan, reps=args.reps, bucket_bytes=bucket, timeout_s=job.sync.timeout_s, backend=args.backend,
                   hosted=args.hosted, direct_bytes=None if args.direct_kb is None else args.direct_kb << 10)
    if args.json:
        print(json.dumps(r))
        return 0 if r["verified"] else 1
    table = Table(title=f"{job.name}: {r['processes']} local processes, {args.backend}, median of {args.reps}",
                  title_justify="left")
    for col in ("", "seconds", "vs plan executor"):
        table.add_column(col, justify="right")
    table.add_row("plan executor", f"{r['sync_seconds']:.3f}", "1.00")
    if r["verify_seconds"] is not None:
        table.add_row("its verification (checksums), added", f"{r['verify_seconds']:.3f}",
                      f"{r['verify_seconds'] / r['sync_seconds']:.2f}")
        table.add_row("  the same, checksums read element by element", f"{r['verify_elements_seconds']:.3f}",
                      f"{r['verify_elements_seconds'] / r['sync_seconds']:.2f}")
    if r["baseline_seconds"] is not None:
        table.add_row("rank-0 broadcast baseline", f"{r['baseline_seconds']:.3f}", f"{r['baseline_over_sync']:.2f}")
    table.add_row("raw exchange of the same buckets", f"{r['raw_seconds']:.3f}", f"{r['raw_seconds'] / r['sync_seconds']:.2f}")
    table.add_row("lower bound at measured bandwidth", f"{r['bound_seconds']:.3f}", f"{r['bound_seconds'] / r['sync_seconds']:.2f}")
    console.print(table)
    ranks = Table(title="bytes per process (plan executor, one sync)", title_justify="left")
    for col in ("ranks", "sent", "received", "achieved GB/s out"):
        ranks.add_column(col, justify="right")
    for who, b in r["bytes_per_process"].items():
        ranks.add_row(who, _gb(b["sent"]), _gb(b["received"]), f"{b['sent'] / r['sync_seconds'] / 1e9:.2f}")
    console.print(ranks)
    console.print(f"moved {_gb(r['bytes_moved'])} ({r['sync_gbps']:.2f} GB/s); busiest rank {_gb(r['max_bytes_per_rank'])}; "
                  f"measured {r['measured_gbps_per_rank']:.2f} GB/s per rank with all ranks busy")
    baseline = "-" if r["baseline_over_sync"] is None else f"{r['baseline_over_sync']:.2f}"
    console.print(f"sync / bound = {r['sync_over_bound']:.2f}, baseline / sync = {baseline}, verified = {r['verified']}")
    if r["cpu_busy"] is not None:
        cpu = r["process_cpu_seconds"]
        console.print(f"CPU time of a sync, all processes: {cpu['unverified']:.3f} s unverified, {cpu['verified']:.3f} s verified; "
                      f"an unverified sync keeps {r['cpu_busy']:.0%} of {r['cores']} cores busy")
    return 0 if r["verified"] else 1


def _iteration_table(title: str, learning: bool = False) -> Table:
    table = Table(title=title, title_justify="left")
    columns = ("iteration", "reward", "log-prob gap", "rollout s", "train s") if learning else ("iteration",)
    for col in columns + ("engines", "sync s", "predicted ms", "bound ms", "MB", "GB/s", "balancedness",
                          "engines serve", "verified"):
        table.add_column(col, justify="right")
    return table


def _iteration_row(r: dict, learning: bool = False) -> list[str]:
    row = _sync_cells(r)
    if not learning:
        return row
    return row[:1] + [f"{r['reward_mean']:.3f}", f"{r['logprob_mismatch']:.1e}", f"{r['rollout_seconds']:.2f}",
                      f"{r['train_seconds']:.2f}"] + row[1:]


def _sync_cells(r: dict) -> list[str]:
    b, secs = r["balancedness"], r["sync_seconds"]
    served = sorted({str(s["serving"]) if s["complete"] or s["serving"] is not None else "incomplete"
                     for s in r["engine_states"].values()})
    verdict = "[green]yes[/]" if r["verified"] else "- (no sync)" if r["verified"] is None else "[red]NO[/]"
    if r["errors"]:
        verdict = f"[red]failed:[/] {escape('; '.join(list(r['errors'].values())[:2])[:160])}"
    elif r.get("logits_gap"):
        verdict += " (logits match HF)" if r["verified"] else " (logits differ from HF)"
    return [str(r["iteration"]), str(r["engines"]), "-" if secs is None else f"{secs:.3f}",
            f"{r['predicted_seconds'] * 1e3:.3f}", f"{r['bound_seconds'] * 1e3:.3f}", f"{r['bytes'] / 1e6:.2f}",
            "-" if not secs else f"{r['bytes'] / secs / 1e9:.2f}",
            f"{b.get('before', 1):.3f} -> {b.get('after', b.get('before', 1)):.3f}" if b else "-",
            "v" + ", v".join(served) if served else "-", verdict]


def cmd_run(args: argparse.Namespace, console: Console) -> int:
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from sync.channels.faulty import Fault, FaultError
    from sync.run.loop import default_step, run_job

    job = JobSpec.from_yaml(args.job)
    schedule = [int(x) for x in args.engines.split(",")] if args.engines else None
    try:
        fault = Fault.parse(args.fault) if args.fault else None
    except FaultError as e:
        console.print(f"[red]error:[/] --fault: {e}")
        return 2
    grpo = None
    if (args.step or default_step(args.trainer)) == "grpo":
        from sync.rl.task import GRPOSettings

        grpo = GRPOSettings(prompts=args.prompts, group=args.group, lr=args.lr, kl_coef=args.kl, seed=args.seed)
    learning = grpo is not None
    table = _iteration_table(f"{job.name} on Ray: " + ("GRPO, " if learning else "") +
                             ("one sync per iteration" if not args.no_sync else "engines never refreshed (control)"),
                             learning)
    progress = Progress(TextColumn("iterations"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console)
    task = progress.add_task("run", total=args.iterations)

    def on_iteration(row: dict) -> None:
        table.add_row(*_iteration_row(row, learning))
        progress.advance(task)

    with Live(Group(table, progress), console=console, refresh_per_second=4, transient=False):
        report = run_job(job, iterations=args.iterations, report_dir=args.report, address=args.address,
                         trainer=args.trainer, console=console, engines_schedule=schedule, fault=fault,
                         on_iteration=on_iteration, step=args.step, grpo=grpo, sync_weights=not args.no_sync)
    console.print()
    console.print(f"wall {report['wall_seconds']:.1f} s; report in {args.report}" if args.report else
                  f"wall {report['wall_seconds']:.1f} s")
    rows = [r for r in report["iterations"] if "reward_mean" in r]
    if len(rows) >= 2:
        head, tail = rows[: min(5, len(rows) // 2)], rows[-min(5, len(rows) // 2):]
        rise = np.mean([r["reward_mean"] for r in tail]) - np.mean([r["reward_mean"] for r in head])
        console.print(f"reward: first {len(head)} iterations {np.mean([r['reward_mean'] for r in head]):.3f}, last "
                      f"{len(tail)} {np.mean([r['reward_mean'] for r in tail]):.3f} (rise {rise:+.3f}); largest "
                      f"trainer/engine log-prob gap {max(r['logprob_mismatch'] for r in rows):.1e}")
    if not report["verified"]:
        console.print("[red]verification failed[/] in iteration(s) "
                      + ", ".join(str(r["iteration"]) for r in report["iterations"] if not r["verified"]))
    return 0 if report["verified"] else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlsync", description="Trainer -> inference weight sync planner and runner")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="build, validate and summarize a sync plan for a job")
    p.add_argument("job", help="YAML job spec")
    p.add_argument("--json", metavar="PATH", help="write the plan as JSON")
    p.add_argument("--explain", metavar="TENSOR", help="list every chunk of one logical tensor (HF name)")
    e = sub.add_parser("eplb", help="compute an expert placement from loads and report its balance")
    e.add_argument("--job", help="take experts, slots, GPUs, nodes and groups from a job spec")
    e.add_argument("--load", help="load file: .npy/.json/.pt holding [layers, experts] or [window, layers, experts]")
    e.add_argument("--zipf", type=float, default=1.0, help="synthetic load: Zipf exponent (without --load)")
    e.add_argument("--seed", type=int, default=0, help="synthetic load: seed")
    e.add_argument("--layers", type=int, default=58)
    e.add_argument("--experts", type=int, default=256)
    e.add_argument("--slots", type=int, default=None, help="physical expert slots per layer (default: experts)")
    e.add_argument("--gpus", type=int, default=32)
    e.add_argument("--nodes", type=int, default=4)
    e.add_argument("--groups", type=int, default=8)
    e.add_argument("--policy", choices=["default", "deepseek"], default=None)
    e.add_argument("--out", metavar="PATH", help="write the placement (phy2log, log2phy, logcnt) as JSON")
    e.add_argument("--png", metavar="PATH", help="draw per-GPU load before/after")
    r = sub.add_parser("run", help="the refresh loop on Ray: trainer and engine actors, one sync per iteration")
    r.add_argument("job", help="YAML job spec")
    r.add_argument("--iterations", type=int, default=3)
    r.add_argument("--report", metavar="DIR", default="out/report", help="report folder (report.json, PNGs)")
    r.add_argument("--address", default=None, help="join a Ray cluster (default: start Ray locally)")
    r.add_argument("--trainer", choices=["megatron", "synthetic"], default="megatron",
                   help="trainer ranks: megatron-core GPTModels or synthetic shards")
    r.add_argument("--step", choices=["grpo", "seeded"], default=None,
                   help="the trainer's step: GRPO on the engines' rollouts (default with megatron) or seeded weights "
                        "(default with synthetic)")
    r.add_argument("--no-sync", action="store_true",
                   help="GRPO control: the engines keep the initial weights (reward must not rise)")
    r.add_argument("--prompts", type=int, default=8, help="GRPO: prompts per iteration")
    r.add_argument("--group", type=int, default=4, help="GRPO: completions per prompt")
    r.add_argument("--lr", type=float, default=1e-2, help="GRPO: Adam's learning rate")
    r.add_argument("--kl", type=float, default=0.0, help="GRPO: weight of the KL to the initial policy")
    r.add_argument("--seed", type=int, default=0, help="GRPO: prompts and sampling seed")
    r.add_argument("--engines", metavar="N,N,...", help="engines per iteration (elastic), e.g. 2,1,3")
    r.add_argument("--fault", metavar="KIND:RANK:STAGE:ITERATION[:BUCKET]",
                   help="chaos: kill, stall or corrupt one rank in one iteration's sync (see sync/faults.py); "
                        "the run restarts what failed and goes on")
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench", required=True)
    bs = bsub.add_parser("sync", help="plan executor vs rank-0 broadcast on local processes")
    bs.add_argument("job", help="YAML job spec")
    bs.add_argument("--reps", type=int, default=5)
    bs.add_argument("--bucket-mb", type=float, default=None)
    bs.add_argument("--json", action="store_true", help="print one JSON object")
    bs.add_argument("--job-links", action="store_true",
                    help="plan with the job's link bandwidths instead of this machine's (all links alike)")
    bs.add_argument("--backend", choices=["gloo", "nccl"], default="gloo",
                    help="nccl: each process on its GPU (plan.devices modulo the GPUs here)")
    bs.add_argument("--hosted", action="store_true",
                    help="one process per device hosting its ranks (colocated on GPUs; no broadcast baseline)")
    bs.add_argument("--direct-kb", type=int, default=None,
                    help="contiguous chunks at least this large travel as messages of their own (default: the "
                         "backend's, 256 KB on gloo)")
    bg = bsub.add_parser("gpu", help="colocated refresh on one CUDA GPU: batched copies vs per-slice copy_ "
                                     "vs a flat copy (options: rlsync bench gpu -- --help)")
    bg.add_argument("rest", nargs=argparse.REMAINDER, help="options of sync/bench/gpu.py")
    for name, what in (("plan", "planning at scale: build, validate and bound each job in a fresh process "
                                "(rlsync bench plan [JOB.yaml ...])"),
                       ("eplb", "EPLB policies at DeepSeek-V3 shape: time and balance (options: rlsync bench eplb -- --help)"),
                       ("multi-gpu", "trainer and engines on the GPUs of one host over NCCL (options: rlsync bench "
                                     "multi-gpu -- --help)"),
                       ("probe", "what watching vLLM's post-load processing costs at engine start, as passes over "
                                 "the weights (options: rlsync bench probe -- --help)"),
                       ("peer", "megatron-core's own resharding against the plan executor on the same models and "
                                "layout pairs, 4 CPU processes (options: rlsync bench peer -- --help)"),
                       ("quantize", "the block-FP8 quantizer's kernels against a flat copy and torch, per variant "
                                    "(options: rlsync bench quantize -- --help)")):
        extra = bsub.add_parser(name, help=what)
        extra.add_argument("rest", nargs=argparse.REMAINDER, help=f"options of sync/bench/{name.replace('-', '_')}.py")
    args = parser.parse_args(argv)
    console = Console() if sys.stdout.isatty() else Console(width=160)
    try:
        return {"plan": cmd_plan, "eplb": cmd_eplb, "bench": cmd_bench, "run": cmd_run}[args.command](args, console)
    except (JobError, PlanError) as e:
        console.print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
