"""``rlsync run``: the RLHF refresh loop on Ray -- trainer and engine actors, one sync per iteration.

One Ray actor per rank. Trainer actors build megatron-core ``GPTModel`` s (or synthetic shards),
engine actors :class:`~sync.engines.reference.ReferenceEngine` s; all join the sync's standalone gloo
group through a TCP store on the driver's host. Each iteration: the trainer's weights change (new
seeded weights loaded in place), the engines run a forward pass on a few tokens and count tokens per
expert slot, the driver folds the counts into the load window and (with EPLB on) recomputes the
placement and the plan, then every rank syncs and verifies. A report folder gets ``report.json``, the
traffic matrix and the per-GPU expert load before/after rebalancing as PNGs.

Actors are pinned to Ray nodes by custom resources: an actor for a rank on plan node ``n`` asks for
``{"rlsync_node_<n>": 0.001}`` when the cluster has such resources, so the job's node layout maps
onto the cluster's nodes (``scripts/ray_cluster.sh`` starts nodes with them).
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from planners import JobSpec, SyncPlan, build_plan
from planners.eplb import balance_report
from planners.eplb_stats import ExpertLoadWindow

__all__ = ["run_job", "RankActor"]


class RankActor:
    """One trainer or engine rank (wrapped by ``ray.remote`` in :func:`run_job`)."""

    def setup(self, job: JobSpec, plan: SyncPlan, rank: int, host: str, port: int, trainer_port: int,
              trainer: str) -> dict[str, Any]:
        import ray
        import torch

        from sync.endpoints import SyntheticSource
        from sync.launch import LocalRun, _megatron_source

        torch.set_num_threads(1)
        if rank < plan.num_trainer:
            if trainer == "megatron":
                run = LocalRun(timeout_s=job.sync.timeout_s, job=job)
                self.source = _megatron_source(plan, run, rank, host, trainer_port)
            else:
                self.source = SyntheticSource(plan, rank)
        self.join(job, plan, rank, host, port)
        return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id()}

    def join(self, job: JobSpec, plan: SyncPlan, rank: int, host: str, port: int) -> None:
        """Join (or rejoin, when the set of engines changed) the sync group and build this rank's end."""
        from sync.endpoints import BufferTarget
        from sync.engines.reference import ReferenceEngine, engine_groups
        from sync.transport import standalone_transport

        self.job, self.plan, self.rank = job, plan, rank
        self.is_trainer = rank < plan.num_trainer
        self.transport = standalone_transport(rank, plan.num_ranks, host, port, job.sync.timeout_s, store_on_rank0=False)
        groups = engine_groups(plan, job, self.transport, rank)  # every rank takes part
        self.target = None
        if not self.is_trainer:
            try:
                self.target = ReferenceEngine(plan, job, rank, *groups)
            except NotImplementedError:  # families the reference engine cannot run: weights only
                self.target = BufferTarget(plan, rank)
        self._executor(plan)

    def _executor(self, plan: SyncPlan) -> None:
        from sync.executor import PlanExecutor

        self.plan = plan
        self.executor = PlanExecutor(plan, self.rank, self.transport, int(self.job.sync.bucket_mb * (1 << 20)),
                                     self.job.sync.timeout_s)

    def set_plan(self, plan: SyncPlan) -> None:
        self._executor(plan)

    def update(self, version: int, seed: int = 0) -> None:
        """The trainer's step: new seeded weights, written into the model in place."""
        from sync.endpoints import fill_from_full, synthetic_tensor

        if self.is_trainer:
            plan = self.plan
            fill_from_full(plan, self.rank, self.source.local_tensors(),
                           lambda tid: synthetic_tensor(plan.tensors[tid], tid, seed, version))

    def generate(self, tokens: list[int]) -> Any:
        """Engines run a forward pass; returns per-slot token counts ``[moe layers, slots]`` (or None)."""
        import torch

        if self.is_trainer or not hasattr(self.target, "forward"):
            return None
        self.target.forward(torch.tensor(tokens))
        return self.target.slot_counts

    def sync(self) -> dict[str, Any]:
        stats = self.executor.sync(self.source if self.is_trainer else None, self.target, verify=self.job.sync.verify)
        return {"rank": self.rank, "seconds": stats.global_seconds, "verified": stats.verified,
                "sent_to": stats.sent_to, "bytes_sent": stats.bytes_sent, "mismatched": stats.mismatched}


def _node_resources(ray) -> set[str]:
    return {k for node in ray.nodes() if node.get("Alive") for k in node.get("Resources", {}) if k.startswith("rlsync_node_")}


