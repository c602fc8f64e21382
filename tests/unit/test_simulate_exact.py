"""simulate() is bit-exact against direct slicing for hand-picked layout pairs of every family."""

from __future__ import annotations

import pytest

from planners import JobSpec

CASES = [
    # (preset, trainer, inference, deployment)
    ("tiny_llama", dict(tp=2, pp=2), dict(tp=4), {}),
    ("tiny_llama", dict(tp=1, pp=4), dict(tp=1), {}),  # PP 4 -> 1
    ("tiny_llama", dict(tp=2, pp=1), dict(tp=8), {}),  # 2 -> 8, GQA with tp > kv heads
    ("tiny_llama", dict(tp=1, pp=1, dp=2), dict(tp=2, pp=2), {}),  # PP 1 -> 2
    ("tiny_qwen3", dict(tp=2, pp=2), dict(tp=2, pp=2, engines=2), {}),  # tied embeddings under PP
    ("tiny_qwen3", dict(tp=1, pp=1, dp=4), dict(tp=4), dict(mode="colocated", gpus_per_node=4)),
    ("tiny_qwen3_moe", dict(tp=2, pp=2, ep=2), dict(tp=2, dp=2, enable_ep=True, engines=2), {}),
    ("tiny_qwen3_moe", dict(tp=2, ep=4, etp=1), dict(tp=2, dp=2), {}),  # EP off: experts over dp*tp
    ("tiny_qwen3_moe", dict(tp=2, pp=1, ep=2, etp=2), dict(tp=4, enable_ep=True), dict(mode="colocated", gpus_per_node=2)),
    ("tiny_mixtral", dict(tp=2, pp=2, ep=2), dict(tp=4, enable_ep=True), {}),
    ("tiny_deepseek_v3", dict(tp=2, pp=3, ep=4, etp=1), dict(tp=2, dp=2, enable_ep=True), {}),
    ("tiny_deepseek_v3", dict(tp=4, pp=1, ep=2), dict(tp=2, pp=3), dict(gpus_per_node=4)),
    # GLM-4.5 MoE: GQA with q/k/v biases and q/k norms, a dense first layer, DeepSeek-style MoE
    ("tiny_glm4_moe", dict(tp=2, pp=3, ep=2), dict(tp=2, dp=2, enable_ep=True), {}),
    ("tiny_glm4_moe", dict(tp=2, ep=4, etp=1), dict(tp=8), {}),  # tp > kv heads; experts over dp*tp without EP
    ("tiny_glm4_moe", dict(tp=1, dp=4, ep=2), dict(tp=2, dp=2, enable_ep=True), dict(mode="colocated", gpus_per_node=4)),
    ("tiny_glm4_moe", dict(tp=2, pp=1, ep=2), dict(tp=1, pp=2, engines=2), {}),  # engine PP: first/last stage io
]


@pytest.mark.parametrize("preset,trainer,inference,deployment", CASES)
def test_simulate_matches_direct_slicing(exact, preset, trainer, inference, deployment):
    job = JobSpec.from_dict(dict(model=dict(preset=preset), trainer=trainer, inference=inference, deployment=deployment))
    exact(job)


def test_tp3_to_tp2():
    from conftest import assert_plan_exact

    cfg = dict(model_type="llama", hidden_size=48, num_hidden_layers=2, num_attention_heads=6,
               num_key_value_heads=6, head_dim=8, vocab_size=200, intermediate_size=96)
    job = JobSpec.from_dict(dict(model=dict(hf_config=cfg), trainer=dict(tp=3), inference=dict(tp=2, dp=3)))
    assert_plan_exact(job)


def test_redundant_experts_fill_every_slot(exact):
    job = JobSpec.from_dict(dict(
        model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
        inference=dict(tp=2, dp=2, enable_ep=True, engines=2), eplb=dict(num_redundant_experts=4)))
    plan = exact(job)
    # a redundant slot's expert crosses the trainer boundary once per receiving group, then fans out
    assert plan.bytes_by_stage()[2] > 0
