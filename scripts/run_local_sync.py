"""Run a job's sync for real: one local process per rank (gloo), K syncs with changing weights.

Trainer ranks hold synthetic shards of seeded weights that change every sync (version 1..K); engine
ranks receive through the plan executor and verify every tensor by checksum.

Usage: python scripts/run_local_sync.py JOB.yaml [--syncs K] [--baseline] [--bucket-mb MB] [--verify | --no-verify]

Checksums are compared when the job says ``sync.verify`` (the default) and reported per sync;
``--verify`` makes a mismatch fail loudly: every rank raises ``VerificationError`` naming the
tensors that differ, and the script exits 1; ``--no-verify`` skips the checksums.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from planners import JobError, JobSpec, build_plan
from sync.channels.faulty import Fault, FaultError
from sync.run.local import LocalRun, RankFailure, run_local


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job")
    parser.add_argument("--syncs", type=int, default=3)
    parser.add_argument("--baseline", action="store_true", help="also run the rank-0 broadcast baseline each time")
    parser.add_argument("--bucket-mb", type=float, default=None)
    parser.add_argument("--fault", metavar="KIND:RANK:STAGE:SYNC[:BUCKET]",
                        help="chaos: kill, stall or corrupt rank RANK in stage STAGE of sync SYNC (at bucket round "
                             "BUCKET), e.g. kill:1:2:3 (see sync/faults.py)")
    parser.add_argument("--staging", action="store_true", help="engines keep the old version until verified")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                        help="--verify: a checksum mismatch raises on every rank, naming the tensors; "
                             "--no-verify: no checksums (default: the job's sync.verify, reported per sync)")
    args = parser.parse_args()
    console = Console(width=140)
    try:
        job = JobSpec.from_yaml(args.job)
    except JobError as e:
        console.print(f"[red]error:[/] {e}")
        return 2
    plan = build_plan(job).validate()
    run = LocalRun(versions=list(range(1, args.syncs + 1)), both=args.baseline, timeout_s=job.sync.timeout_s,
                   bucket_bytes=int((args.bucket_mb or job.sync.bucket_mb) * (1 << 20)), versioned=True,
                   staging=args.staging, verify=job.sync.verify if args.verify is None else args.verify,
                   strict=bool(args.verify))
    if args.fault:
        try:
            run.fault = Fault.parse(args.fault)
        except FaultError as e:
            console.print(f"[red]error:[/] --fault: {e}")
            return 2
    console.print(f"{job.name}: {plan.num_trainer} trainer + {len(plan.inference_ranks)} engine processes (gloo), "
                  f"{args.syncs} syncs, {int(plan.chunks['nbytes'].sum()) / 1e6:.1f} MB per sync")
    t0 = time.perf_counter()
    try:
        results, errors = run_local(plan, run, allow_failures=bool(args.fault))
    except RankFailure as e:
        console.print(f"[red]sync failed:[/] {e}")
        return 1
    if errors or any(isinstance(s, str) for r in results.values() for v in r["stats"].values() for s in v):
        for rank, err in sorted(errors.items()):
            console.print(f"rank {rank}: [red]{err.strip().splitlines()[-1]}[/]")
        for rank in plan.inference_ranks:
            if rank in results:
                console.print(f"engine rank {rank}: {results[rank]['states'][-1]}")
        return 1
    table = Table(title="syncs", title_justify="left")
    for col in ("version", "executor", "seconds (slowest rank)", "MB sent (all ranks)", "verified"):
        table.add_column(col, justify="right")
    ok = True
    for name in results[0]["stats"]:
        for i, version in enumerate(run.versions):
            per_rank = [r["stats"][name][i] for r in results.values()]
            verified = all(s.verified is not False for s in per_rank)
            ok &= verified
            table.add_row(str(version), name, f"{per_rank[0].global_seconds:.4f}",
                          f"{sum(s.bytes_sent for s in per_rank) / 1e6:.2f}",
                          "not checked" if not run.verify else "[green]yes[/]" if verified else "[red]NO[/]")
    console.print(table)
    verdict = "not verified (--no-verify)" if not run.verify else "all syncs verified" if ok else "VERIFICATION FAILED"
    console.print(f"{verdict} ({time.perf_counter() - t0:.1f} s with process start)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
