"""What vLLM's own model classes and weight loaders put on every rank is what the plan writes there.

For each layout, every rank of one engine is built by vLLM (``engine_ranks``) and loaded from seeded
Hugging Face weights; ``plan.simulate`` of the same weights must hold the same bytes under the same
names on every rank (vLLM's extra parameter names, such as ``routed_experts``, mapped as the adapter maps
them), and vLLM must hold nothing the plan does not write."""

from __future__ import annotations

import vllm_cpu  # noqa: F401  (first: vLLM's platform)

import re
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine_ranks import build_engine
from planners import JobError, JobSpec, build_plan
from planners.layouts import InferenceLayout
from planners.models import preset, spec_from_config
from sync.ends.vllm import map_parameter_names
from sync.tensors import TORCH_DTYPES, as_bits, simulate_tensors

CASES = {
    "llama_tp2": dict(model=dict(preset="tiny_llama"), inference=dict(tp=2)),
    "qwen3_tied_tp2_pp2": dict(model=dict(preset="tiny_qwen3"), inference=dict(tp=2, pp=2)),
    "qwen3_tp4_kv_replicated": dict(model=dict(preset="tiny_qwen3"), inference=dict(tp=4)),
    "qwen3_moe_tp2": dict(model=dict(preset="tiny_qwen3_moe"), inference=dict(tp=2)),
    "qwen3_moe_tp2_dp2_experts_over_dp_tp": dict(model=dict(preset="tiny_qwen3_moe"), inference=dict(tp=2, dp=2)),
    "qwen3_moe_tp2_ep": dict(model=dict(preset="tiny_qwen3_moe"), inference=dict(tp=2, enable_ep=True)),
    "qwen3_moe_tp2_dp2_ep_redundant": dict(model=dict(preset="tiny_qwen3_moe"), inference=dict(tp=2, dp=2, enable_ep=True),
                                           eplb=dict(num_redundant_experts=4)),
    "qwen3_moe_pp2": dict(model=dict(preset="tiny_qwen3_moe"), inference=dict(tp=1, pp=2)),
    "mixtral_tp2_ep": dict(model=dict(preset="tiny_mixtral"), inference=dict(tp=2, enable_ep=True)),
    "deepseek_v3_tp2_ep": dict(model=dict(preset="tiny_deepseek_v3"), inference=dict(tp=2, enable_ep=True)),
    "glm4_moe_tp2_ep": dict(model=dict(preset="tiny_glm4_moe"), inference=dict(tp=2, enable_ep=True)),
    "glm4_moe_pp2": dict(model=dict(preset="tiny_glm4_moe"), inference=dict(tp=1, pp=2)),
}


