"""Trainer shard rules name and shape exactly what megatron-core's GPTModel builds, rank by rank.

megatron-core builds each rank under a fake process group on the meta device (tests/megatron_oracle.py).
With virtual pipeline parallelism (``vpp``) each rank's model chunks are built with their ``vp_stage``,
and every chunk's global layers (``layer_number - 1``) must be those the plan's pieces take.
"""

from __future__ import annotations

import pytest

import re

from planners import JobSpec
from planners.sides.megatron import trainer_chunk_layers, trainer_locals
from planners.models import ModelSpec, catalog

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
    ("tiny_glm4_moe", dict(tp=2, pp=1, ep=2)),  # linear_qkv bias, q/k layernorms, sigmoid router + expert_bias
    ("tiny_glm4_moe", dict(tp=1, pp=3, ep=4, etp=1)),
    # virtual pipeline (interleaved schedule): vpp model chunks per PP rank
    ("tiny_llama", dict(tp=1, pp=2, vpp=2)),  # 4 layers: one per chunk, rank 0 holds 0 and 2
    ("tiny_qwen3", dict(tp=2, pp=2, vpp=2)),  # tied embeddings: output_layer on the last chunk of the last rank
    ("tiny_qwen3_moe", dict(tp=1, pp=2, vpp=2, ep=2)),
]
LLAMA = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=300, intermediate_size=128)
VPP_CASES = [  # more layers than the presets: deeper and uneven interleaving
    (dict(hf_config=dict(LLAMA, num_hidden_layers=8)), dict(tp=1, pp=2, vpp=4)),  # rank 0 holds 0, 2, 4, 6
    (dict(hf_config=dict(LLAMA, num_hidden_layers=8)), dict(tp=2, pp=2, vpp=2, dp=2, order="tp-dp-pp-cp-ep")),
    (dict(hf_config=dict(LLAMA, num_hidden_layers=12, tie_word_embeddings=True)),
     dict(tp=1, pp=3, vpp=2, first_stage_layers=2, last_stage_layers=2)),  # uneven + interleaved
    (dict(hf_config=dict(LLAMA, num_hidden_layers=12)), dict(tp=1, pp=4, vpp=3)),
    # one dense layer then MoE (MLA, shared experts, expert bias): layer specs sliced per chunk
    (dict(preset="tiny_deepseek_v3", overrides=dict(num_hidden_layers=4)), dict(tp=1, pp=2, vpp=2, ep=2, etp=1)),
    (dict(preset="tiny_qwen3_moe", overrides=dict(num_hidden_layers=8, mlp_only_layers=[0, 5])),
     dict(tp=2, pp=2, vpp=2, ep=2)),
]


def megatron_cfg(spec: ModelSpec) -> dict:
    a, m = spec.attention, spec.moe
    cfg = dict(num_layers=spec.num_layers, hidden_size=spec.hidden_size, num_attention_heads=a.num_heads,
               ffn_hidden_size=(spec.mlp or m).intermediate_size,
               share_embeddings_and_output_weights=spec.tie_word_embeddings, vocab_size=spec.vocab_size)
    if spec.is_mla:
        cfg.update(num_query_groups=a.num_heads, kv_channels=a.v_head_dim, add_qkv_bias=False, qk_layernorm=True)
    else:
        cfg.update(num_query_groups=a.num_kv_heads, kv_channels=a.head_dim, add_qkv_bias=a.qkv_bias,
                   qk_layernorm=a.qk_norm)
    if spec.is_moe:
        cfg.update(num_moe_experts=m.num_experts, moe_ffn_hidden_size=m.intermediate_size,
                   moe_layer_freq=[int(i in spec.moe_layers) for i in range(spec.num_layers)],
                   moe_shared_expert_intermediate_size=m.shared_intermediate_size or None,
                   moe_router_enable_expert_bias=m.router_bias, moe_router_score_function=m.router)
    if spec.is_mla:
        cfg.update(multi_latent_attention=True, q_lora_rank=a.q_lora_rank, kv_lora_rank=a.kv_lora_rank,
                   qk_head_dim=a.qk_nope_head_dim, qk_pos_emb_head_dim=a.qk_rope_head_dim,
                   v_head_dim=a.v_head_dim)
    return cfg


