"""The vLLM adapter's name mapping and rank set-up, without vLLM (it cannot run here)."""

from __future__ import annotations

import itertools

import pytest
import torch

from planners import JobSpec, build_plan
from sync.endpoints import check_locals
from sync.engines.vllm import ParamTarget, engine_global_rank, map_parameter_names
from sync.tensors import TORCH_DTYPES

JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
           inference=dict(tp=2, dp=2, enable_ep=True, engines=2), eplb=dict(num_redundant_experts=4))


def fake_vllm_model(plan, rank, routed: bool) -> torch.nn.Module:
    """A module whose parameters are named and shaped as vLLM's would be for this rank."""
    model = torch.nn.Module()
    for i in plan.locals_of(rank):
        name = plan.local_name[i]
        if routed:
            name = name.replace(".experts.w13_weight", ".experts.routed_experts.w13_weight")
            name = name.replace(".experts.w2_weight", ".experts.routed_experts.w2_weight")
        parent = model
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.register_parameter(leaf, torch.nn.Parameter(
            torch.zeros(plan.local_shape[i], dtype=TORCH_DTYPES[plan.local_dtype[i]]), requires_grad=False))
    return model


@pytest.mark.parametrize("routed", [False, True])
def test_targets_map_onto_vllm_parameters_of_either_naming(routed):
    plan = build_plan(JobSpec.from_dict(JOB))
    rank = plan.num_trainer + 3
    target = ParamTarget(plan, rank, fake_vllm_model(plan, rank, routed))
    check_locals(plan, rank, target.local_tensors(), "target")
    assert any("routed_experts" in v for v in target.names.values()) == routed


def test_missing_parameters_are_listed():
    with pytest.raises(KeyError, match="model.layers.0.mlp.experts.w2_weight"):
        map_parameter_names(["model.layers.0.mlp.experts.w2_weight"], ["model.layers.0.mlp.gate.weight"])


def test_global_ranks_follow_vllm_order():
    job = JobSpec.from_dict(JOB)
    lay, T = job.inference, job.trainer.world_size
    seen = set()
    for engine, dp, tp in itertools.product(range(2), range(2), range(2)):
        rank = engine_global_rank(T, lay, engine, dp, 0, tp)
        c = lay.coords(rank - T)
        assert (c.engine, c.dp, c.pp, c.tp) == (engine, dp, 0, tp)
        seen.add(rank)
    assert seen == set(range(T, T + lay.world_size))
