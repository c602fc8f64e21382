"""DeepSeek-V3 (and Kimi-K2): multi-latent attention, dense layers before ``first_k_dense_replace``
then MoE every ``moe_layer_freq``-th layer, sigmoid router with ``e_score_correction_bias``
(``topk_method: noaux_tc``) choosing within the ``topk_group`` best of ``n_group`` groups, shared experts."""

from __future__ import annotations

from planners.models.blocks import MLA, MoE
from planners.models.config import REQUIRED, ConfigValues, Family
from planners.models.spec import ModelSpec

_DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, vocab_size=129280, intermediate_size=18432, moe_intermediate_size=2048,
    n_routed_experts=256, n_shared_experts=1, first_k_dense_replace=3, moe_layer_freq=1,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_group=8, topk_group=4, num_experts_per_tok=8, topk_method="noaux_tc", tie_word_embeddings=False,
    torch_dtype="bfloat16",
)
PRESETS = {
    "tiny_deepseek_v3": dict(
        _DEEPSEEK_V3, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=250, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_group=2, topk_group=1, num_experts_per_tok=2,
    ),
    "deepseek_v3": _DEEPSEEK_V3,
    "kimi_k2": dict(
        _DEEPSEEK_V3, model_type="kimi_k2", num_attention_heads=64, num_key_value_heads=64, vocab_size=163840,
        n_routed_experts=384, first_k_dense_replace=1, n_group=1, topk_group=1,
    ),
}


def build(v: ConfigValues) -> ModelSpec:
    experts, first_dense, freq = v["n_routed_experts"], v["first_k_dense_replace"], v["moe_layer_freq"]
    moe = tuple(i for i in range(first_dense, v["num_hidden_layers"]) if experts and i % freq == 0)
    v.check_expert_count(moe, "n_routed_experts")
    v.check_groups("n_routed_experts")
    attention = MLA(v["num_attention_heads"], v["q_lora_rank"], v["kv_lora_rank"], v["qk_nope_head_dim"],
                    v["qk_rope_head_dim"], v["v_head_dim"])
    routing = MoE(experts, v["moe_intermediate_size"], v["num_experts_per_tok"], v["n_shared_experts"],
                  router=v["scoring_func"], router_bias=v["topk_method"] == "noaux_tc",
                  norm_topk_prob=v.norm_topk_prob(True), n_group=v["n_group"], topk_group=v["topk_group"],
                  routed_scaling_factor=float(v["routed_scaling_factor"]))
    return ModelSpec(**v.common(), attention=attention, mlp=v.dense_mlp(moe), moe_layers=moe,
                     moe=routing if moe else None)


FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3", "kimi_k2"),
    keys={  # defaults: transformers' DeepseekV3Config
        "intermediate_size": ("nonneg_int", 18432),
        "num_experts_per_tok": ("nonneg_int", 8),
        "n_routed_experts": ("nonneg_int", REQUIRED),
        "moe_intermediate_size": ("pos_int", REQUIRED),
        "first_k_dense_replace": ("nonneg_int", 3),
        "moe_layer_freq": ("pos_int", 1),
        "n_shared_experts": ("nonneg_int", 1),
        "topk_method": ("str", "noaux_tc"),
        "scoring_func": ("router", "sigmoid"),
        "routed_scaling_factor": ("pos_float", 2.5),
        "q_lora_rank": ("pos_int?", 1536),  # an explicit null: no q compression (q_proj)
        "kv_lora_rank": ("pos_int", REQUIRED),
        "qk_nope_head_dim": ("pos_int", REQUIRED),
        "qk_rope_head_dim": ("pos_int", REQUIRED),
        "v_head_dim": ("pos_int", REQUIRED),
        "n_group": ("pos_int", 8),
        "topk_group": ("pos_int", 4),
    },
    moe_keys=("n_routed_experts", "first_k_dense_replace", "moe_layer_freq"),
    build=build,
    presets=PRESETS,
)
