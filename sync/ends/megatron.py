"""Megatron-core on the trainer side: build a ``GPTModel`` for a job, load HF weights into it, and
read its parameters in place as a sync source.

``MegatronSource(model)`` presents the model's parameters (and the router's ``expert_bias`` buffer)
under the local-spec names the plan's trainer shard rules use (``MegatronSource(chunks)``: the list of
model chunks Megatron builds under virtual pipeline parallelism, chunk ``v``'s names prefixed
``model{v}.``), so the executor checks names, shapes
and dtypes against the plan before any byte moves. Transformer Engine names are mapped onto them
(``linear_qkv.layer_norm_weight`` -> ``input_layernorm.weight``, ``mlp.linear_fc1.layer_norm_weight``
-> ``pre_mlp_layernorm.weight``, grouped-GEMM ``mlp.experts.linear_fc1.weight{j}`` ->
``mlp.experts.local_experts.{j}.linear_fc1.weight``); wrapper prefixes (``module.``) are dropped.
Supported here: GQA models, dense or MoE (any router, shared experts, expert bias, partial rotary);
MLA models build with the local spec only after megatron-core 0.16.1's MLA fixes (see
tests/megatron_oracle.py).
"""

from __future__ import annotations

import re
from contextlib import ExitStack, nullcontext
from typing import Any
from unittest import mock

import torch

from planners.layouts import TrainerLayout
from planners.models import ModelSpec
from planners.sides.megatron import chunk_prefix
from planners.sides.shards import padded_vocab
from sync.tensors import TORCH_DTYPES

__all__ = ["build_gpt_model", "MegatronSource", "local_name", "on_device"]

_TE_NAMES = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"linear_q_up_proj\.layer_norm_weight$"), "q_layernorm.weight"),
    (re.compile(r"linear_kv_up_proj\.layer_norm_weight$"), "kv_layernorm.weight"),
]
_GROUPED = re.compile(r"mlp\.experts\.(linear_fc[12])\.weight(\d+)$")


def local_name(name: str) -> str:
    """A Megatron parameter name (local spec, Transformer Engine or grouped GEMM) in local-spec form."""
    while name.startswith("module."):
        name = name[len("module."):]
    for pattern, repl in _TE_NAMES:
        name = pattern.sub(repl, name)
    return _GROUPED.sub(lambda m: f"mlp.experts.local_experts.{m.group(2)}.{m.group(1)}.weight", name)


