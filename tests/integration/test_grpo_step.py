"""One GRPO step on megatron-core ranks equals the same step in one process of plain PyTorch.

Trainer ranks of several layouts (TP, EP, DP, tied embeddings under TP) build their ``GPTModel`` with the
same float32 weights and take one ``PolicyTrainer.step`` on their data-parallel share of a fixed batch.
The reference is transformers' model holding the full weights, the same loss on the whole batch,
``backward`` and ``torch.optim.Adam``. The ranks' log-probs before the step, their gradients after
Megatron's reductions and their weights after Adam, gathered into full tensors, must equal the
reference's; elements several ranks hold must agree between them too.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from planners import JobSpec, build_plan
from sync.rl.task import GRPOSettings
from sync.run.local import host_store, spawn_ranks

pytest.importorskip("megatron.core")
pytest.importorskip("transformers")

SETTINGS = GRPOSettings(prompts=4, group=2, prompt_tokens=4, completion_tokens=6, lr=1e-2, temperature=0.7)
SEQ = SETTINGS.prompt_tokens + SETTINGS.completion_tokens


def job_dict(preset: str, trainer: dict) -> dict:
    return dict(model=dict(preset=preset, overrides=dict(torch_dtype="float32")), trainer=trainer, inference=dict(tp=1))


def batch(vocab: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.integers(0, vocab, (SETTINGS.sequences, SEQ)), rng.standard_normal(SETTINGS.sequences)


def initial(plan, tid: int) -> torch.Tensor:
    from sync.ends.synthetic import trained_tensor

    return trained_tensor(plan.tensors[tid], tid, 0, 0, "float32")


def reference_weights(plan, tid: int) -> torch.Tensor:
    """The KL term's reference policy: other weights than the policy's, so that the term has a gradient."""
    from sync.ends.synthetic import trained_tensor

    return trained_tensor(plan.tensors[tid], tid, 0, 1, "float32")


def rank_main(rank: int, job: dict, port: int, tokens: np.ndarray, advantages: np.ndarray,
              settings: GRPOSettings = SETTINGS) -> dict:
    from megatron.core import parallel_state as ps

    from sync.ends.base import fill_from_full, read_full
    from sync.ends.megatron import build_gpt_model, local_name
    from sync.rl.trainer import PolicyTrainer
    from sync.run.local import init_group

    job = JobSpec.from_dict(job)
    plan, lay = build_plan(job), job.trainer
    init_group(rank, plan.num_trainer, "127.0.0.1", port, 120.0)
    ps.initialize_model_parallel(tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
                                 expert_model_parallel_size=lay.ep, expert_tensor_parallel_size=lay.etp,
                                 context_parallel_size=lay.cp, order=lay.order, create_gloo_process_groups=False)
    model = build_gpt_model(job.model, lay)
    params = {local_name(n): p for n, p in model.named_parameters()}
    fill_from_full(plan, rank, {n: p.data for n, p in params.items()}, lambda tid: initial(plan, tid))
    reference = None
    if settings.kl_coef:
        reference = build_gpt_model(job.model, lay).eval()
        fill_from_full(plan, rank, {local_name(n): p.data for n, p in reference.named_parameters()},
                       lambda tid: reference_weights(plan, tid))
    trainer = PolicyTrainer(model, job.model, settings, reference)
    dp, d = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    share = slice(d * len(tokens) // dp, (d + 1) * len(tokens) // dp)
    out = trainer.step(torch.tensor(tokens[share]), torch.tensor(advantages[share], dtype=torch.float32),
                       SETTINGS.prompt_tokens, SETTINGS.sequences * SETTINGS.completion_tokens)

    def numpy(pieces):
        return {tid: (v.numpy(), m.numpy()) for tid, (v, m) in pieces.items()}

    return {"share": (share.start, share.stop), "logprobs": out["logprobs"].numpy(), "loss": out["loss"], "kl": out["kl"],
            "grads": numpy(read_full(plan, rank, {n: p.grad for n, p in params.items()})),
            "weights": numpy(read_full(plan, rank, {n: p.data for n, p in params.items()}))}


def merged(plan, results: dict, key: str) -> dict[str, np.ndarray]:
    """Full tensors from every rank's pieces; elements held by several ranks must agree."""
    out = {}
    for tid, t in enumerate(plan.tensors):
        full, seen = np.zeros(t.shape, np.float32), np.zeros(t.shape, bool)
        for r in results.values():
            if tid not in r[key]:
                continue
            values, held = r[key][tid]
            both = held & seen
            assert np.allclose(values[both], full[both], rtol=1e-5, atol=1e-7), f"{key} of {t.name} differ between ranks"
            full[held] = values[held]
            seen |= held
        assert seen.all(), f"no rank holds all of {t.name}"
        out[t.name] = full
    return out


def per_expert(name: str, t: torch.Tensor) -> dict[str, np.ndarray]:
    """transformers 5's fused experts -> one tensor per expert (the plan's HF names)."""
    t = t.detach().numpy()
    if name.endswith("mlp.experts.gate_up_proj"):
        prefix, half = name[: -len("gate_up_proj")], t.shape[1] // 2
        return {**{f"{prefix}{e}.gate_proj.weight": t[e, :half] for e in range(len(t))},
                **{f"{prefix}{e}.up_proj.weight": t[e, half:] for e in range(len(t))}}
    if name.endswith("mlp.experts.down_proj"):
        return {f"{name[: -len('down_proj')]}{e}.down_proj.weight": t[e] for e in range(len(t))}
    return {name: t}


