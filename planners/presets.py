"""Named model configs (Hugging Face ``config.json`` fields) for examples, tests and benchmarks."""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset"]

_DEEPSEEK_V3 = dict(
    model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, num_attention_heads=128,
    num_key_value_heads=128, vocab_size=129280, intermediate_size=18432, moe_intermediate_size=2048,
    n_routed_experts=256, n_shared_experts=1, first_k_dense_replace=3, moe_layer_freq=1,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_group=8, topk_group=4, num_experts_per_tok=8, topk_method="noaux_tc", tie_word_embeddings=False,
    torch_dtype="bfloat16",
)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny_llama": dict(
        model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=8, vocab_size=250, intermediate_size=128, tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    "tiny_qwen3": dict(
        model_type="qwen3", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, vocab_size=250, intermediate_size=128, tie_word_embeddings=True, torch_dtype="bfloat16",
    ),
    "tiny_qwen3_moe": dict(
        model_type="qwen3_moe", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
        head_dim=16, vocab_size=250, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False,
        torch_dtype="bfloat16",
    ),
    "tiny_mixtral": dict(
        model_type="mixtral", hidden_size=64, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
        head_dim=8, vocab_size=250, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
        torch_dtype="bfloat16",
    ),
    "tiny_deepseek_v3": dict(
        _DEEPSEEK_V3, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        vocab_size=250, intermediate_size=96, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        first_k_dense_replace=1, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_group=2, topk_group=1, num_experts_per_tok=2,
    ),
    "qwen3_30b_a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, vocab_size=151936, intermediate_size=6144, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
        tie_word_embeddings=False, torch_dtype="bfloat16",
    ),
    "deepseek_v3": _DEEPSEEK_V3,
    "kimi_k2": dict(
        _DEEPSEEK_V3, model_type="kimi_k2", num_attention_heads=64, num_key_value_heads=64, vocab_size=163840,
        n_routed_experts=384, first_k_dense_replace=1, n_group=1, topk_group=1,
    ),
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise KeyError(f"model.preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])
