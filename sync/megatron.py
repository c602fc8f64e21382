"""Megatron-core on the trainer side: build a ``GPTModel`` for a job, load HF weights into it, and
read its parameters in place as a sync source.

``MegatronSource(model)`` presents the model's parameters (and the router's ``expert_bias`` buffer)
under the local-spec names the plan's trainer shard rules use, so the executor checks names, shapes
and dtypes against the plan before any byte moves. Transformer Engine names are mapped onto them
(``linear_qkv.layer_norm_weight`` -> ``input_layernorm.weight``, ``mlp.linear_fc1.layer_norm_weight``
-> ``pre_mlp_layernorm.weight``, grouped-GEMM ``mlp.experts.linear_fc1.weight{j}`` ->
``mlp.experts.local_experts.{j}.linear_fc1.weight``); wrapper prefixes (``module.``) are dropped.
Supported here: dense (llama/qwen) and MoE (qwen3_moe/mixtral) models; MLA models build with the
local spec only after megatron-core 0.16.1's MLA fixes (see tests/megatron_oracle.py).
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from typing import Any
from unittest import mock

import torch

from planners.layouts import TrainerLayout
from planners.megatron_rules import padded_vocab
from planners.model import ModelSpec
from sync.tensors import TORCH_DTYPES

__all__ = ["build_gpt_model", "MegatronSource", "local_name"]

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
    ``layout``), local layer spec, parameters in the model's dtype on ``device``."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if spec.is_mla:
        raise NotImplementedError("build_gpt_model: MLA models are not built here yet (megatron-core 0.16.1 local MLA)")
    dtype = TORCH_DTYPES[spec.dtype]
    kw: dict[str, Any] = dict(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
        num_query_groups=spec.num_kv_heads, kv_channels=spec.head_dim,
        ffn_hidden_size=spec.intermediate_size or spec.moe_intermediate_size,
        add_qkv_bias=spec.qkv_bias, add_bias_linear=False, qk_layernorm=spec.qk_norm, normalization="RMSNorm",
        gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp, context_parallel_size=1,
        sequence_parallel=False, num_layers_in_first_pipeline_stage=layout.first_stage_layers,
        num_layers_in_last_pipeline_stage=layout.last_stage_layers, use_cpu_initialization=True,
        perform_initialization=False, params_dtype=dtype, pipeline_dtype=dtype, bf16=dtype == torch.bfloat16,
    )
    if spec.is_moe:
        kw.update(num_moe_experts=spec.num_experts, moe_ffn_hidden_size=spec.moe_intermediate_size,
                  moe_router_topk=max(spec.num_experts_per_tok, 1), moe_token_dispatcher_type="allgather",
                  moe_grouped_gemm=False, moe_aux_loss_coeff=0.0,
                  moe_layer_freq=[int(i in spec.moe_layers) for i in range(spec.num_layers)],
                  moe_shared_expert_intermediate_size=spec.moe_intermediate_size * spec.num_shared_experts or None,
                  moe_router_enable_expert_bias=spec.router_bias,
                  moe_router_score_function="sigmoid" if spec.router_bias else "softmax")
    config = TransformerConfig(**kw)
    layer_spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    with ExitStack() as stack:
        stack.enter_context(torch.device(device))
        # CPU-only torch: the router's expert_bias asks CUDA for a device; tied embeddings under PP call .cuda()
        stack.enter_context(mock.patch.object(torch.cuda, "current_device", lambda: device))
        stack.enter_context(mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self))
        return GPTModel(
            config=config, transformer_layer_spec=layer_spec,
            vocab_size=padded_vocab(spec.vocab_size, layout.vocab_divisible_by * layout.tp),
            max_sequence_length=4096, pre_process=ps.is_pipeline_first_stage(ignore_virtual=True),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=True),
            share_embeddings_and_output_weights=spec.tie_word_embeddings, position_embedding_type="rope",
        )


class MegatronSource:
    """A trainer rank's Megatron model chunks as a sync source (parameters read in place)."""

    def __init__(self, *chunks: torch.nn.Module) -> None:
        self.chunks = chunks

    def local_tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for chunk in self.chunks:
            for name, p in chunk.named_parameters():
                out[local_name(name)] = p.data
            for name, b in chunk.named_buffers():
                if name.endswith("router.expert_bias"):
                    out[local_name(name)] = b
        return out
