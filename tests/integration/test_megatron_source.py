"""megatron-core GPTModels as trainer sources: real models on CPU under gloo, synced bit-exactly."""

from __future__ import annotations

import numpy as np
import pytest

from expected import expected_engine
from planners import JobSpec, build_plan
from planners.sides.megatron import trainer_locals
from planners.models import catalog
from sync.ends.base import EndpointError, check_locals, fill_from_full
from sync.run.local import LocalRun, run_local
from sync.ends.megatron import MegatronSource, local_name
from sync.tensors import TORCH_DTYPES

pytest.importorskip("megatron.core")

CASES = {
    "moe_tp2_ep2_to_ep_engine": dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                                     inference=dict(tp=2, dp=2, enable_ep=True), eplb=dict(num_redundant_experts=4)),
    # GLM-4.5 MoE: the router weight is bfloat16 in the trainer and float32 in the engine (cast on the way)
    "glm4_moe_tp2_ep2_to_ep_engine": dict(model=dict(preset="tiny_glm4_moe"), trainer=dict(tp=2, ep=2),
                                          inference=dict(tp=2, dp=2, enable_ep=True), eplb=dict(num_redundant_experts=4)),
    "dense_pp2_to_tp2": dict(model=dict(preset="tiny_qwen3"), trainer=dict(tp=1, pp=2), inference=dict(tp=2)),
    # virtual pipeline: each trainer rank builds its 2 model chunks (tied embeddings: chunk 0 of rank 0 and
    # chunk 1 of rank 1), MegatronSource reads the list
    "dense_pp2_vpp2_to_tp2": dict(model=dict(preset="tiny_qwen3"), trainer=dict(tp=1, pp=2, vpp=2),
                                  inference=dict(tp=2)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_megatron_models_sync_bit_exactly(name):
    job = JobSpec.from_dict(CASES[name])
    plan = build_plan(job).validate()
    versions = [1, 2]  # weights reloaded into the model between syncs
    results, _ = run_local(plan, LocalRun(versions=versions, timeout_s=60, return_tensors=True, source="megatron",
                                          job=job, bucket_bytes=64 << 10))
    # Megatron keeps the router weight in the model's dtype; where the engine holds it wider (GLM-4.5's
    # float32 gate) the trainer's rounded values are what arrive
    narrower = {t.name: TORCH_DTYPES[job.model.dtype] for t in plan.tensors
                if t.name.endswith("mlp.gate.weight") and t.dtype != job.model.dtype}
    for i, version in enumerate(versions):
        for rank, tensors in expected_engine(job, plan, version, held_as=narrower).items():
            for tname, w in tensors.items():
                np.testing.assert_array_equal(results[rank]["tensors"][i][tname], w, err_msg=f"{rank} {tname}")
    assert all(s.verified for r in results.values() for s in r["stats"]["plan"])


def test_names_from_transformer_engine_and_wrappers():
    assert local_name("module.module.decoder.layers.0.self_attention.linear_qkv.layer_norm_weight") == \
        "decoder.layers.0.input_layernorm.weight"
    assert local_name("decoder.layers.1.mlp.linear_fc1.layer_norm_weight") == "decoder.layers.1.pre_mlp_layernorm.weight"
    assert local_name("decoder.layers.2.mlp.experts.linear_fc2.weight7") == \
        "decoder.layers.2.mlp.experts.local_experts.7.linear_fc2.weight"


def test_a_model_built_for_another_layout_is_refused_before_any_transfer():
    """The model holds TP2 shards, the job says TP1: the source check names the mismatching tensors."""
    import torch

    tp2 = JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=dict(tp=2), inference=dict(tp=2)))
    tp1 = build_plan(JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=dict(tp=1), inference=dict(tp=2))))
    model_tensors = {t.name: torch.zeros(t.shape, dtype=torch.bfloat16)
                     for t in trainer_locals(tp2.model, catalog(tp2.model), tp2.trainer, 0)}
    with pytest.raises(EndpointError, match=r"linear_qkv.weight: shape \(48, 64\), plan expects \(96, 64\)"):
        check_locals(tp1, 0, model_tensors, "source")
    with pytest.raises(EndpointError, match=r"linear_qkv.weight: shape"):  # loading weights into it: the same check
        fill_from_full(tp1, 0, model_tensors, lambda tid: torch.zeros(tp1.tensors[tid].shape))


def _module(*names):
    import torch

    m = torch.nn.Module()
    for i, name in enumerate(names):
        parent = m
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(leaf, torch.nn.Parameter(torch.full((2,), float(i))))
    return m


def test_model_chunks_get_their_prefix_and_are_read_in_place():
    a, b = _module("decoder.layers.0.input_layernorm.weight"), _module("decoder.layers.0.input_layernorm.weight")
    for src in (MegatronSource([a, b]), MegatronSource(a, b)):
        got = src.local_tensors()
        assert sorted(got) == ["model0.decoder.layers.0.input_layernorm.weight",
                               "model1.decoder.layers.0.input_layernorm.weight"]
        assert got["model1.decoder.layers.0.input_layernorm.weight"].data_ptr() == \
            dict(b.named_parameters())["decoder.layers.0.input_layernorm.weight"].data_ptr()
    # one model, or Megatron's list of one: no prefix
    assert sorted(MegatronSource([a]).local_tensors()) == sorted(MegatronSource(a).local_tensors()) == \
        ["decoder.layers.0.input_layernorm.weight"]


def test_two_parameters_with_one_plan_name_are_refused():
    """A Transformer Engine norm fused into linear_qkv and a separate input_layernorm both map to one name."""
    m = _module("decoder.layers.0.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.0.input_layernorm.weight")
    with pytest.raises(ValueError, match=r"input_layernorm.weight.*layer_norm_weight.*both map to "
                                         r"'decoder.layers.0.input_layernorm.weight'"):
        MegatronSource(m).local_tensors()
    with pytest.raises(ValueError, match=r"of chunk 1 .* of chunk 1 both map to 'model1.decoder.layers.0"):
        MegatronSource([_module("decoder.layers.0.input_layernorm.weight"), m]).local_tensors()


def test_chunks_out_of_virtual_stage_order_are_refused():
    a, b = _module("embedding.word_embeddings.weight"), _module("decoder.final_layernorm.weight")
    a.vp_stage, b.vp_stage = 0, 1
    with pytest.raises(ValueError, match=r"chunk 0 was built for vp_stage=1"):
        MegatronSource([b, a])
    wrapped = _module("x")
    wrapped.module = b  # DDP / Float16Module wrapper
    MegatronSource([a, wrapped])
