"""GLM-4.5 MoE (``glm4_moe``; GLM-4.5, GLM-4.5-Air, GLM-4.6): GQA with q/k/v biases, optional per-head
q/k norms (``use_qk_norm``) and RoPE on part of each head (``partial_rotary_factor``), dense layers
before ``first_k_dense_replace`` then MoE: a sigmoid router with ``e_score_correction_bias``, top-k
within the best groups, weights renormalized and scaled by ``routed_scaling_factor``, shared experts.
The multi-token-prediction layers (``num_nextn_predict_layers``) are not served and are left out."""

from __future__ import annotations

from planners.models.blocks import MoE, VllmTraits
from planners.models.config import REQUIRED, ConfigValues, Family
from planners.models.spec import ModelSpec

PRESETS = {
    "tiny_glm4_moe": dict(
        model_type="glm4_moe", hidden_size=64, num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=8,
        num_key_value_heads=2, head_dim=16, vocab_size=250, intermediate_size=128, moe_intermediate_size=32,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, use_qk_norm=True, attention_bias=True,
        partial_rotary_factor=0.5, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    "glm4_5_air": dict(  # transformers' Glm4MoeConfig defaults, GLM-4.5-Air's shapes
        model_type="glm4_moe", hidden_size=4096, num_hidden_layers=46, first_k_dense_replace=1, num_attention_heads=96,
        num_key_value_heads=8, head_dim=128, vocab_size=151552, intermediate_size=10944, moe_intermediate_size=1408,
        n_routed_experts=128, n_shared_experts=1, num_experts_per_tok=8, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, norm_topk_prob=True, use_qk_norm=False, attention_bias=True,
        partial_rotary_factor=0.5, rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
}


def build(v: ConfigValues) -> ModelSpec:
    experts, first_dense = v["n_routed_experts"], v["first_k_dense_replace"]
    moe = tuple(range(first_dense, v["num_hidden_layers"])) if experts else ()
    v.check_expert_count(moe, "n_routed_experts")
    attention = v.gqa(qkv_bias=v["attention_bias"], qk_norm=v["use_qk_norm"],
                      rotary_fraction=float(v.rope("partial_rotary_factor", "fraction", 0.5)))
    v.check_groups("n_routed_experts")
    # the router weight is float32 in the engine (vLLM creates the gate in float32) and in transformers
    routing = MoE(experts, v["moe_intermediate_size"], v["num_experts_per_tok"], v["n_shared_experts"],
                  router="sigmoid", router_bias=True, router_dtype="float32", norm_topk_prob=v.norm_topk_prob(True),
                  n_group=v["n_group"], topk_group=v["topk_group"],
                  routed_scaling_factor=float(v["routed_scaling_factor"]))
    return ModelSpec(**v.common(), attention=attention, mlp=v.dense_mlp(moe), moe_layers=moe,
                     moe=routing if moe else None, vllm=VllmTraits(moe_layer_on_every_stage=True))


FAMILY = Family(
    name="glm4_moe",
    model_types=("glm4_moe",),
    keys={  # defaults: transformers' Glm4MoeConfig
        "intermediate_size": ("nonneg_int", 10944),
        "num_experts_per_tok": ("nonneg_int", 8),
        "rms_norm_eps": ("pos_float", 1e-5),
        "attention_bias": ("bool", False),
        "use_qk_norm": ("bool", False),
        "partial_rotary_factor": ("fraction", None),  # None: rope_parameters' or 0.5 (transformers' default)
        "n_routed_experts": ("nonneg_int", REQUIRED),
        "moe_intermediate_size": ("pos_int", REQUIRED),
        "n_shared_experts": ("nonneg_int", 1),
        "first_k_dense_replace": ("nonneg_int", 1),
        "routed_scaling_factor": ("pos_float", 1.0),
        "n_group": ("pos_int", 1),
        "topk_group": ("pos_int", 1),
    },
    spellings={"n_routed_experts": ("num_local_experts",)},
    moe_keys=("n_routed_experts", "first_k_dense_replace"),
    build=build,
    presets=PRESETS,
)
