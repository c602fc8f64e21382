"""Trainer shard rules name and shape exactly what megatron-core's GPTModel builds, rank by rank.

megatron-core builds each rank under a fake process group on the meta device (tests/megatron_oracle.py).
"""

from __future__ import annotations

import pytest

from planners import JobSpec
from planners.megatron_rules import trainer_locals
from planners.model import ModelSpec, catalog

CASES = [
    ("tiny_llama", dict(tp=2, pp=2, dp=2)),
    ("tiny_llama", dict(tp=2, pp=3, first_stage_layers=1, last_stage_layers=1)),
    ("tiny_qwen3", dict(tp=2, pp=2)),  # tied embeddings: last stage keeps output_layer
    ("tiny_qwen3", dict(tp=1, pp=1, cp=2, dp=2)),
    ("tiny_qwen3_moe", dict(tp=2, pp=2, ep=2)),
    ("tiny_qwen3_moe", dict(tp=2, pp=1, ep=4, etp=1)),
    ("tiny_mixtral", dict(tp=2, pp=1, ep=2, etp=2, dp=2)),
    ("tiny_deepseek_v3", dict(tp=2, pp=1, ep=4, etp=1)),
    ("tiny_deepseek_v3", dict(tp=1, pp=3, ep=2)),
]


def megatron_cfg(spec: ModelSpec) -> dict:
    cfg = dict(num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=spec.num_heads,
               num_query_groups=spec.num_kv_heads, ffn_hidden_size=spec.intermediate_size or spec.moe_intermediate_size,
               kv_channels=spec.head_dim, add_qkv_bias=spec.qkv_bias, qk_layernorm=spec.qk_norm or spec.is_mla,
               share_embeddings_and_output_weights=spec.tie_word_embeddings, vocab_size=spec.vocab_size)
    if spec.is_moe:
        cfg.update(num_moe_experts=spec.num_experts, moe_ffn_hidden_size=spec.moe_intermediate_size,
                   moe_layer_freq=[int(i in spec.moe_layers) for i in range(spec.num_layers)],
                   moe_shared_expert_intermediate_size=spec.moe_intermediate_size * spec.num_shared_experts or None,
                   moe_router_enable_expert_bias=spec.router_bias,
                   moe_router_score_function="sigmoid" if spec.router_bias else "softmax")
    if spec.is_mla:
        cfg.update(multi_latent_attention=True, q_lora_rank=spec.q_lora_rank, kv_lora_rank=spec.kv_lora_rank,
                   qk_head_dim=spec.qk_nope_head_dim, qk_pos_emb_head_dim=spec.qk_rope_head_dim,
                   v_head_dim=spec.v_head_dim)
    return cfg


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("megatron.core")
    from megatron_oracle import megatron_param_shapes

    return megatron_param_shapes


@pytest.mark.parametrize("preset,trainer", CASES)
def test_trainer_names_and_shapes_match_megatron(oracle, preset, trainer):
    job = JobSpec.from_dict(dict(model=dict(preset=preset), trainer=trainer, inference=dict(tp=1)))
    lay, spec = job.trainer, job.model
    cat = catalog(spec)
    for rank in range(lay.world_size):
        ours = {t.name: tuple(t.shape) for t in trainer_locals(spec, cat, lay, rank)}
        theirs = oracle(megatron_cfg(spec), tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, cp=lay.cp, dp=lay.dp,
                        order=lay.order, rank=rank, pp_first_stage_layers=lay.first_stage_layers,
                        pp_last_stage_layers=lay.last_stage_layers)
        theirs = {k: tuple(v) for k, v in theirs.items()}
        assert ours == theirs, (
            f"rank {rank}: only ours {sorted(set(ours) - set(theirs))[:5]}, only megatron "
            f"{sorted(set(theirs) - set(ours))[:5]}, shape diffs "
            f"{[(k, ours[k], theirs[k]) for k in set(ours) & set(theirs) if ours[k] != theirs[k]][:5]}"
        )
