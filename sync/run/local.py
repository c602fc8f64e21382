"""Start one local process per rank (fork server, gloo over TCP on 127.0.0.1) and run a sync job in them.

``run_local(plan, settings)`` is what tests, ``scripts/run_local_sync.py`` and ``rlsync bench sync``
use: every process joins one gloo group spanning trainer and inference ranks, builds its end
(synthetic source or buffer target), and runs K syncs with the weights changing between them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import time
import traceback
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from planners.errors import RLSyncError
from planners.plan import SyncPlan
from sync.channels.faulty import KILL_EXIT_CODE
from sync.memory import PeakMemory

__all__ = ["LocalRun", "run_local", "spawn_ranks", "init_group", "host_store", "RankFailure"]


class RankFailure(RLSyncError, RuntimeError):
    """One or more rank processes failed; the message carries their errors."""

    def __init__(self, errors: dict[int, str]) -> None:
        self.errors = errors
        first = min(errors)
        super().__init__(f"{len(errors)} rank(s) failed; rank {first}: {errors[first].strip().splitlines()[-1]}")


def host_store(host: str = "127.0.0.1", timeout_s: float = 60.0) -> dist.TCPStore:
    """A rendezvous store that this process hosts for the ranks it starts; they join it as clients.
    The OS picks the port while the store already listens on it. Probing for a free port and
    letting rank 0 bind it later races with every other process on the machine (EADDRINUSE)."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