def build_gpt_model(spec: ModelSpec, layout: TrainerLayout, device: str = "cpu") -> Any:
    """A GPTModel for this process's rank (``megatron.core.parallel_state`` must be initialized with
    ``layout``), local layer spec, parameters in the model's dtype on ``device``. With ``layout.vpp > 1``
    the list of this rank's ``vpp`` model chunks instead, as Megatron's ``get_model`` builds them
    (chunk ``v`` with ``vp_stage=v``; embedding on chunk 0 of the first stage, output on the last chunk
    of the last stage)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if spec.is_mla:
        raise NotImplementedError("build_gpt_model: MLA models are not built here yet (megatron-core 0.16.1 local MLA)")
    a, dtype = spec.attention, TORCH_DTYPES[spec.dtype]
    kw: dict[str, Any] = dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=a.num_heads,
        num_query_groups=a.num_kv_heads, kv_channels=a.head_dim,
        ffn_hidden_size=(spec.mlp or spec.moe).intermediate_size,
        add_qkv_bias=a.qkv_bias, add_bias_linear=False, qk_layernorm=a.qk_norm, normalization="RMSNorm",
        layernorm_epsilon=spec.rms_norm_eps, gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp, context_parallel_size=1,
        sequence_parallel=False, num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers, use_cpu_initialization=True,
        perform_initialization=False, attention_dropout=0.0, hidden_dropout=0.0, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    if spec.is_moe:
        m = spec.moe
        kw.update(num_moe_experts=m.num_experts, moe_ffn_hidden_size=m.intermediate_size,
                  moe_router_topk=max(m.top_k, 1), moe_token_dispatcher_type="allgather",
                  moe_grouped_gemm=False, moe_aux_loss_coeff=0.0,
                  moe_layer_freq=[int(i in spec.moe_layers) for i in range(spec.num_layers)],
                  moe_shared_expert_intermediate_size=m.shared_intermediate_size or None,
                  moe_router_enable_expert_bias=m.router_bias, moe_router_score_function=m.router,
                  # Megatron's softmax router normalizes over the chosen experts unless it takes the
                  # softmax first: HF's norm_topk_prob=False (Qwen3-MoE's default) is the latter
                  moe_router_pre_softmax=m.router == "softmax" and not m.norm_topk_prob,
                  moe_router_topk_scaling_factor=m.routed_scaling_factor if m.routed_scaling_factor != 1 else None)
        if m.n_group > 1:
            kw.update(moe_router_num_groups=m.n_group, moe_router_group_topk=m.topk_group)
    config = TransformerConfig(**kw)
    first = ps.is_pipeline_first_stage(ignore_virtual=True)
    last = ps.is_pipeline_last_stage(ignore_virtual=True)
    chunks = []
    for v in range(layout.vpp):
        vp_stage = v if layout.vpp > 1 else None
        layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm",
                                                vp_stage=vp_stage)
        with ExitStack() as stack:
            stack.enter_context(torch.device(device))
            stack.enter_context(on_device(device))
            chunks.append(GPTModel(
                config=config, transformer_layer_spec=layer_spec,
                vocab_size=padded_vocab(spec.vocab_size, layout.vocab_divisible_by * layout.tp),
                max_sequence_length=4096, pre_process=first and v == 0, post_process=last and v == layout.vpp - 1,
                share_embeddings_and_output_weights=spec.tie_word_embeddings, position_embedding_type="rope",
                rotary_percent=a.rotary_dim / a.head_dim if a.rotary_dim else 1.0, rotary_base=int(spec.rope_theta),
                vp_stage=vp_stage,
            ))
    return chunks if layout.vpp > 1 else chunks[0]


def on_device(device: str = "cpu") -> ExitStack:
    """Megatron-core asks CUDA for its device where it builds and runs a model (the router's expert bias,
    RoPE's frequencies, tied embeddings under PP call ``.cuda()``): on a CPU-only torch, ``device``."""
    stack = ExitStack()
    if device == "cpu" or not torch.cuda.is_available():
        from megatron.core.tensor_parallel.random import CudaRNGStatesTracker
        from megatron.core.transformer.moe import moe_utils

        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: device))
        stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self))
        # the forward forks the CUDA RNG around dropout; the model is built without dropout
        stack.enter_context(mock.patch.object(CudaRNGStatesTracker, "fork", lambda self, *a, **k: nullcontext()))
        # megatron-core 0.16.1 reads Transformer Engine's GEMM in the router, forward and backward (autograd
        # runs the backward outside any context), without TE installed: a NameError. None is what it means.
        if not hasattr(moe_utils, "te_general_gemm"):
            moe_utils.te_general_gemm = None
    return stack


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP / Float16Module wrappers (their ``.module``)."""
    while hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


class MegatronSource:
    """A trainer rank's Megatron model as a sync source (parameters read in place).

    ``MegatronSource(model)`` for one model; ``MegatronSource(chunks)`` (or ``MegatronSource(*chunks)``)
    for the list of model chunks Megatron builds with virtual pipeline parallelism, in virtual-stage
    order: chunk ``v``'s names get the plan's prefix ``model{v}.``. Two parameters that map to one
    name raise a ``ValueError`` naming both.
    """

    def __init__(self, *models: torch.nn.Module | list[torch.nn.Module] | tuple[torch.nn.Module, ...]) -> None:
        chunks: list[torch.nn.Module] = []
        for m in models:
            chunks.extend(m if isinstance(m, (list, tuple, torch.nn.ModuleList)) else [m])
        if not chunks:
            raise ValueError("MegatronSource needs a model or a list of model chunks")
        for v, chunk in enumerate(chunks):
            if not isinstance(chunk, torch.nn.Module):
                raise TypeError(f"MegatronSource: model chunk {v} is a {type(chunk).__name__}, not a torch module")
            stage = getattr(_unwrap(chunk), "vp_stage", None)
            if len(chunks) > 1 and stage is not None and stage != v:
                raise ValueError(
                    f"MegatronSource: model chunk {v} was built for vp_stage={stage}; pass the chunks in "
                    "virtual-stage order, as Megatron's get_model returns them"
                )
        self.chunks = tuple(chunks)

    def local_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        origin: dict[str, str] = {}
        vpp = len(self.chunks)
        for v, chunk in enumerate(self.chunks):
            prefix = chunk_prefix(vpp, v)
            tensors = [(n, p.data) for n, p in chunk.named_parameters()]
            tensors += [(n, b) for n, b in chunk.named_buffers() if n.endswith("router.expert_bias")]
            for name, t in tensors:
                key = prefix + local_name(name)
                where = f"{name!r} of chunk {v}" if vpp > 1 else repr(name)
                if key in out:
                    raise ValueError(
                        f"MegatronSource: {where} and {origin[key]} both map to {key!r}; "
                        "each plan name must come from exactly one parameter"
                    )
                out[key], origin[key] = t, where
        return out
