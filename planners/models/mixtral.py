"""Mixtral: GQA, every layer MoE (softmax router, top-k weights renormalized), experts named
``block_sparse_moe.experts.{e}.w1/w3/w2``. vLLM's model keeps embeddings, norm and head on every PP stage."""

from __future__ import annotations

from planners.models.blocks import MoE, Names, VllmTraits
from planners.models.config import REQUIRED, ConfigValues, Family
from planners.models.spec import ModelSpec

PRESETS = {
    "tiny_mixtral": dict(
        model_type="mixtral", hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, vocab_size=250, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        torch_dtype="bfloat16",
    ),
}


def build(v: ConfigValues) -> ModelSpec:
    moe = tuple(range(v["num_hidden_layers"]))
    v.check_expert_count(moe, "num_local_experts")
    return ModelSpec(**v.common(), attention=v.gqa(qkv_bias=False, qk_norm=False), moe_layers=moe,
                     moe=MoE(v["num_local_experts"], v["intermediate_size"], v["num_experts_per_tok"],
                             norm_topk_prob=v.norm_topk_prob(True)),
                     names=Names(moe_block="block_sparse_moe", expert_projections=("w1", "w3", "w2")),
                     vllm=VllmTraits(io_on_every_stage=True, moe_layer_on_every_stage=True))


FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    keys={
        "intermediate_size": ("pos_int", REQUIRED),  # the experts' width
        "num_local_experts": ("pos_int", REQUIRED),
        "num_experts_per_tok": ("nonneg_int", 2),
        "rope_theta": ("pos_float", 1e6),
        "rms_norm_eps": ("pos_float", 1e-5),
    },
    moe_keys=("num_local_experts",),
    build=build,
    presets=PRESETS,
)