def init_group(rank: int, world_size: int, host: str, port: int, timeout_s: float, backend: str = "gloo") -> None:
    """Join the default process group through a store hosted by the launcher (:func:`host_store`)."""
    if host in ("127.0.0.1", "localhost"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    store = dist.TCPStore(host, port, world_size, False, timedelta(seconds=timeout_s))
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def _entry(rank: int, fn: Callable, args: tuple, results: Any) -> None:
    torch.set_num_threads(1)  # many ranks share few cores
    try:
        results.put((rank, "ok", fn(rank, *args)))
    except BaseException:  # noqa: BLE001 - every failure goes back to the parent
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass


# what the fork server imports before it forks ranks (sync.run.preload: the CPU kernels, loaded)
PRELOAD = ["torch", "torch.distributed", "numpy", "sync.run.local", "sync.executor", "sync.baseline", "sync.ends.base",
           "sync.run.preload"]


def spawn_ranks(world_size: int, fn: Callable, args: tuple, timeout_s: float, allow_failures: bool = False,
                grace_s: float | None = None) -> tuple[dict[int, Any], dict[int, str]]:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned processes. Returns (results, errors) by rank;
    raises RankFailure on any error unless ``allow_failures``. Processes still running after
    ``timeout_s``, or ``grace_s`` after the first failure, are killed and reported as errors."""
    # a fork server that has imported torch once forks ranks in milliseconds; spawning each would
    # import torch again per rank (seconds each on a small machine)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    results = ctx.Queue()
    procs = [ctx.Process(target=_entry, args=(r, fn, args, results), daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    exited: dict[int, float] = {}  # rank -> when its process was first seen gone without a result
    while len(out) + len(errors) < world_size and time.monotonic() < deadline:
        failed = False
        try:
            rank, status, value = results.get(timeout=min(max(deadline - time.monotonic(), 0.01), 0.5))
            (out if status == "ok" else errors)[rank] = value
            failed = status != "ok"
        except queue.Empty:  # a process that died says nothing: notice it (a second after, for its last words)
            for r, p in enumerate(procs):
                if r in out or r in errors or p.exitcode is None:
                    continue
                if time.monotonic() - exited.setdefault(r, time.monotonic()) > 1.0:
                    fault = " (a kill fault)" if p.exitcode == KILL_EXIT_CODE else ""
                    errors[r] = f"rank {r} exited with code {p.exitcode} without a result{fault}"
                    failed = True
        if failed and grace_s is not None:
            deadline = min(deadline, time.monotonic() + grace_s)
    for r, p in enumerate(procs):
        if r not in out and r not in errors:
            errors[r] = f"rank {r} gave no result within {timeout_s:g} s (stopped answering; killed)"
        if p.is_alive():
            p.kill()
        p.join(timeout=5)
    if errors and not allow_failures:
        raise RankFailure(errors)
    return out, errors


@dataclass
class LocalRun:
    """What a local sync job does in each rank."""

    versions: list[int] = field(default_factory=lambda: [1, 2, 3])  # one sync per version
    executor: str = "plan"  # "plan" or "broadcast"
    bucket_bytes: int = 256 << 20
    timeout_s: float = 60.0
    verify: bool = True
    strict: bool = False  # a failed verification raises VerificationError (naming tensors) on every rank
    measure_memory: bool = False  # each sync's peak extra memory (sync.memory; it also fixes malloc's mmap threshold)
    seed: int = 0
    return_tensors: bool = False  # engine ranks send their tensors back (small jobs, for tests)
    both: bool = False  # alternate plan and broadcast executors on each version (benchmarks)
    source: str = "synthetic"  # trainer ranks: "synthetic" shards, or a real megatron-core GPTModel
    job: Any = None  # the JobSpec (needed to build megatron-core models and reference engines)
    engine: str = "buffer"  # engine ranks: plain buffers, or "reference" engines that run a forward pass
    full_weights: list[dict[str, Any]] | None = None  # per version, HF weights (numpy) instead of seeded ones
    tokens: list[int] | None = None  # reference engines run these after each sync and return the logits
    versioned: bool = False  # failed syncs are reported with what each engine serves, not raised
    staging: bool = False  # versioned engines receive into staging copies and swap after verification
    fault: Any = None  # a sync.channels.faulty.Fault: kill, stall or corrupt one rank in the sync of its version
    direct_bytes: int | None = None  # the executor's threshold for chunks sent as their own messages (its default if None)


def _megatron_source(plan: SyncPlan, run: LocalRun, rank: int, host: str, port: int):
    """Build this trainer rank's GPTModel: Megatron gets the default group (trainer ranks only)."""
    from megatron.core import parallel_state as ps

    from sync.ends.megatron import MegatronSource, build_gpt_model

    lay = run.job.trainer
    init_group(rank, plan.num_trainer, host, port, run.timeout_s)
    ps.initialize_model_parallel(tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
                                 expert_model_parallel_size=lay.ep, expert_tensor_parallel_size=lay.etp,
                                 context_parallel_size=lay.cp, order=lay.order, create_gloo_process_groups=False)
    return MegatronSource(build_gpt_model(run.job.model, lay))


def _worker(rank: int, plan: SyncPlan, run: LocalRun, port: int, trainer_port: int) -> dict[str, Any]:
    from planners import SyncSettings
    from sync.baseline import BroadcastExecutor
    from sync.ends.base import fill_from_full
    from sync.ends.synthetic import BufferTarget, SyntheticSource, synthetic_tensor
    from planners.errors import SyncError
    from sync.channels import wait_all
    from sync.session import Session
    from sync.tensors import as_bits
    from sync.transport import standalone_transport

    is_trainer = rank < plan.num_trainer
    if is_trainer and run.source == "megatron":
        source = _megatron_source(plan, run, rank, "127.0.0.1", trainer_port)
    else:
        source = SyntheticSource(plan, rank, run.seed, 0) if is_trainer else None
    transport = standalone_transport(rank, plan.num_ranks, "127.0.0.1", port, run.timeout_s, store_on_rank0=False)
    engine = None if is_trainer else BufferTarget(plan, rank)
    if run.engine == "reference":
        from sync.ends.reference import ReferenceEngine, engine_groups

        groups = engine_groups(plan, run.job, transport, rank)
        engine = None if is_trainer else ReferenceEngine(plan, run.job, rank, *groups)
    # every rank derives the same settings, so the same buckets
    settings = SyncSettings(bucket_mb=run.bucket_bytes / (1 << 20), timeout_s=run.timeout_s, verify=run.verify,
                            staging=run.staging)
    options = {} if run.direct_bytes is None else dict(direct_bytes=run.direct_bytes)
    session = Session.open(plan, rank, transport, source, engine, settings, **options)
    target = session.target
    executors = {}
    if run.executor == "plan" or run.both:
        executors["plan"] = session.executor
    if run.executor == "broadcast" or run.both:
        executors["broadcast"] = BroadcastExecutor(plan, rank, transport, run.timeout_s)
    stats: dict[str, list] = {name: [] for name in executors}
    tensors, logits, states = [], [], []
    for i, version in enumerate(run.versions):
        if source is not None:  # new weights: the same seeded (or given) HF weights every rank derives
            if run.full_weights is not None:
                weights = run.full_weights[i]
                fill_from_full(plan, rank, source.local_tensors(),
                               lambda tid: torch.from_numpy(weights[plan.tensors[tid].name]))
            else:
                fill_from_full(plan, rank, source.local_tensors(),
                               lambda tid: synthetic_tensor(plan.tensors[tid], tid, run.seed, version))
        for name, ex in executors.items():
            if target is not None and not run.versioned:
                for t in target.local_tensors().values():
                    t.zero_()
            if run.fault is not None and run.fault.rank == rank and run.fault.sync == version:
                ex.fault = run.fault
            # start together, so times measure the sync, not the preparation
            wait_all([transport.barrier()], ["barrier before the sync"], run.timeout_s)
            if not run.versioned:
                device = next(iter((source or target).local_tensors().values())).device
                with PeakMemory(device) if run.measure_memory else nullcontext() as peak:
                    stats[name].append(ex.sync(source, target, verify=run.verify, version=version, strict=run.strict))
                if peak is not None:
                    stats[name][-1].peak_extra_bytes = peak.bytes
                continue
            try:
                stats[name].append(ex.sync(source, target, verify=run.verify, version=version, strict=run.strict))
            except SyncError as e:
                stats[name].append(str(e))
            if target is not None:
                states.append(dict(vars(target.state)))
            if isinstance(stats[name][-1], str):
                return {"stats": stats, "tensors": tensors, "logits": logits, "states": states}
        if run.return_tensors and target is not None:  # as bit patterns: numpy has no bfloat16
            tensors.append({k: as_bits(v).numpy() for k, v in target.local_tensors().items()})
        if run.tokens is not None and target is not None:
            logits.append(target.inner.forward(torch.tensor(run.tokens)).float().numpy())
    return {"stats": stats, "tensors": tensors, "logits": logits, "states": states,
            "slot_counts": getattr(engine, "slot_counts", None)}


def run_local(plan: SyncPlan, run: LocalRun, allow_failures: bool = False):
    """Run ``run`` on every rank of ``plan`` as local processes; returns (results, errors) by rank."""
    stores = [host_store(timeout_s=run.timeout_s) for _ in range(2)]  # held open until the ranks finish
    return spawn_ranks(plan.num_ranks, _worker, (plan, run, stores[0].port, stores[1].port),
                       timeout_s=run.timeout_s * (len(run.versions) * (2 if run.both else 1) + 2),
                       allow_failures=allow_failures, grace_s=run.timeout_s)
