"""Hypothesis strategies: random models and layout pairs whose shapes mostly divide (the rest are rejected)."""

from __future__ import annotations

from math import gcd

from hypothesis import assume
from hypothesis import strategies as st

from planners import JobError, JobSpec

FAMILIES = ["llama", "qwen2", "qwen3", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe"]
MOE_FAMILIES = ["qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe"]


@st.composite
def specs(draw):
    """Layouts first, then a model whose shapes mostly divide over them (the rest are rejected)."""
    t_tp, t_pp = draw(st.sampled_from([1, 2, 3, 4])), draw(st.sampled_from([1, 2, 3, 4]))
    i_tp, i_pp = draw(st.sampled_from([1, 2, 3, 4, 6, 8])), draw(st.sampled_from([1, 2, 3]))
    family = draw(st.sampled_from(FAMILIES + MOE_FAMILIES))  # MoE families twice: EP and EPLB cases
    heads = 24
    kv_ok = [d for d in (1, 2, 3, 4, 6, 8, 12, 24) if d % t_tp == 0 and (d % i_tp == 0 if i_tp < d else i_tp % d == 0)]
    assume(kv_ok)
    replicated = [d for d in kv_ok if d < i_tp]  # GQA with KV heads replicated over the engine's TP group
    kv = draw(st.sampled_from(replicated if replicated and draw(st.booleans()) else kv_ok))
    # vLLM pads the vocabulary to a multiple of 64, then splits it over TP: TP 3 and 6 need 192 or 384 rows
    vocab = st.integers(40, 384) if 64 % i_tp == 0 else st.integers(129, 192) | st.integers(321, 384)
    at_least = -(-i_pp // t_pp)  # every inference stage gets a layer
    cfg = dict(model_type=family, num_hidden_layers=t_pp * draw(st.integers(at_least, at_least + 1)),
               num_attention_heads=heads, num_key_value_heads=kv, head_dim=draw(st.sampled_from([1, 2])),
               hidden_size=draw(st.sampled_from([8, 12])), vocab_size=draw(vocab),
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
                   kv_lora_rank=8, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4, num_experts_per_tok=2,
                   n_group=1, topk_group=1)
    if family == "glm4_moe":
        cfg.update(n_routed_experts=experts, moe_intermediate_size=48, n_shared_experts=draw(st.sampled_from([0, 1, 2])),
                   first_k_dense_replace=draw(st.integers(0, 2)), attention_bias=draw(st.booleans()),
                   use_qk_norm=draw(st.booleans()), num_experts_per_tok=2, n_group=1, topk_group=1)
    moe = family in MOE_FAMILIES
    ep = draw(st.sampled_from([e for e in (1, 2, 3, 4) if experts % e == 0])) if moe else 1
    trainer = dict(tp=t_tp, pp=t_pp, ep=ep, cp=draw(st.sampled_from([1, 1, 2] if t_tp * t_pp <= 8 else [1])))
    trainer["etp"] = draw(st.sampled_from([1, t_tp]))
    # at most 32 ranks a side (larger layouts add time, not cases)
    dp = draw(st.sampled_from([1, 2] if i_tp * i_pp <= 16 else [1]))
    engines = draw(st.sampled_from([1, 2] if i_tp * i_pp * dp <= 16 else [1]))
    inference = dict(tp=i_tp, pp=i_pp, dp=dp, enable_ep=moe and draw(st.sampled_from([True, True, False])),
                     engines=engines)
    # colocated only where the engines fit on the trainer's GPUs (Megatron's default DP fits EP)
    dense, expert = t_tp * trainer["cp"] * t_pp, trainer["etp"] * ep * t_pp
    t_world = dense * expert // gcd(dense, expert)
    i_world = i_tp * i_pp * dp * engines
    assume(t_world <= 32 and i_world <= 32)
    colocated = i_world <= t_world and draw(st.booleans())
    deployment = dict(mode="colocated" if colocated else "disaggregated", gpus_per_node=draw(st.sampled_from([2, 4, 8])))
    ep_size = dp * i_tp
    spare = [r for r in (0, 0, 2, 4) if (experts + r) % ep_size == 0] if inference["enable_ep"] else []
    eplb = dict(num_redundant_experts=draw(st.sampled_from(spare)) if spare else 0)
    return dict(model=dict(hf_config=cfg), trainer=trainer, inference=inference, deployment=deployment, eplb=eplb)


@st.composite
def jobs(draw):
    try:
        job = JobSpec.from_dict(draw(specs()))
    except JobError:
        assume(False)
    assume(job.trainer.world_size <= 32 and job.inference.world_size <= 32)
    return job
