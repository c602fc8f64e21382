"""``rlsync run``: the RLHF refresh loop on Ray -- trainer and engine actors, one sync per iteration.

One Ray actor per rank. Trainer actors build megatron-core ``GPTModel`` s (or synthetic shards),
engine actors :class:`~sync.ends.reference.ReferenceEngine` s wrapped as versioned targets; all
join the sync's standalone gloo group through a TCP store on the driver's host. Each iteration:

1. the trainer steps. GRPO (the default with megatron trainers; ``sync.run.grpo``): engines sample
   completions of a task with a verifiable reward, counting the tokens each expert slot served, and the
   trainer ranks take a policy-gradient step on them. Seeded (``step="seeded"``): seeded weights of the
   next version, written into the model in place, and engines generate a few tokens (greedy), counting;
2. the driver folds the counts into the load window and (EPLB on) recomputes placement and plan;
3. every rank syncs version ``iteration``; checksums verify every engine tensor, and with
   ``sync.verify: logits`` engine logits are compared with a Hugging Face model holding the trainer's
   weights.

**Where actors land.** One placement group per node of the job's deployment, a bundle per GPU slot
(``{"CPU": 0.01}``, plus a GPU where the cluster has them, plus ``rlsync_node_<n>`` where the cluster
advertises it: ``scripts/ray_cluster.sh``), packed onto one Ray node. The ranks on plan device ``d``
share bundle ``d % gpus_per_node`` of node ``d // gpus_per_node``: colocated trainer and engine ranks
share their GPU's bundle, disaggregated ranks get bundles of their own. Compute stays on the CPU over
gloo here (the GPU executor is ``rlsync bench`` and the vLLM extension); GPUs are only reserved.

**Faults** (``fault=``, :mod:`sync.channels.faulty`): the faulty rank kills, stalls or corrupts in the sync of
its iteration. The driver names the ranks that died or stopped answering, records what each engine
says it serves, restarts those actors (all trainer actors when a megatron one died: their model
group is built together), and every rank joins a new sync group before the next iteration.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from planners import JobSpec, SyncPlan
from planners.build import PlanBuilder
from planners.eplb.stats import EngineLoadWindows
from sync.ends.synthetic import trained_tensor
from sync.rl.task import GRPOSettings, TargetTokens
from sync.run.grpo import check_grpo_job, rollout, train, trainer_weights

__all__ = ["run_job", "RankActor", "default_step"]

SEED = 0
BUNDLE_CPU = 0.01  # a token CPU share per GPU slot: Ray packs and pins by it, 2 cores can hold every rank


class RankActor:
    """One trainer or engine rank (wrapped by ``ray.remote`` in :func:`run_job`)."""

    def setup(self, job: JobSpec, placement, rank: int, host: str, port: int, trainer_port: int,
              trainer: str, grpo=None) -> dict[str, Any]:
        """``grpo``: the GRPO settings when the trainer steps by policy gradients (megatron only). Every
        rank plans its own part of the job (``PlanBuilder.rank_plan``) for the driver's ``placement``."""
        import ray
        import torch

        from sync.ends.synthetic import SyntheticSource
        from sync.run.local import LocalRun, _megatron_source

        torch.set_num_threads(1)
        plan = self._plan(job, placement, rank)
        if rank < plan.num_trainer:
            if trainer == "megatron":
                run = LocalRun(timeout_s=job.sync.timeout_s, job=job)
                self.source = _megatron_source(plan, run, rank, host, trainer_port)
                if grpo is not None:
                    from sync.rl.trainer import PolicyTrainer

                    self.policy = PolicyTrainer(self.source.chunks[0], job.model, grpo, self._initial_policy(job, plan, rank, grpo))
            else:
                self.source = SyntheticSource(plan, rank)
        self.join(job, placement, rank, host, port)
        ctx = ray.get_runtime_context()
        return {"rank": rank, "node_id": ctx.get_node_id(), "placement_group": ctx.get_placement_group_id(),
                "device": int(plan.devices[rank])}

    def _initial_policy(self, job: JobSpec, plan: SyncPlan, rank: int, grpo):
        """A frozen copy of the initial policy (version 0's weights) for the KL term; None without one."""
        if not grpo.kl_coef:
            return None
        from sync.ends.base import fill_from_full
        from sync.ends.megatron import MegatronSource, build_gpt_model

        model = build_gpt_model(job.model, job.trainer).eval()
        fill_from_full(plan, rank, MegatronSource(model).local_tensors(),
                       lambda tid: trained_tensor(plan.tensors[tid], tid, SEED, 0, job.model.dtype))
        for p in model.parameters():
            p.requires_grad_(False)
        return model

    def _plan(self, job: JobSpec, placement, rank: int) -> SyncPlan:
        """This rank's part of the job's plan for ``placement`` (its builder kept while the job stays)."""
        if getattr(self, "builder_job", None) != job:
            self.builder, self.builder_job = PlanBuilder.for_job(job), job
        return self.builder.rank_plan(placement, [rank])

    def join(self, job: JobSpec, placement, rank: int, host: str, port: int) -> None:
        """Join (or rejoin: new engines, or after a fault) the sync group; an engine keeps its weights
        and what it knows of the version it serves."""
        from sync.ends.synthetic import BufferTarget
        from sync.ends.reference import ReferenceEngine, engine_groups
        from sync.session import Session
        from sync.transport import standalone_transport
        from sync.ends.versioned import VersionedTarget

        plan = self._plan(job, placement, rank)
        self.job, self.rank = job, rank
        self.is_trainer = rank < plan.num_trainer
        transport = standalone_transport(rank, plan.num_ranks, host, port, job.sync.timeout_s, store_on_rank0=False)
        groups = engine_groups(plan, job, transport, rank)  # every rank takes part
        target = None
        if not self.is_trainer:
            old = getattr(self, "session", None)
            try:
                engine = ReferenceEngine(plan, job, rank, *groups)
            except NotImplementedError:  # models the reference engine cannot run: weights only
                engine = BufferTarget(plan, rank)
            if old is not None:  # the same engine in a new group: its weights and state stay
                engine.tensors = old.target.inner.tensors
                engine.placement = getattr(old.target.inner, "placement", None)
                target = VersionedTarget(engine, old.target.staging)
                target.state = old.target.state
            else:
                target = engine
        self.session = Session.open(plan, rank, transport, getattr(self, "source", None), target, job.sync)

    @property
    def plan(self) -> SyncPlan:
        return self.session.plan

    @property
    def target(self):
        return self.session.target

    def set_placement(self, placement) -> None:
        """Sync by a new expert placement from now on: this rank replans its own part."""
        self.session.replan(self._plan(self.job, placement, self.rank))

    def update(self, version: int) -> None:
        """The trainer's step: the seeded weights of ``version``, written into the model in place."""
        from sync.ends.base import fill_from_full

        if self.is_trainer:
            plan = self.plan
            fill_from_full(plan, self.rank, self.source.local_tensors(),
                           lambda tid: trained_tensor(plan.tensors[tid], tid, SEED, version, self.job.model.dtype))

    def generate(self, prompt: list[int], steps: int) -> dict[str, Any] | None:
        """Engines decode ``steps`` tokens greedily (every rank of an engine gets the same ids, as the
        logits are all-reduced); returns the sequence and the tokens each slot served ``[moe layers, slots]``."""
        import torch

        engine = None if self.is_trainer else self.target.inner
        if not hasattr(engine, "forward"):
            return None
        seq = list(prompt)
        for _ in range(steps):
            seq.append(int(engine.forward(torch.tensor(seq))[-1].argmax()))
        # causal: earlier tokens route the same in every pass, so one pass over the sequence but
        # its last token counts every token the engine has processed, once
        engine.forward(torch.tensor(seq[:-1]))
        return {"tokens": seq, "counts": engine.slot_counts}

    def sample(self, prompts, settings, seed: int) -> dict[str, Any] | None:
        """Engines: ``settings.completion_tokens`` tokens sampled at ``settings.temperature`` after each of
        ``prompts [n, prompt_tokens]`` (a seeded generator: every rank of the engine draws alike), their
        log-probs under the weights the engine serves, computed as the trainer computes them (one pass over
        the whole sequences, which also counts the tokens each expert slot served)."""
        import torch

        engine = None if self.is_trainer else self.target.inner
        if not hasattr(engine, "forward"):
            return None
        sequences = torch.as_tensor(np.asarray(prompts))
        generator = torch.Generator().manual_seed(seed)
        for _ in range(settings.completion_tokens):
            logits = engine.forward(sequences, dtype=torch.float32)[:, -1] / settings.temperature
            drawn = torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator)
            sequences = torch.cat([sequences, drawn], dim=1)
        logits = engine.forward(sequences[:, :-1], dtype=torch.float32) / settings.temperature
        logprobs = torch.log_softmax(logits, dim=-1).gather(-1, sequences[:, 1:, None])[..., 0]
        return {"tokens": sequences.numpy(), "logprobs": logprobs[:, settings.prompt_tokens - 1:].numpy(),
                "counts": engine.slot_counts}

    def train(self, tokens, advantages, settings) -> dict[str, Any] | None:
        """Trainer ranks: one GRPO step on this rank's data-parallel share of the batch. Returns the share's
        completion log-probs under the weights before the step (those the engines sampled with)."""
        import torch
        from megatron.core import parallel_state as ps

        if not self.is_trainer:
            return None
        dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        n = len(tokens)
        share = slice(d * n // dp, (d + 1) * n // dp)
        out = self.policy.step(torch.as_tensor(np.asarray(tokens)[share]),
                               torch.as_tensor(np.asarray(advantages)[share], dtype=torch.float32),
                               settings.prompt_tokens, n * settings.completion_tokens)
        return {"share": (share.start, share.stop), "logprobs": out["logprobs"].numpy(), "loss": out["loss"]}

    def full_weights(self) -> dict[int, tuple[Any, Any]] | None:
        """Trainer ranks: their pieces of the full HF weights (``sync.ends.base.read_full``)."""
        from sync.ends.base import read_full

        if not self.is_trainer:
            return None
        return {tid: (v.numpy(), m.numpy()) for tid, (v, m) in
                read_full(self.plan, self.rank, self.source.local_tensors()).items()}

    def logits(self, tokens: list[int]) -> Any:
        """Float32 logits of an engine for ``tokens`` (None on trainers and weight-only engines)."""
        import torch

        engine = None if self.is_trainer else self.target.inner
        if not hasattr(engine, "forward"):
            return None
        return engine.forward(torch.tensor(tokens), dtype=torch.float32).numpy()

    def arm(self, fault) -> None:
        self.session.executor.fault = fault

    def state(self) -> dict[str, Any] | None:
        return None if self.is_trainer else dict(vars(self.target.state))

    def sync(self, version: int) -> dict[str, Any]:
        from planners.errors import SyncError

        out: dict[str, Any] = {"rank": self.rank}
        try:
            stats = self.session.sync(version)
        except SyncError as e:  # the engine's state says what it serves now; the driver restarts the group
            return {**out, "error": f"{type(e).__name__}: {e}", "state": self.state()}
        return {**out, "seconds": stats.global_seconds, "stage_seconds": stats.stage_seconds,
                "verified": stats.verified, "sent_to": stats.sent_to, "bytes_sent": stats.bytes_sent,
                "mismatched": stats.mismatched, "state": self.state()}


def _node_resources(ray) -> set[str]:
    return {k for node in ray.nodes() if node.get("Alive") for k in node.get("Resources", {}) if k.startswith("rlsync_node_")}


class _Placement:
    """Placement groups per plan node (made when first needed) and the actor options of a rank."""

    def __init__(self, ray, gpus_per_node: int) -> None:
        self.ray, self.gpus_per_node = ray, gpus_per_node
        self.pinned = _node_resources(ray)
        self.gpus = ray.cluster_resources().get("GPU", 0) > 0
        self.groups: dict[int, Any] = {}

    def options(self, plan: SyncPlan, rank: int) -> dict[str, Any]:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        device = int(plan.devices[rank])
        node, slot = divmod(device, self.gpus_per_node)
        if node not in self.groups:
            bundle = {"CPU": BUNDLE_CPU, **({"GPU": 1} if self.gpus else {})}
            key = f"rlsync_node_{node}"
            if key in self.pinned:
                bundle[key] = 0.001
            pg = placement_group([dict(bundle) for _ in range(self.gpus_per_node)], strategy="STRICT_PACK",
                                 name=f"rlsync-node-{node}")
            try:
                self.ray.get(pg.ready(), timeout=120)
            except self.ray.exceptions.GetTimeoutError:
                remove_placement_group(pg)
                raise RuntimeError(f"Ray could not place node {node} of the job: {self.gpus_per_node} bundles of "
                                   f"{bundle} on one Ray node within 120 s (deployment.gpus_per_node is "
                                   f"{self.gpus_per_node}; the cluster has {self.ray.cluster_resources()})") from None
            self.groups[node] = pg
        sharing = int(np.sum(plan.devices == device))  # colocated: a trainer and an engine rank per GPU
        opts: dict[str, Any] = dict(num_cpus=BUNDLE_CPU / sharing, scheduling_strategy=PlacementGroupSchedulingStrategy(
            self.groups[node], placement_group_bundle_index=slot))
        if self.gpus:
            opts["num_gpus"] = 1 / sharing
        return opts

    def release(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            remove_placement_group(pg)


def default_step(trainer: str) -> str:
    """The trainer's step when none is asked for: GRPO where it can train (megatron-core), else seeded."""
    return "grpo" if trainer == "megatron" else "seeded"


def run_job(job: JobSpec, iterations: int = 3, report_dir: str | Path | None = None, address: str | None = None,
            trainer: str = "megatron", tokens: int = 8, steps: int = 4, console=None,
            engines_schedule: list[int] | None = None, fault=None,
            on_iteration: Callable[[dict[str, Any]], None] | None = None, step: str | None = None,
            grpo: GRPOSettings | None = None, sync_weights: bool = True) -> dict[str, Any]:
    """Run the refresh loop; returns the report (also written to ``report_dir/report.json``).

    ``step``: ``"grpo"`` (the default with megatron trainers) -- engines sample rollouts of a task
    with a verifiable reward, the trainer takes a GRPO step on them (``grpo``: its settings) and the new
    weights are synced before the next rollout; ``"seeded"`` (the default with synthetic trainers) --
    seeded weights of the next version, engines decode greedily. ``sync_weights=False``: the control,
    where the engines keep the initial weights (synced once before iteration 1) and never get another.

    ``engines_schedule[i]`` is the number of engines in iteration i+1 (elastic engines): when it
    changes, engines start or stop, every rank joins a new sync group, and the next sync plans for
    the new set (new engines get every weight like the others). ``fault``: a :class:`sync.channels.faulty.Fault`
    (its ``sync`` is the iteration). ``on_iteration(row)`` is called after each iteration."""
    import ray

    from sync.run.local import host_store

    step = step or default_step(trainer)
    if step not in ("grpo", "seeded"):
        raise ValueError(f"step={step!r}: 'grpo' or 'seeded'")
    grpo = (grpo or GRPOSettings()) if step == "grpo" else None
    if grpo is not None:
        check_grpo_job(job, grpo, trainer)
        if engines_schedule or fault is not None:  # a restarted trainer rank would lose its training state
            raise ValueError("elastic engines (--engines) and faults (--fault) run with --step seeded")
    elif not sync_weights:
        raise ValueError("--no-sync is the GRPO control: it runs with --step grpo")
    task = TargetTokens(job.model.vocab_size) if grpo is not None else None
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    say = console.print if console is not None else (lambda *a, **k: None)
    window = (EngineLoadWindows(len(job.model.moe_layers), job.model.num_experts, job.inference.engines,
                                job.eplb.per_engine, job.eplb.window) if job.model.is_moe else None)
    builder = PlanBuilder.for_job(job)  # what no placement touches, once; each new load replans the experts
    plan = builder.plan(job.placement(None)).validate()
    where = _Placement(ray, job.deployment.gpus_per_node)
    Actor = ray.remote(RankActor)
    host = "127.0.0.1" if address is None else ray.util.get_node_ip_address()
    stores: list = []  # the driver hosts the rendezvous stores (actors join as clients)

    def store_port() -> int:
        stores.append(host_store(host, job.sync.timeout_s))
        return stores[-1].port

    def regroup(actors: list, fresh: set[int]) -> list[dict]:
        """Every rank joins a new sync group; ``fresh`` actors set up first (models, engines)."""
        port = store_port()
        placement = plan.placement
        return [p for p in ray.get([a.setup.remote(job, placement, r, host, port, trainer_port, trainer, grpo)
                                    if r in fresh else a.join.remote(job, placement, r, host, port)
                                    for r, a in enumerate(actors)])
                if p is not None]

    trainer_port = store_port()
    actors = [Actor.options(**where.options(plan, r)).remote() for r in range(plan.num_ranks)]
    placed = regroup(actors, set(range(plan.num_ranks)))
    rng = np.random.default_rng(SEED)
    rows: list[dict[str, Any]] = []
    before_loads = after_loads = None
    initial_sync = None
    if grpo is not None:  # the engines start from the trainer's initial policy
        ray.get([a.update.remote(0) for a in actors])
        results, lost = _sync_all(ray, actors, 0, job.sync.timeout_s)
        initial_sync = _row(0, job, plan, results, lost, {}, placed)
        if lost or initial_sync["errors"] or not initial_sync["verified"]:
            raise RuntimeError(f"the initial sync (version 0) failed: {initial_sync['errors'] or 'not verified'}")
    for it in range(1, iterations + 1):
        engines = engines_schedule[(it - 1) % len(engines_schedule)] if engines_schedule else job.inference.engines
        if engines != job.inference.engines:  # elastic engines: a new set, a new group, a new plan
            job = replace(job, inference=replace(job.inference, engines=engines))
            if window is not None:
                window.resize(engines)
            builder = PlanBuilder.for_job(job)
            plan = builder.plan(job.placement(window.load() if window is not None and job.eplb.enabled else None)).validate()
            for a in actors[plan.num_ranks:]:
                ray.kill(a)
            fresh = set(range(len(actors), plan.num_ranks))
            actors = actors[: plan.num_ranks] + [Actor.options(**where.options(plan, r)).remote() for r in sorted(fresh)]
            placed = [p for p in placed if p["rank"] < plan.num_ranks] + regroup(actors, fresh)
            say(f"iteration {it}: now {engines} engine(s), {plan.num_ranks} ranks")
        first_ranks = [r for r in range(plan.num_trainer, plan.num_ranks) if (r - plan.num_trainer) % job.inference.engine_size == 0]
        learning: dict[str, Any] = {}
        if grpo is None:
            ray.get([a.update.remote(it) for a in actors])
            prompt = rng.integers(0, job.model.vocab_size, tokens).tolist()
            gen = ray.get([a.generate.remote(prompt, steps) for a in actors])
            slot_counts = [gen[r]["counts"] for r in first_ranks if gen[r] is not None and gen[r]["counts"] is not None]
            probe = next((g["tokens"] for g in gen if g is not None), prompt)
        else:  # rollouts with the weights the engines serve, then the step they teach
            rolled = rollout(ray, actors, plan, job, grpo, task, it)
            rewards = task.reward(rolled.tokens[:, grpo.prompt_tokens:])
            trained = train(ray, actors, plan, rolled.tokens, rewards, grpo)
            slot_counts, probe = rolled.counts, rolled.tokens[0].tolist()
            learning = dict(reward_mean=float(rewards.mean()), loss=trained["loss"],
                            logprob_mismatch=float(np.max(np.abs(trained["logprobs"] - rolled.logprobs))),
                            rollout_seconds=rolled.seconds, train_seconds=trained["seconds"])
        balance: dict[str, float] = {}
        if window is not None:
            if len(slot_counts) == job.inference.engines:  # every rank of an engine counts all of its tokens
                window.record(slot_counts, plan.placement)
            load = window.load()
            _, _, gpus = job.eplb_shape()
            balance["before"] = job.balancedness(load, plan.placement)
            if job.eplb.enabled and sync_weights:  # a placement reaches the engines with a sync only
                new_plan = builder.plan(job.placement(load)).validate()
                balance["after"] = job.balancedness(load, new_plan.placement)
                first_load = load[0] if load.ndim == 3 else load  # the plot shows engine 0's GPUs
                before_loads = (first_load, plan.placement.of_engine(0).phy2log, gpus)
                after_loads = (first_load, new_plan.placement.of_engine(0).phy2log, gpus)
                plan = new_plan
                ray.get([a.set_placement.remote(plan.placement) for a in actors])  # each replans its part
        if fault is not None and fault.sync == it and fault.rank < len(actors):
            ray.get(actors[fault.rank].arm.remote(fault))
        results, lost = _sync_all(ray, actors, it, job.sync.timeout_s) if sync_weights else ([], {})
        row = {**_row(it, job, plan, results, lost, balance, placed), **learning}
        if not sync_weights:
            row["verified"] = None  # nothing was synced
        elif job.sync.verify == "logits" and not lost:
            weights = (trainer_weights(ray, actors, plan) if grpo is not None else
                       {t.name: trained_tensor(t, i, SEED, it, job.model.dtype) for i, t in enumerate(plan.tensors)})
            row["logits_gap"] = _compare_logits(ray, actors, job, weights, probe, first_ranks)
            row["verified"] = row["verified"] and all(g is None for g in row["logits_gap"].values())
        rows.append(row)
        if on_iteration is not None:
            on_iteration(row)
        if lost or row["errors"]:  # restart what died or hung, then everyone joins a new group
            restart = set(lost)
            if trainer == "megatron" and any(r < plan.num_trainer for r in lost):
                restart |= set(range(plan.num_trainer))  # their Megatron group is built together
                trainer_port = store_port()
            for r in sorted(restart):
                ray.kill(actors[r])
                actors[r] = Actor.options(**where.options(plan, r)).remote()
            placed = [p for p in placed if p["rank"] not in restart] + regroup(actors, restart)
            say(f"iteration {it}: sync failed; restarted rank(s) {sorted(restart)}, every rank joined a new group")
    last_ok = next((r for r in reversed(rows) if not r["errors"]), None)
    report = dict(job=job.describe(), step=step, synced=sync_weights, grpo=vars(grpo) if grpo else None,
                  initial_sync=initial_sync, iterations=rows, wall_seconds=time.perf_counter() - started,
                  verified=all(r["verified"] is not False for r in rows),
                  placement=sorted(placed, key=lambda p: p["rank"]),  # node, placement group, plan device
                  expert_placement=plan.placement.phy2log.tolist() if plan.placement is not None else None,
                  cross_node_bytes_planned=int(plan.chunks["nbytes"][plan.chunks["link"] == 2].sum()),
                  cross_node_bytes_sent=last_ok["cross_node_bytes_sent"] if last_ok else 0,
                  ray_nodes=len({p["node_id"] for p in placed}), plan_nodes=int(plan.devices.max()) // job.deployment.gpus_per_node + 1)
    if report_dir is not None:
        _write_report(Path(report_dir), report, plan, before_loads, after_loads)
    for a in actors:
        ray.kill(a)
    where.release()
    return report


def _sync_all(ray, actors, version: int, timeout_s: float) -> tuple[list[dict], dict[int, str]]:
    """Every rank syncs ``version``; returns the results and the ranks that died or stopped answering."""
    refs = [a.sync.remote(version) for a in actors]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s * 4 + 30)
    results, lost = [], {}
    for r, ref in enumerate(refs):
        if ref not in ready:
            lost[r] = f"rank {r} stopped answering (no result within {timeout_s * 4 + 30:g} s)"
            continue
        try:
            results.append(ray.get(ref))
        except ray.exceptions.RayActorError as e:
            lost[r] = f"rank {r} died: {str(e).splitlines()[0]}"
        except ray.exceptions.RayError as e:  # anything but a sync error inside the task: restart it too
            lost[r] = f"rank {r} failed: {type(e).__name__}: {str(e).strip().splitlines()[-1]}"
    return results, lost


def _row(it: int, job: JobSpec, plan: SyncPlan, results: list[dict], lost: dict[int, str], balance: dict,
         placed: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    errors = {**lost, **{r["rank"]: r["error"] for r in results if "error" in r}}  # the cause first
    stages: dict[str, float] = {}
    for r in ok:
        for s, sec in r["stage_seconds"].items():
            stages[str(s)] = max(stages.get(str(s), 0.0), sec)
    return dict(iteration=it, engines=job.inference.engines, sync_seconds=max((r["seconds"] for r in ok), default=None),
                stage_seconds=stages, bytes=int(plan.chunks["nbytes"].sum()),
                predicted_seconds=plan.predicted_time(), bound_seconds=plan.lower_bound(),
                verified=not errors and all(r["verified"] is not False for r in ok), balancedness=balance,
                errors=errors, engine_states={r["rank"]: r["state"] for r in results if r.get("state") is not None},
                cross_node_bytes_sent=None if errors else _cross_node_sent(ok, placed))


def _cross_node_sent(results, placed) -> int:
    node_of = {p["rank"]: p["node_id"] for p in placed}
    return sum(n for r in results for peer, n in r["sent_to"].items() if node_of[peer] != node_of[r["rank"]])


def _compare_logits(ray, actors, job: JobSpec, weights: dict, tokens: list[int],
                    first_ranks: list[int]) -> dict[int, float | None]:
    """Each engine's float32 logits against the HF model holding the trainer's full ``weights`` (as an FP8
    engine holds them: through the reference quantizer); ``{engine's first rank: None if they agree, else
    the worst gap}``."""
    import torch

    from sync.verify.logits import hf_logits, logits_agree

    if job.inference.quantization is not None:
        from planners.models import catalog
        from planners.quant import reference_dequantized

        from planners.quant import is_derived_tensor

        # the trainer's weights, not the FP8 values and scales the plan derives from them
        full = {k: torch.as_tensor(v).float().numpy() for k, v in weights.items() if not is_derived_tensor(k)}
        weights = {k: torch.from_numpy(v) for k, v in reference_dequantized(job.model, catalog(job.model), full).items()}
    got = ray.get([a.logits.remote(tokens) for a in actors])
    want = hf_logits(job.model, weights, tokens)
    return {r: logits_agree(got[r], want) for r in first_ranks if got[r] is not None}


def _write_report(folder: Path, report: dict, plan: SyncPlan, before, after) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from planners.eplb import gpu_loads
    from sync.plots import plot_gpu_loads

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=1, default=str))
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(plan.traffic_matrix() / 1e6, cmap="viridis")
    ax.set_xlabel("receiver rank")
    ax.set_ylabel("sender rank")
    ax.set_title("bytes per sender/receiver (MB), both stages")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "traffic.png", dpi=100)
    plt.close(fig)
    rows = [r for r in report["iterations"] if "reward_mean" in r]
    if rows:
        _plot_learning(folder, rows, report["synced"])
    if before is not None:
        load, old, gpus = before
        plot_gpu_loads(gpu_loads(load, old, gpus), gpu_loads(load, after[1], gpus), folder / "expert_load.png",
                       title="per-GPU expert load before/after rebalancing")


def _plot_learning(folder: Path, rows: list[dict], synced: bool) -> None:
    """reward.png, mismatch.png and time_share.png of a GRPO run."""
    import matplotlib.pyplot as plt

    its = [r["iteration"] for r in rows]
    label = "synced every iteration" if synced else "control: engines never refreshed"
    for name, key, ylabel, log in (("reward", "reward_mean", "mean reward (share of target tokens)", False),
                                   ("mismatch", "logprob_mismatch", "max |trainer - engine| log-prob", True)):
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(its, [r[key] for r in rows], marker="o", label=label)
        ax.set_xlabel("iteration")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(folder / f"{name}.png", dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bottom = np.zeros(len(rows))
    for key, part in (("rollout_seconds", "rollout"), ("train_seconds", "train"), ("sync_seconds", "sync")):
        seconds = np.array([r.get(key) or 0.0 for r in rows])
        ax.bar(its, seconds, bottom=bottom, label=part)
        bottom += seconds
    ax.set_xlabel("iteration")
    ax.set_ylabel("seconds")
    ax.set_title("where each iteration goes")
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "time_share.png", dpi=100)
    plt.close(fig)