@pytest.fixture(scope="module")
def oracle():
    pytest.importorskip("megatron.core")
    from megatron_oracle import megatron_param_shapes

    return megatron_param_shapes


def _check_rank(oracle_rank, job, rank):
    lay, spec = job.trainer, job.model
    cat = catalog(spec)
    locals_ = trainer_locals(spec, cat, lay, rank)
    ours = {t.name: tuple(t.shape) for t in locals_}
    theirs, their_layers = oracle_rank(megatron_cfg(spec), tp=lay.tp, pp=lay.pp, ep=lay.ep, etp=lay.etp, cp=lay.cp,
                                       dp=lay.dp, order=lay.order, rank=rank, pp_first_stage_layers=lay.first_stage_layers,
                                       pp_last_stage_layers=lay.last_stage_layers, vpp=lay.vpp)
    theirs = {k: tuple(v) for k, v in theirs.items()}
    assert ours == theirs, (
        f"rank {rank}: only ours {sorted(set(ours) - set(theirs))[:5]}, only megatron "
        f"{sorted(set(theirs) - set(ours))[:5]}, shape diffs "
        f"{[(k, ours[k], theirs[k]) for k in set(ours) & set(theirs) if ours[k] != theirs[k]][:5]}"
    )
    # the global layers of every chunk: Megatron's layer_number, the layout's split, and the pieces agree
    assert [list(r) for r in trainer_chunk_layers(spec, lay, rank)] == their_layers, rank
    held: dict[tuple[str, int], set[int]] = {}
    for t in locals_:
        m = re.match(r"(model\d+\.)?decoder\.layers\.(\d+)\.", t.name)
        if m:
            for p in t.pieces:
                g = re.match(r"model\.layers\.(\d+)\.", cat.tensors[p.tensor].name)
                held.setdefault((m.group(1) or "", int(m.group(2))), set()).add(int(g.group(1)))
    want = {((f"model{v}." if lay.vpp > 1 else ""), j): {i} for v, layers in enumerate(their_layers)
            for j, i in enumerate(layers)}
    assert held == want, rank


@pytest.fixture(scope="module")
def oracle_rank():
    pytest.importorskip("megatron.core")
    from megatron_oracle import megatron_rank

    return megatron_rank


@pytest.mark.parametrize("preset,trainer", CASES)
def test_trainer_names_and_shapes_match_megatron(oracle_rank, preset, trainer):
    job = JobSpec.from_dict(dict(model=dict(preset=preset), trainer=trainer, inference=dict(tp=1)))
    for rank in range(job.trainer.world_size):
        _check_rank(oracle_rank, job, rank)


@pytest.mark.parametrize("model,trainer", VPP_CASES)
def test_virtual_pipeline_chunks_match_megatron(oracle_rank, model, trainer):
    job = JobSpec.from_dict(dict(model=model, trainer=trainer, inference=dict(tp=1)))
    for rank in range(job.trainer.world_size):
        _check_rank(oracle_rank, job, rank)


def test_megatron_param_shapes_still_answers_names_and_shapes(oracle):
    spec = JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=dict(tp=1), inference=dict(tp=1))).model
    shapes = oracle(megatron_cfg(spec), tp=1, pp=2, ep=1, etp=1, cp=1, dp=1, order="tp-cp-ep-dp-pp", rank=0, vpp=2)
    assert "model0.embedding.word_embeddings.weight" in shapes and "model1.decoder.layers.0.mlp.linear_fc2.weight" in shapes
    assert not any(k.startswith("model1.embedding") or "output_layer" in k for k in shapes)
