"""Trainer and engines on the GPUs of one host over NCCL: disaggregated (halves), then colocated (all).

On a machine with 4 or 8 GPUs, in one call::

    rlsync bench multi-gpu --out results/multi_gpu.json   (or python scripts/bench_multi_gpu.py ...)

- disaggregated: trainer TP2 x EP on the first half of the GPUs, engines TP2 x DP with EP and
  redundant expert slots on the other half; one process per rank, NCCL between GPUs;
- colocated: trainer and engines on every GPU; one process per GPU hosting its trainer rank and
  engine rank (same-GPU chunks are local batched copies, the rest goes over NCCL).

For each: the plan executor (verified: every engine tensor's checksum), the rank-0 broadcast baseline
(disaggregated; colocated processes host two ranks each), a raw NCCL exchange of the same bytes
between the same processes (the bandwidth a process gets here), the plan's lower bound at that
bandwidth, and the achieved GB/s of every link. ``--cpu`` runs the same jobs as CPU processes over
gloo with a tiny model (a dry run of the script, what CI and machines without GPUs can do).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from planners import JobSpec, build_plan
from planners.cost import Links
from planners.eplb.stats import synthetic_load
from sync.bench.sync import bench_sync

MOE = dict(model_type="qwen3_moe", hidden_size=1024, num_hidden_layers=16, num_attention_heads=16,
           num_key_value_heads=4, head_dim=64, intermediate_size=3072, moe_intermediate_size=512, num_experts=64,
           num_experts_per_tok=8, vocab_size=151936, tie_word_embeddings=False, torch_dtype="bfloat16")


def jobs(gpus: int, model: dict) -> dict[str, dict]:
    half = gpus // 2
    if gpus == 2:  # one GPU a side: TP1 trainer and engine (EP over one rank, with redundant slots)
        return {
            "disaggregated 1+1 GPUs": dict(
                model=model, trainer=dict(tp=1), inference=dict(tp=1, enable_ep=True),
                eplb=dict(enabled=True, num_redundant_experts=4), deployment=dict(mode="disaggregated", gpus_per_node=2)),
            "colocated on 2 GPUs": dict(
                model=model, trainer=dict(tp=2, ep=2, etp=1), inference=dict(tp=2, enable_ep=True),
                eplb=dict(enabled=True, num_redundant_experts=2), deployment=dict(mode="colocated", gpus_per_node=2)),
        }
    return {
        f"disaggregated {half}+{half} GPUs": dict(
            model=model, trainer=dict(tp=2, dp=half // 2, ep=half // 2 if half > 2 else 2, etp=1),
            inference=dict(tp=2, dp=half // 2, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=half),
            deployment=dict(mode="disaggregated", gpus_per_node=gpus)),
        f"colocated on {gpus} GPUs": dict(
            model=model, trainer=dict(tp=2, dp=half, ep=2, etp=1),
            inference=dict(tp=2, dp=half, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=gpus),
            deployment=dict(mode="colocated", gpus_per_node=gpus)),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bucket-mb", type=int, default=256)
    ap.add_argument("--cpu", action="store_true", help="dry run: CPU processes over gloo, tiny model")
    ap.add_argument("--layers", type=int, default=MOE["num_hidden_layers"], help="fewer layers: a shorter run")
    ap.add_argument("--direct-mb", type=float, nargs="*", default=None,
                    help="contiguous chunks of at least this many MB travel as messages of their own (default: the "
                         "executor's for the backend); several values: one run of each case for each")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    gpus = args.gpus or (4 if args.cpu else torch.cuda.device_count())
    if gpus not in (2, 4, 8):
        raise SystemExit(f"this run needs 2, 4 or 8 GPUs, got {gpus}")
    backend = "gloo" if args.cpu else "nccl"
    model = dict(preset="tiny_qwen3_moe") if args.cpu else dict(hf_config={**MOE, "num_hidden_layers": args.layers})
    card = "CPU (gloo)" if args.cpu else torch.cuda.get_device_name()
    rows = []
    for name, spec in jobs(gpus, model).items():
        job = JobSpec.from_dict(spec)
        if args.cpu:  # every process shares this machine: plan for links that are all alike
            job = replace(job, links=Links(same_device_gbps=1.0, nvlink_gbps=1.0, nic_gbps=1.0))
        load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=0)
        plan = build_plan(job, load).validate()
        for direct_mb in args.direct_mb or [None]:
            r = bench_sync(plan, reps=args.reps, bucket_bytes=args.bucket_mb << 20, timeout_s=job.sync.timeout_s,
                           backend=backend, hosted=job.deployment.mode == "colocated", gpus=None if args.cpu else gpus,
                           direct_bytes=None if direct_mb is None else int(direct_mb * (1 << 20)))
            r["case"] = name if direct_mb is None else f"{name}, direct >= {direct_mb:g} MB"
            rows.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(card=card, gpus=gpus, rows=rows), indent=1))
    table = Table(title=f"sync on {gpus} x {card}, {backend}, medians of {args.reps}")
    for col in ("case", "processes", "messages", "payload MB", "sync s", "GB/s", "broadcast s", "broadcast / sync", "raw s",
                "bound s", "sync / bound", "link GB/s min-max", "verified"):
        table.add_column(col)
    for r in rows:
        links = list(r["link_gbps"].values()) or [0.0]
        table.add_row(r["case"], str(r["processes"]), str(r["messages_per_process"]), f"{r['bytes_moved'] / 1e6:.1f}", f"{r['sync_seconds']:.4f}",
                      f"{r['sync_gbps']:.2f}", "-" if r["baseline_seconds"] is None else f"{r['baseline_seconds']:.4f}",
                      "-" if r["baseline_over_sync"] is None else f"{r['baseline_over_sync']:.2f}",
                      f"{r['raw_seconds']:.4f}", f"{r['bound_seconds']:.4f}", f"{r['sync_over_bound']:.2f}",
                      f"{min(links):.2f}-{max(links):.2f}", str(r["verified"]))
    Console(width=220).print(table)


if __name__ == "__main__":
    main()
