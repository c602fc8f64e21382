"""Dense GQA models: Llama, Mistral, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k norms)."""

from __future__ import annotations

from planners.models.config import REQUIRED, ConfigValues, Family
from planners.models.spec import ModelSpec

PRESETS = {
    "tiny_llama": dict(
        model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=8, vocab_size=250, intermediate_size=128, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    "tiny_qwen3": dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, vocab_size=250, intermediate_size=128, tie_word_embeddings=True, torch_dtype="bfloat16",
    ),
}


def build(v: ConfigValues) -> ModelSpec:
    bias = v["attention_bias"]
    return ModelSpec(**v.common(), attention=v.gqa(qkv_bias=v.model_type == "qwen2" if bias is None else bias,
                                                   qk_norm=v.model_type == "qwen3"),
                     mlp=v.dense_mlp(()))


FAMILY = Family(
    name="llama",
    model_types=("llama", "mistral", "qwen2", "qwen3"),
    keys={
        "intermediate_size": ("pos_int", REQUIRED),
        "attention_bias": ("bool", None),  # None: True for qwen2
    },
    build=build,
    presets=PRESETS,
)
