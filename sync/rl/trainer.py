"""GRPO on the megatron-core ``GPTModel`` of one trainer rank: log-probs, loss, backward, gradients reduced
as Megatron's data parallelism reduces them, an Adam step.

Megatron-core's own pieces do the model work: the ``GPTModel`` forward (TP attention and MLPs, the MoE
router and its all-gather token dispatcher across EP), ``vocab_parallel_cross_entropy`` for the
log-probs over the TP-split vocabulary, autograd through its TP and EP communication. Avoided on this
CPU machine, and why:

* Megatron's ``DistributedDataParallel`` and ``finalize_model_grads``: its grad buffers and
  communication streams are CUDA's. Gradients are all-reduced here by Megatron's own rule (a parameter
  with ``allreduce=False`` is an expert's: over the expert data-parallel group; every other one over the
  data-parallel group), summed, as the loss is already normalized by the global token count.
* Megatron's optimizer wrappers (``get_megatron_optimizer``): built around those buffers; ``torch.optim.Adam``
  on the float32 parameters is the same update.
* Train mode: under TP > 1 Megatron's MoE layer refuses training without sequence parallelism, and the
  local layer spec's torch norms refuse sequence parallelism. The model is built without dropout, so
  eval mode computes the same forward, and autograd runs the same backward, but for one thing, the reason
  for the refusal: each token reaches the routed experts once from every TP rank, so their gradients are
  divided by TP here (tests/integration/test_grpo_step.py holds them to a single-process reference).
* Pipeline parallelism: Megatron's schedules allocate their p2p buffers on CUDA: ``trainer.pp`` must be 1.
* The padded vocabulary rows: Megatron's output layer has ``vocab_size`` rounded up; their logits are
  masked out, as the engines' vocabulary ends at ``vocab_size``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from planners.models import ModelSpec
from sync.ends.megatron import on_device
from sync.rl.task import GRPOSettings

__all__ = ["PolicyTrainer", "check_trainable"]


def check_trainable(job) -> None:
    """The GRPO step runs on this job's trainer layout, or this says which field to change."""
    if job.trainer.pp != 1 or job.trainer.vpp != 1:
        raise ValueError(f"trainer.pp={job.trainer.pp} (vpp={job.trainer.vpp}): the GRPO step runs one pipeline stage "
                         "here (Megatron's pipeline schedules need CUDA); use trainer.pp: 1, or --step seeded")
    if job.trainer.cp != 1:
        raise ValueError(f"trainer.cp={job.trainer.cp}: the GRPO step runs without context parallelism; use trainer.cp: 1")
    if job.model.dtype != "float32":
        raise ValueError(f"model dtype {job.model.dtype}: the GRPO step trains in float32 on CPU; set "
                         "model.overrides.torch_dtype: float32")


class PolicyTrainer:
    """One trainer rank's policy: ``token_logprobs`` of token sequences and a GRPO ``step`` on a batch."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec, settings: GRPOSettings,
                 reference: torch.nn.Module | None = None) -> None:
        self.model, self.spec, self.settings = model.eval(), spec, settings
        self.reference = reference  # the initial policy, for the KL term
        self.optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.lr)

    # -- log-probs -------------------------------------------------------------------------------
    def token_logprobs(self, tokens: torch.Tensor, model: torch.nn.Module | None = None) -> torch.Tensor:
        """``[batch, seq - 1]``: log p(tokens[:, t + 1] | tokens[:, :t + 1]) at the sampling temperature."""
        from megatron.core import parallel_state as ps
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        model = self.model if model is None else model
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        seq = inputs.shape[1]
        positions = torch.arange(seq)[None].expand_as(inputs)
        causal = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)[None, None]  # True: masked
        with on_device():
            logits = model(inputs, positions, causal)  # [batch, seq, this TP rank's vocabulary part]
            part = logits.shape[-1]
            first = ps.get_tensor_model_parallel_rank() * part
            padding = torch.arange(first, first + part) >= self.spec.vocab_size
            logits = (logits.float() / self.settings.temperature).masked_fill(padding, float("-inf"))
            return -vocab_parallel_cross_entropy(logits, labels)

    # -- one GRPO step ---------------------------------------------------------------------------
    def step(self, tokens: torch.Tensor, advantages: torch.Tensor, completion_start: int,
             total_tokens: int) -> dict[str, Any]:
        """One policy-gradient step on this data-parallel rank's share of the batch (``tokens [n, seq]``,
        ``advantages [n]``); ``total_tokens``: completion tokens of the whole batch, over every DP rank.
        Returns the log-probs of the completion tokens before the step, and the loss."""
        logp = self.token_logprobs(tokens)[:, completion_start - 1:]  # completion tokens only
        # on-policy, one step per batch: the ratio is 1, its gradient that of the log-prob
        ratio = torch.exp(logp - logp.detach())
        objective = (ratio * advantages[:, None]).sum()
        kl = torch.zeros(())
        if self.settings.kl_coef and self.reference is not None:
            with torch.no_grad():
                ref = self.token_logprobs(tokens, self.reference)[:, completion_start - 1:]
            kl = (torch.exp(ref - logp) - (ref - logp) - 1).sum()  # k3: unbiased, never negative
        loss = (-objective + self.settings.kl_coef * kl) / total_tokens
        self.optimizer.zero_grad(set_to_none=False)
        with on_device():  # Megatron's backward of its TP and EP communication asks CUDA for buffers too
            loss.backward()
        self.reduce_gradients()
        self.optimizer.step()
        return {"logprobs": logp.detach(), "loss": float(loss), "kl": float(kl) / total_tokens}

    def reduce_gradients(self) -> None:
        """Sum every gradient over the ranks that hold the same parameter with other data, by Megatron's
        rules (its ``finalize_model_grads``): first over the TP group for the per-head q/k norms, which
        every TP rank holds whole but applies to its own heads only; then over the data-parallel group,
        or the expert data-parallel group for an expert's parameter (``allreduce=False``)."""
        from megatron.core import parallel_state as ps

        tensor = ps.get_tensor_model_parallel_group()
        # without sequence parallelism Megatron's MoE dispatches every token once from each TP rank (why it
        # refuses to train so): the routed experts' gradients come out tp times the true ones
        duplicated = 1 if getattr(self.model.config, "sequence_parallel", False) else dist.get_world_size(tensor)
        dense = ps.get_data_parallel_group()
        experts = ps.get_expert_data_parallel_group()
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if p.grad is None:  # every rank must take part in every reduction
                p.grad = torch.zeros_like(p)
            if ("q_layernorm" in name or "k_layernorm" in name) and dist.get_world_size(tensor) > 1:
                dist.all_reduce(p.grad, group=tensor)
            group = dense if getattr(p, "allreduce", True) else experts
            if dist.get_world_size(group) > 1:
                dist.all_reduce(p.grad, group=group)
            if duplicated > 1 and ".mlp.experts." in name:
                p.grad.div_(duplicated)
