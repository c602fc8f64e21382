"""The driver's side of a GRPO iteration in ``rlsync run``: rollouts on the engines, the step on the
trainer ranks, and what the report says of both (reward, the trainer/engine log-prob mismatch).

Engines get whole prompt groups, prompt ``g`` going to engine ``g % engines``; every rank of an engine
samples the same rows with the same seeded generator (its logits are all-reduced, so they draw alike),
and the engine's first rank answers. Trainer ranks each take their data-parallel share of the batch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from planners import JobSpec, SyncPlan
from sync.rl.task import GRPOSettings, TargetTokens, group_advantages, prompt_groups

__all__ = ["Rollout", "rollout", "train", "trainer_weights", "check_grpo_job"]


def check_grpo_job(job: JobSpec, settings: GRPOSettings, trainer: str) -> None:
    """Everything a GRPO run needs of the job, named, before any actor starts."""
    from sync.ends.reference import unsupported
    from sync.rl.trainer import check_trainable

    if trainer != "megatron":
        raise ValueError(f"--trainer {trainer}: the GRPO step trains megatron-core models; use --trainer megatron "
                         "or --step seeded")
    check_trainable(job)
    why = unsupported(job.model, job.inference)
    if why is not None:
        raise ValueError(f"{why}: GRPO samples its rollouts on the reference engine")
    if settings.prompts < job.inference.engines:
        raise ValueError(f"{settings.prompts} prompts per iteration for {job.inference.engines} engines: every engine "
                         "needs a prompt group; raise --prompts")
    if settings.sequences % job.trainer.dp:
        raise ValueError(f"{settings.sequences} sequences per iteration ({settings.prompts} prompts x {settings.group}) "
                         f"do not split over trainer.dp={job.trainer.dp}")


@dataclass
class Rollout:
    tokens: np.ndarray  # [sequences, prompt + completion tokens]
    logprobs: np.ndarray  # [sequences, completion tokens]: the engine's, of the sampled tokens
    counts: list  # per engine: [moe layers, slots] tokens each expert slot served
    seconds: float


def rollout(ray, actors: list, plan: SyncPlan, job: JobSpec, settings: GRPOSettings, task: TargetTokens,
            iteration: int) -> Rollout:
    started = time.perf_counter()
    prompts = prompt_groups(task.prompts(settings, iteration), settings.group)
    engines, size, first = job.inference.engines, job.inference.engine_size, plan.num_trainer
    rows = {e: np.concatenate([np.arange(g * settings.group, (g + 1) * settings.group)
                               for g in range(settings.prompts) if g % engines == e]) for e in range(engines)}
    refs = {r: actors[r].sample.remote(prompts[rows[(r - first) // size]], settings,
                                       _seed(settings, iteration, (r - first) // size))
            for r in range(first, plan.num_ranks)}
    answers = dict(zip(refs, ray.get(list(refs.values()))))
    length = settings.prompt_tokens + settings.completion_tokens
    tokens = np.zeros((settings.sequences, length), dtype=np.int64)
    logprobs = np.zeros((settings.sequences, settings.completion_tokens), dtype=np.float32)
    counts = []
    for e in range(engines):
        answer = answers[first + e * size]
        tokens[rows[e]], logprobs[rows[e]] = answer["tokens"], answer["logprobs"]
        if answer["counts"] is not None:
            counts.append(answer["counts"])
    return Rollout(tokens, logprobs, counts, time.perf_counter() - started)


def _seed(settings: GRPOSettings, iteration: int, engine: int) -> int:
    return int(np.random.default_rng([settings.seed, iteration, engine]).integers(2**62))


def train(ray, actors: list, plan: SyncPlan, tokens: np.ndarray, rewards: np.ndarray,
          settings: GRPOSettings) -> dict[str, Any]:
    """One GRPO step on every trainer rank; the trainer's completion log-probs before it, by sequence."""
    started = time.perf_counter()
    advantages = group_advantages(rewards, settings.group)
    answers = ray.get([a.train.remote(tokens, advantages, settings) for a in actors[: plan.num_trainer]])
    logprobs = np.full((len(tokens), settings.completion_tokens), np.nan, dtype=np.float32)
    losses = {}
    for answer in answers:
        lo, hi = answer["share"]
        logprobs[lo:hi] = answer["logprobs"]
        losses[(lo, hi)] = answer["loss"]
    return {"logprobs": logprobs, "loss": float(sum(losses.values())), "seconds": time.perf_counter() - started}


def trainer_weights(ray, actors: list, plan: SyncPlan) -> dict[str, torch.Tensor]:
    """The full HF weights the trainer ranks hold now, merged from their pieces."""
    pieces = [p for p in ray.get([a.full_weights.remote() for a in actors[: plan.num_trainer]]) if p is not None]
    out = {}
    for tid, t in enumerate(plan.tensors):
        full = None
        for held in pieces:
            if tid in held:
                values, mask = held[tid]
                full = np.zeros_like(values) if full is None else full
                full[mask] = values[mask]
        out[t.name] = torch.from_numpy(full)
    return out