def seeded_weights(plan, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    return {t.name: torch.from_numpy(rng.standard_normal(t.shape, dtype=np.float32)).to(TORCH_DTYPES[t.dtype])
            for t in plan.tensors}


@pytest.mark.parametrize("name", sorted(CASES))
def test_vllm_loads_what_the_plan_writes(name, tmp_path):
    case = CASES[name]
    # vLLM's CPU platform runs bfloat16 models in float32 where the CPU lacks bf16 instructions: float32 here
    model = dict(case["model"], overrides=dict(torch_dtype="float32"))
    job = JobSpec.from_dict(dict(trainer=dict(tp=1), **{**case, "model": model}))
    plan = build_plan(job)
    weights = seeded_weights(plan)
    want = simulate_tensors(plan, weights)
    got = build_engine(job, weights, tmp_path)
    for rank, params in got.items():
        ours = want[plan.num_trainer + rank]
        names = map_parameter_names(list(ours), list(params))
        assert set(params) == set(names.values()), f"rank {rank}: vLLM holds more: {set(params) - set(names.values())}"
        for plan_name, vllm_name in names.items():
            have, expect = params[vllm_name], ours[plan_name]
            assert tuple(have.shape) == tuple(expect.shape) and have.dtype == expect.dtype, (rank, plan_name)
            assert torch.equal(as_bits(have), as_bits(expect)), f"rank {rank}: {plan_name} differs"


@pytest.mark.parametrize("model,inference,vllm_says", [
    (dict(preset="tiny_glm4_moe"), dict(tp=1, pp=3), "No Glm4MoE layer found"),  # stage 0: the dense layer alone
    (dict(preset="tiny_qwen3_moe", overrides=dict(num_experts=2)), dict(tp=4), "is greater than the number of experts"),
])
def test_layouts_vllm_refuses_are_refused_before_planning(model, inference, vllm_says, tmp_path):
    model = dict(model, overrides=dict(model.get("overrides", {}), torch_dtype="float32"))
    with pytest.raises(JobError, match="vLLM's .* model refuses"):
        JobSpec.from_dict(dict(model=model, trainer=dict(tp=1), inference=inference))
    # and vLLM itself refuses them: the job as it would be without the planner's check
    unchecked = SimpleNamespace(model=spec_from_config(preset(model["preset"]), overrides=model["overrides"]),
                                inference=InferenceLayout(**inference), eplb=SimpleNamespace(num_redundant_experts=0))
    with pytest.raises(RuntimeError, match=vllm_says):
        build_engine(unchecked, {}, tmp_path)



FP8_CHECKPOINT = dict(quant_method="fp8", fmt="e4m3", activation_scheme="dynamic", weight_block_size=[128, 128])


@pytest.mark.parametrize("name", ["moe ep eplb", "dense tp2pp2 -> tp2"])
def test_vllm_block_fp8_loads_what_the_fp8_plan_writes(name, tmp_path):
    """A block-FP8 checkpoint (the reference quantizer's values and scales) loaded by vLLM's own FP8 classes
    holds, on every rank and under every name, exactly what the FP8 plan writes there: FP8 weights and
    their weight_scale_inv, shapes and bytes."""
    from fp8_cases import CASES as FP8_CASES
    from planners.quant import FP8_SUFFIX, is_derived_tensor, reference_quantize

    case = FP8_CASES[name]
    model = dict(hf_config=dict(case["model"]["hf_config"], torch_dtype="bfloat16"))  # vLLM: fp8 needs a 16-bit dtype
    job = JobSpec.from_dict({**case, "model": model, "trainer": dict(tp=1)})
    plan = build_plan(job)
    rng = np.random.default_rng(0)
    bf16 = lambda a: torch.from_numpy(a).to(torch.bfloat16).float().numpy()  # noqa: E731  (values bfloat16 holds)
    full = {t.name: bf16(rng.standard_normal(t.shape, dtype=np.float32)) for t in plan.tensors
            if not is_derived_tensor(t.name)}
    checkpoint = {}
    for t in plan.tensors:
        if t.name.endswith(FP8_SUFFIX):
            weight = t.name[: -len(FP8_SUFFIX)]
            bits, scale = reference_quantize(full[weight])
            checkpoint[weight] = torch.from_numpy(bits).view(torch.float8_e4m3fn)
            checkpoint[weight + "_scale_inv"] = torch.from_numpy(scale)
    checkpoint = {**{k: torch.from_numpy(v).to(torch.bfloat16) for k, v in full.items() if k not in checkpoint},
                  **checkpoint}
    want = plan.simulate(full)
    got = build_engine(job, checkpoint, tmp_path, quantization_config=FP8_CHECKPOINT)
    for rank, params in got.items():
        global_rank = plan.num_trainer + rank
        ours = {plan.local_name[i]: i for i in plan.locals_of(global_rank) if ":" not in plan.local_name[i]}
        names = map_parameter_names(list(ours), list(params))
        # the attention's KV-cache (and query) scales are no weights: the sync leaves them alone
        weights = {n for n in params if not re.search(r"\.attn\.(k|v|q|prob)_scale$", n)}
        assert weights == set(names.values()), f"rank {rank}: vLLM holds more: {weights - set(names.values())}"
        for plan_name, vllm_name in names.items():
            have, expect = params[vllm_name], want[global_rank][plan_name]
            assert tuple(have.shape) == tuple(expect.shape), (rank, plan_name, tuple(have.shape), expect.shape)
            if plan.local_dtype[ours[plan_name]] in ("float8_e4m3fn", "float32"):  # FP8 weights and their scales
                # (the rest vLLM's CPU platform may hold wider than the model's bfloat16: compared as values)
                assert str(have.dtype).removeprefix("torch.") == plan.local_dtype[ours[plan_name]], (rank, plan_name)
            have_values = have.view(torch.uint8) if have.dtype == torch.float8_e4m3fn else have.float()
            np.testing.assert_array_equal(have_values.numpy(), expect, err_msg=f"rank {rank} {plan_name}")