def run_job(job: JobSpec, iterations: int = 3, report_dir: str | Path | None = None, address: str | None = None,
            trainer: str = "megatron", tokens: int = 16, console=None,
            engines_schedule: list[int] | None = None) -> dict[str, Any]:
    """Run the refresh loop; returns the report (also written to ``report_dir/report.json``).

    ``engines_schedule[i]`` is the number of engines in iteration i+1 (elastic engines): when it
    changes, engines start or stop, every rank joins a new sync group, and the next sync plans for
    the new set (new engines get every weight like the others)."""
    import ray

    from sync.launch import host_store

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    window = ExpertLoadWindow(len(job.model.moe_layers), job.model.num_experts, job.eplb.window) if job.model.is_moe else None
    plan = build_plan(job).validate()
    pinned = _node_resources(ray)
    Actor = ray.remote(num_cpus=0)(RankActor)
    host = "127.0.0.1" if address is None else ray.util.get_node_ip_address()
    # the driver hosts the rendezvous stores (actors join as clients), so no port is chosen and bound apart
    trainer_store = host_store(host, job.sync.timeout_s)
    trainer_port = trainer_store.port

    def start(rank: int):
        key = f"rlsync_node_{int(plan.devices[rank] // plan.gpus_per_node)}"
        return Actor.options(**({"resources": {key: 0.001}} if key in pinned else {})).remote()

    actors = [start(r) for r in range(plan.num_ranks)]
    store = host_store(host, job.sync.timeout_s)
    port = store.port
    placed = ray.get([a.setup.remote(job, plan, r, host, port, trainer_port, trainer) for r, a in enumerate(actors)])
    rng = np.random.default_rng(0)
    iterations_out = []
    before_loads = after_loads = None
    for it in range(1, iterations + 1):
        engines = engines_schedule[(it - 1) % len(engines_schedule)] if engines_schedule else job.inference.engines
        if engines != job.inference.engines:  # elastic engines: a new set, a new group, a new plan
            job = replace(job, inference=replace(job.inference, engines=engines))
            plan = build_plan(job, window.load() if window is not None and job.eplb.enabled else None).validate()
            for a in actors[plan.num_ranks:]:
                ray.kill(a)
            fresh = list(range(len(actors), plan.num_ranks))
            actors = actors[: plan.num_ranks] + [start(r) for r in fresh]
            store = host_store(host, job.sync.timeout_s)
            port = store.port
            joined = ray.get([a.setup.remote(job, plan, r, host, port, trainer_port, trainer) if r in fresh
                              else a.join.remote(job, plan, r, host, port) for r, a in enumerate(actors)])
            placed = [p for p in placed if p["rank"] < plan.num_ranks] + [j for j in joined if j is not None]
            if console is not None:
                console.print(f"iteration {it}: now {engines} engine(s), {plan.num_ranks} ranks")
        ray.get([a.update.remote(it) for a in actors])
        ids = rng.integers(0, job.model.vocab_size, tokens).tolist()
        counts = ray.get([a.generate.remote(ids) for a in actors])
        balance = {}
        if window is not None:
            # every rank of an engine counts all of its tokens: take one rank per engine
            per_engine = [c for r, c in enumerate(counts) if c is not None and (r - plan.num_trainer) % job.inference.engine_size == 0]
            if per_engine:
                window.record(np.sum(per_engine, axis=0), plan.placement.phy2log)
            load = window.load()
            groups, n_nodes, gpus = job.eplb_shape()
            balance["before"] = balance_report(load, plan.placement, gpus, n_nodes).balancedness
            if job.eplb.enabled:
                new_plan = build_plan(job, load).validate()
                balance["after"] = balance_report(load, new_plan.placement, gpus, n_nodes).balancedness
                before_loads = (load, plan.placement.phy2log, gpus)
                after_loads = (load, new_plan.placement.phy2log, gpus)
                plan = new_plan
                ray.get([a.set_plan.remote(plan) for a in actors])
        results = ray.get([a.sync.remote() for a in actors])
        seconds = max(r["seconds"] for r in results)
        verified = all(r["verified"] is not False for r in results)
        row = dict(iteration=it, engines=job.inference.engines, sync_seconds=seconds, bytes=int(plan.chunks["nbytes"].sum()),
                   predicted_seconds=plan.predicted_time(), bound_seconds=plan.lower_bound(), verified=verified,
                   balancedness=balance)
        iterations_out.append(row)
        if console is not None:
            console.print(f"iteration {it}: sync {seconds:.3f} s, {row['bytes'] / 1e6:.2f} MB, "
                          f"balancedness {balance.get('before', 1):.3f} -> {balance.get('after', balance.get('before', 1)):.3f}, "
                          f"verified {verified}")
    report = dict(job=job.describe(), iterations=iterations_out, wall_seconds=time.perf_counter() - started,
                  verified=all(r["verified"] for r in iterations_out),
                  placement=[{"rank": p["rank"], "node_id": p["node_id"]} for p in placed],
                  cross_node_bytes_planned=int(plan.chunks["nbytes"][plan.chunks["link"] == 2].sum()),
                  cross_node_bytes_sent=_cross_node_sent(results, placed))
    if report_dir is not None:
        _write_report(Path(report_dir), report, plan, before_loads, after_loads)
    for a in actors:
        ray.kill(a)
    return report


def _cross_node_sent(results, placed) -> int:
    node_of = {p["rank"]: p["node_id"] for p in placed}
    return sum(n for r in results for peer, n in r["sent_to"].items() if node_of[peer] != node_of[r["rank"]])


def _write_report(folder: Path, report: dict, plan: SyncPlan, before, after) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planners.eplb import gpu_loads
    from sync.plots import plot_gpu_loads

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1))
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(plan.traffic_matrix() / 1e6, cmap="viridis")
    ax.set_xlabel("receiver rank")
    ax.set_ylabel("sender rank")
    ax.set_title("bytes per sender/receiver (MB), both stages")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "traffic.png", dpi=100)
    plt.close(fig)
    if before is not None:
        load, old, gpus = before
        plot_gpu_loads(gpu_loads(load, old, gpus), gpu_loads(load, after[1], gpus), folder / "expert_load.png",
                       title="per-GPU expert load before/after rebalancing")
