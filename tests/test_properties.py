"""Properties over random models and layout pairs: plans validate and simulate bit-exactly."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from conftest import assert_plan_exact
from planners import JobError, JobSpec, SyncPlan, build_plan

FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3"]


@st.composite
def jobs(draw):
    """Layouts first, then a model whose shapes mostly divide over them (the rest are rejected)."""
    t_tp, t_pp = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 3]))
    i_tp, i_pp = draw(st.sampled_from([1, 2, 3, 4, 6, 8])), draw(st.sampled_from([1, 2, 3]))
    family = draw(st.sampled_from(FAMILIES))
    heads = 24
    kv_ok = [d for d in (1, 2, 3, 4, 6, 8, 12, 24) if d % t_tp == 0 and (d % i_tp == 0 if i_tp < d else i_tp % d == 0)]
    assume(kv_ok)
    cfg = dict(model_type=family, num_hidden_layers=t_pp * draw(st.integers(1, 2)), num_attention_heads=heads,
               num_key_value_heads=draw(st.sampled_from(kv_ok)), head_dim=draw(st.sampled_from([1, 2])),
               hidden_size=draw(st.sampled_from([8, 12])), vocab_size=draw(st.integers(40, 384)),
               intermediate_size=48, tie_word_embeddings=draw(st.booleans()), torch_dtype="float32")
    experts = draw(st.sampled_from([4, 6, 8, 12]))
    if family == "qwen3_moe":
        cfg.update(num_experts=experts, moe_intermediate_size=48, decoder_sparse_step=draw(st.sampled_from([1, 2])),
                   num_experts_per_tok=2)
    if family == "mixtral":
        cfg.update(num_local_experts=experts, intermediate_size=48, num_experts_per_tok=2)
    if family == "deepseek_v3":
        cfg.update(n_routed_experts=experts, moe_intermediate_size=48, n_shared_experts=draw(st.sampled_from([0, 1, 2])),
                   first_k_dense_replace=draw(st.integers(0, 2)), q_lora_rank=draw(st.sampled_from([None, 12])),
                   kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, num_experts_per_tok=2)
    trainer = dict(tp=t_tp, pp=t_pp, ep=draw(st.sampled_from([1, 2, 3, 4])), cp=draw(st.sampled_from([1, 1, 2])))
    trainer["etp"] = draw(st.sampled_from([1, t_tp]))
    inference = dict(tp=i_tp, pp=i_pp, dp=draw(st.sampled_from([1, 2])), enable_ep=draw(st.booleans()),
                     engines=draw(st.sampled_from([1, 2])))
    deployment = dict(mode=draw(st.sampled_from(["disaggregated", "colocated"])),
                      gpus_per_node=draw(st.sampled_from([2, 4, 8])))
    eplb = dict(num_redundant_experts=draw(st.sampled_from([0, 0, 2, 4])))
    spec = dict(model=dict(hf_config=cfg), trainer=trainer, inference=inference, deployment=deployment, eplb=eplb)
    try:
        job = JobSpec.from_dict(spec)
    except JobError:
        assume(False)
    assume(job.trainer.world_size <= 32 and job.inference.world_size <= 32)
    return job


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs(), st.integers(0, 2**16))
def test_random_layouts_validate_and_simulate_exactly(job, seed):
    m, t, i = job.model, job.trainer, job.inference
    event(f"family {m.family}")
    event(f"deployment {job.deployment.mode}")
    event(f"inference EP {i.enable_ep}, redundant {job.eplb.num_redundant_experts > 0}")
    event(f"TP {t.tp}->{i.tp}, PP {t.pp}->{i.pp}")
    if not m.is_mla and i.tp > m.num_kv_heads:
        event("kv heads replicated (tp > kv heads)")
    assert_plan_exact(job, seed)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs())
def test_plans_round_trip_and_respect_the_bound(job):
    plan = build_plan(job)
    again = SyncPlan.from_dict(plan.to_dict())
    assert np.array_equal(again.chunks, plan.chunks) and np.array_equal(again.pieces, plan.pieces)
    assert again.local_name == plan.local_name and again.tensors == plan.tensors
    again.validate()
    assert plan.predicted_time() >= plan.lower_bound() * (1 - 1e-9)
    # every stage-1 sender is a trainer rank, no network pair shares a GPU
    s1 = plan.chunks[plan.chunks["stage"] == 1]
    assert (s1["src"] < plan.num_trainer).all()
    net = plan.chunks[plan.chunks["link"] != 0]
    assert (plan.devices[net["src"]] != plan.devices[net["dst"]]).all()
