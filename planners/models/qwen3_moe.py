"""Qwen3-MoE: GQA with per-head q/k norms, softmax-routed experts on every ``decoder_sparse_step``-th
layer except ``mlp_only_layers``. vLLM's model keeps embeddings, norm and head on every PP stage."""

from __future__ import annotations

from planners.errors import ModelError
from planners.models.blocks import MoE, VllmTraits
from planners.models.config import REQUIRED, ConfigValues, Family
from planners.models.spec import ModelSpec

PRESETS = {
    "tiny_qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, vocab_size=250, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "qwen3_30b_a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
}


# vLLM's Qwen3MoeForCausalLM: io on every stage; "No Qwen3MoE layer found" for a stage without a MoE layer;
# "Tensor parallel size ... is greater than the number of experts"
VLLM = VllmTraits(io_on_every_stage=True, moe_layer_on_every_stage=True, tp_at_most_experts=True)


def build(v: ConfigValues) -> ModelSpec:
    layers, experts, step = v["num_hidden_layers"], v["num_experts"], v["decoder_sparse_step"]
    dense_only = set(v["mlp_only_layers"])
    outside = sorted(i for i in dense_only if i >= layers)
    if outside:
        raise ModelError(f"{v.path('mlp_only_layers')} holds layer indices {outside[:8]} outside "
                         f"[0, {layers}) ({v.path('num_hidden_layers')})")
    moe = tuple(i for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
    v.check_expert_count(moe, "num_experts")
    return ModelSpec(**v.common(), attention=v.gqa(qkv_bias=v["attention_bias"], qk_norm=True),
                     mlp=v.dense_mlp(moe), moe_layers=moe, vllm=VLLM,
                     moe=MoE(experts, v["moe_intermediate_size"], v["num_experts_per_tok"],
                             norm_topk_prob=v.norm_topk_prob(False)) if moe else None)


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    keys={
        "intermediate_size": ("nonneg_int", 6144),
        "num_experts_per_tok": ("nonneg_int", 8),
        "attention_bias": ("bool", False),
        "num_experts": ("nonneg_int", REQUIRED),
        "moe_intermediate_size": ("pos_int", REQUIRED),
        "decoder_sparse_step": ("pos_int", 1),
        "mlp_only_layers": ("layer_list", ()),
    },
    spellings={"num_experts": ("num_local_experts",)},  # transformers 5's to_dict() writes num_local_experts
    moe_keys=("num_experts", "decoder_sparse_step", "mlp_only_layers"),
    build=build,
    presets=PRESETS,
)