def reference_step(job: JobSpec, plan, tokens: np.ndarray, advantages: np.ndarray, settings: GRPOSettings = SETTINGS) -> dict:
    from sync.verify.logits import hf_model

    model = hf_model(job.model, {t.name: initial(plan, i) for i, t in enumerate(plan.tensors)})
    ids = torch.tensor(tokens)

    def logprobs(m):
        logits = m(ids[:, :-1]).logits.float() / settings.temperature
        return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0][:, settings.prompt_tokens - 1:]

    logp = logprobs(model)
    adv = torch.tensor(advantages, dtype=torch.float32)
    total = settings.sequences * settings.completion_tokens
    loss = -(torch.exp(logp - logp.detach()) * adv[:, None]).sum() / total
    kl = torch.zeros(())
    if settings.kl_coef:
        with torch.no_grad():
            ref = logprobs(hf_model(job.model, {t.name: reference_weights(plan, i) for i, t in enumerate(plan.tensors)}))
        kl = (torch.exp(ref - logp) - (ref - logp) - 1).sum()
        loss = loss + settings.kl_coef * kl / total
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr)
    loss.backward()
    named = dict(model.named_parameters())
    grads = {k: v for n, p in named.items() for k, v in per_expert(n, p.grad).items()}
    optimizer.step()
    weights = {k: v for n, p in named.items() for k, v in per_expert(n, p).items()}
    return {"logprobs": logp.detach().numpy(), "loss": float(loss), "kl": float(kl) / total, "grads": grads,
            "weights": weights}


LAYOUTS = [
    ("tiny_qwen3_moe", dict(tp=1)),
    ("tiny_qwen3_moe", dict(tp=2)),
    ("tiny_qwen3_moe", dict(tp=1, ep=2)),
    ("tiny_qwen3_moe", dict(tp=2, ep=2)),
    ("tiny_qwen3_moe", dict(tp=1, dp=2)),
    ("tiny_qwen3", dict(tp=2, dp=2)),  # tied embeddings: the output layer's gradient joins the embedding's
]


@pytest.mark.parametrize("preset, trainer", LAYOUTS, ids=[f"{p}-{'-'.join(f'{k}{v}' for k, v in t.items())}"
                                                          for p, t in LAYOUTS])
def test_one_grpo_step_equals_single_process_pytorch(preset, trainer):
    check_step(preset, trainer, SETTINGS)


def test_the_kl_term_to_a_reference_policy_equals_single_process_pytorch():
    """The KL (k3) to a frozen reference policy, here other weights than the policy's so that it pulls."""
    want = check_step("tiny_qwen3_moe", dict(tp=2, ep=2), dataclasses.replace(SETTINGS, kl_coef=0.5))
    assert want["kl"] > 1e-3  # the term is there and large enough to move the gradients checked above


def check_step(preset: str, trainer: dict, settings: GRPOSettings) -> dict:
    job = JobSpec.from_dict(job_dict(preset, trainer))
    plan = build_plan(job)
    tokens, advantages = batch(job.model.vocab_size)
    store = host_store()
    results, _ = spawn_ranks(plan.num_trainer, rank_main,
                             (job_dict(preset, trainer), store.port, tokens, advantages, settings), timeout_s=240)
    want = reference_step(job, plan, tokens, advantages, settings)
    assert abs(sum({r["share"]: r["kl"] for r in results.values()}.values()) - want["kl"]) < 1e-6
    for r in results.values():
        lo, hi = r["share"]
        np.testing.assert_allclose(r["logprobs"], want["logprobs"][lo:hi], atol=1e-5)
    assert abs(sum({r["share"]: r["loss"] for r in results.values()}.values()) - want["loss"]) < 1e-6
    grads, weights = merged(plan, results, "grads"), merged(plan, results, "weights")
    assert set(grads) <= set(want["grads"])
    scale = max(np.abs(g).max() for g in want["grads"].values())
    for name in grads:
        np.testing.assert_allclose(grads[name], want["grads"][name], atol=1e-5 * scale, err_msg=name)
    # Adam's first step is lr * g / (|g| + eps) per element: exactly that of the ranks' own gradients, and
    # the reference's wherever the gradient stands clear of float noise (there a tiny g's noise is magnified)
    moved = 0
    for name in weights:
        before = initial(plan, [t.name for t in plan.tensors].index(name)).numpy()
        adam = before - settings.lr * grads[name] / (np.abs(grads[name]) + 1e-8)
        np.testing.assert_allclose(weights[name], adam, atol=1e-6, err_msg=name)
        clear = np.abs(want["grads"][name]) > 1e-3 * scale
        np.testing.assert_allclose(weights[name][clear], want["weights"][name][clear], atol=1e-6, err_msg=name)
        moved += int((weights[name] != before).sum())
    assert moved > 0.5 * sum(w.size for w in weights.values())  # the step moved most weights: the check bites
    return want
