"""End to end: megatron-core trainers -> sync -> reference engines; logits equal Hugging Face's.

A tiny random model from transformers (CPU, fp32, no download) gives the weights, the expected
logits and its ``config.json`` (written by transformers, read by the job as a real checkpoint's
would be: ``model: {config: dir}``); trainer ranks load the same weights into megatron-core
GPTModels, the plan executor moves them into reference engines (TP, EP with redundant experts and an
EPLB placement), and the engines' forward pass must match HF within 1e-4 -- over two syncs, the
weights perturbed in between.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planners import JobSpec, build_plan
from planners.eplb.stats import synthetic_load
from sync.run.local import LocalRun, run_local

transformers = pytest.importorskip("transformers")
pytest.importorskip("megatron.core")

SHAPE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=128,
             tie_word_embeddings=False)
MOE = dict(moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
           decoder_sparse_step=1, mlp_only_layers=[])
# GLM-4.5 MoE: q/k/v biases, q/k norms, RoPE on half of each head, a dense first layer, then a sigmoid
# router with correction bias choosing top-2 within the best of 2 expert groups, a routing scale,
# a shared expert
GLM = dict(SHAPE, num_hidden_layers=3, first_k_dense_replace=1, moe_intermediate_size=32, n_routed_experts=8,
           n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
           norm_topk_prob=True, use_qk_norm=True, attention_bias=True, partial_rotary_factor=0.5)
MODELS = {
    "qwen3": lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**SHAPE)),
    "qwen3_moe": lambda: transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**SHAPE, **MOE)),
    "glm4_moe": lambda: transformers.Glm4MoeForCausalLM(transformers.Glm4MoeConfig(**GLM)),
}


def hf_model(family: str):
    torch.manual_seed(0)
    model = MODELS[family]()
    with torch.no_grad():  # HF leaves norms at 1, the router and its bias at 0: make every weight matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model.float().eval()


def per_expert(model) -> dict[str, np.ndarray]:
    """The state dict with per-expert names, as checkpoints store it."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.detach().float().numpy().copy()  # the model is perturbed in place later
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            half = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :half]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, half:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def perturb(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.add_(torch.randn(b.shape, generator=g) * 0.02)


CASES = {
    "moe_tp2ep2_to_tp2dp2_ep_eplb": ("qwen3_moe", dict(tp=2, ep=2), dict(tp=2, dp=2, enable_ep=True),
                                     dict(enabled=True, num_redundant_experts=4)),
    "dense_pp2_to_tp2": ("qwen3", dict(tp=1, pp=2), dict(tp=2), {}),
    "dense_pp2_to_tp1": ("qwen3", dict(tp=1, pp=2), dict(tp=1), {}),
    "glm4_moe_tp2ep2_to_tp2dp2_ep_eplb": ("glm4_moe", dict(tp=2, ep=2), dict(tp=2, dp=2, enable_ep=True),
                                          dict(enabled=True, num_redundant_experts=4)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_logits_match_hugging_face(name, tmp_path):
    family, trainer, inference, eplb = CASES[name]
    model = hf_model(family)
    model.config.to_json_file(tmp_path / "config.json")  # as a checkpoint holds it (transformers 5's spellings)
    job = JobSpec.from_dict(dict(model=dict(config=str(tmp_path), overrides=dict(torch_dtype="float32")),
                                 trainer=trainer, inference=inference, eplb=eplb))
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=5) if eplb else None
    plan = build_plan(job, load).validate()
    if eplb:
        assert plan.placement.logcnt.max() > 1  # hot experts replicated, placement not the initial one
    tokens = [3, 17, 200, 45, 45, 9, 250, 128, 77, 1]
    weights, expected = [], []
    for _ in range(2):
        weights.append(per_expert(model))
        with torch.no_grad():
            expected.append(model(torch.tensor([tokens])).logits[0].numpy())
        perturb(model)
    results, _ = run_local(plan, LocalRun(versions=[1, 2], timeout_s=90, source="megatron", engine="reference",
                                          job=job, full_weights=weights, tokens=tokens))
    for rank in plan.inference_ranks:
        for i in range(2):
            np.testing.assert_allclose(results[rank]["logits"][i], expected[i], atol=1e-4, rtol=0,
                                       err_msg=f"rank {rank} sync {i + 1}")
        assert all(s.verified for s in results[rank]["stats"]["plan"])
    if eplb:  # the engines counted tokens per physical slot: every routed token landed in one slot
        counts = results[plan.num_trainer]["slot_counts"]
        assert counts.sum() == len(tokens) * job.model.moe.top_k * len(job.model.moe_layers)


FP8_SHAPE = dict(SHAPE, hidden_size=256, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=128)  # every sharded dimension in whole 128 x 128 blocks
FP8_MOE = dict(MOE, moe_intermediate_size=128)


def dequantized_weights(job, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The weights an FP8 engine computes with: the reference quantizer's values times their block scales."""
    from planners.models import catalog
    from planners.quant import BLOCK, quantized_ids, reference_quantize

    out = dict(weights)
    cat = catalog(job.model)
    for i in quantized_ids(job.model, cat):
        name = cat.tensors[i].name
        bits, scale = reference_quantize(weights[name])
        values = torch.from_numpy(bits).view(torch.float8_e4m3fn).float().numpy()
        rows, cols = values.shape
        out[name] = values * np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:rows, :cols]
    return out


def load_per_expert(model, weights: dict[str, np.ndarray]) -> None:
    """The inverse of :func:`per_expert`: write per-expert (checkpoint) weights into the model."""
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("mlp.experts.gate_up_proj"):
                prefix = name[: -len("gate_up_proj")]
                p.copy_(torch.from_numpy(np.stack([np.concatenate([weights[f"{prefix}{e}.gate_proj.weight"],
                                                                   weights[f"{prefix}{e}.up_proj.weight"]])
                                                   for e in range(p.shape[0])])))
            elif name.endswith("mlp.experts.down_proj"):
                prefix = name[: -len("down_proj")]
                p.copy_(torch.from_numpy(np.stack([weights[f"{prefix}{e}.down_proj.weight"] for e in range(p.shape[0])])))
            else:
                p.copy_(torch.from_numpy(weights[name]))


def test_fp8_engine_logits_match_hugging_face_holding_the_dequantized_weights(tmp_path):
    """Megatron-core trainers (float32) quantize their own slices to block FP8, reference engines compute
    with the FP8 weights dequantized per block: their logits equal Hugging Face's with those weights."""
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**FP8_SHAPE, **FP8_MOE))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1 + (1.0 if p.ndim == 1 else 0.0))
    model = model.float().eval()
    model.config.to_json_file(tmp_path / "config.json")
    job = JobSpec.from_dict(dict(model=dict(config=str(tmp_path), overrides=dict(torch_dtype="float32")),
                                 trainer=dict(tp=2, ep=2, etp=1),
                                 inference=dict(tp=2, dp=2, enable_ep=True, quantization="fp8_block"),
                                 eplb=dict(enabled=True, num_redundant_experts=4)))
    plan = build_plan(job, synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=5)).validate()
    tokens = [3, 17, 200, 45, 45, 9, 250, 128, 77, 1]
    weights = per_expert(model)
    load_per_expert(model, dequantized_weights(job, weights))
    with torch.no_grad():
        expected = model(torch.tensor([tokens])).logits[0].numpy()
    results, _ = run_local(plan, LocalRun(versions=[1], timeout_s=90, source="megatron", engine="reference",
                                          job=job, full_weights=[weights], tokens=tokens))
    for rank in plan.inference_ranks:
        np.testing.assert_allclose(results[rank]["logits"][0], expected, atol=1e-4, rtol=0, err_msg=f"rank {rank}")
        assert all(s.verified for s in results[rank]["stats"]["plan"])
    # and FP8 matters: the full-precision weights give other logits
    load_per_expert(model, weights)
    with torch.no_grad():
        assert np.abs(model(torch.tensor([tokens])).logits[0].numpy() - expected).max() > 1e-3
