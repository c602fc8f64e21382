"""Small FP8 jobs: dimensions in whole 128 x 128 blocks where vLLM needs them."""

MOE = dict(model_type="qwen3_moe", hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=128, intermediate_size=256, moe_intermediate_size=128, num_experts=8, num_experts_per_tok=2,
           vocab_size=128, torch_dtype="bfloat16", decoder_sparse_step=1, norm_topk_prob=True)
MLA = dict(model_type="deepseek_v3", hidden_size=256, num_hidden_layers=2, first_k_dense_replace=1,
           num_attention_heads=4, q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=64,
           v_head_dim=64, intermediate_size=256, moe_intermediate_size=256, n_routed_experts=8, n_shared_experts=1,
           num_experts_per_tok=2, n_group=1, topk_group=1, vocab_size=128, torch_dtype="bfloat16")
DENSE = dict(model_type="llama", hidden_size=256, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             head_dim=128, intermediate_size=512, vocab_size=128, torch_dtype="bfloat16")
FP8_BLOCK = {"quantization": "fp8_block"}

CASES = {
    "moe ep eplb": dict(model=dict(hf_config=MOE), trainer=dict(tp=2, ep=2, etp=1),
                        inference=dict(tp=2, dp=2, enable_ep=True, **FP8_BLOCK),
                        eplb=dict(enabled=True, num_redundant_experts=4)),
    "moe pp2 two engines": dict(model=dict(hf_config=MOE), trainer=dict(tp=1, ep=2, pp=2),
                                inference=dict(tp=1, dp=2, enable_ep=True, engines=2, **FP8_BLOCK),
                                deployment=dict(gpus_per_node=4)),
    # Megatron's column-parallel MLA down projections cut kv_a's blocks: quantized on arrival
    "mla tp2": dict(model=dict(hf_config=MLA), trainer=dict(tp=2, ep=2, etp=1),
                    inference=dict(tp=2, enable_ep=True, **FP8_BLOCK)),
    "dense tp2pp2 -> tp2": dict(model=dict(hf_config=DENSE), trainer=dict(tp=2, pp=2), inference=dict(tp=2, **FP8_BLOCK)),
    "dense colocated": dict(model=dict(hf_config=DENSE), trainer=dict(tp=1, dp=2), inference=dict(tp=2, **FP8_BLOCK),
                            deployment=dict(mode="colocated")),
}
