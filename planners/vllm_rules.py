"""Inference shard rules: what each vLLM rank holds, as pieces of logical tensors.

Parameter names are those of vLLM's model classes, with global layer indices:

* ``self_attn.qkv_proj`` = ``[q_r; k_r; v_r]``; when tp > kv heads each rank holds one kv head,
  rank r the head ``r // (tp / kv_heads)``.
* ``mlp.gate_up_proj`` = ``[gate_r; up_r]``; ``o_proj``/``down_proj`` split on dim 1.
* ``embed_tokens``/``lm_head``: vocabulary padded to a multiple of 64, split evenly over TP.
* ``mlp.experts.w13_weight [slots, 2*I/moe_tp, H]`` (gate rows, then up rows) and
  ``mlp.experts.w2_weight [slots, H, I/moe_tp]``. With EP, moe_tp = 1 and EP rank r owns the
  a contiguous block of physical slots (vLLM's linear placement: ``P // ep`` each, one more for
  the first ``P % ep`` ranks); without EP, vLLM shards experts over the flattened DP x TP group.
* DeepSeek MLA: ``fused_qkv_a_proj`` = ``[q_a_proj; kv_a_proj_with_mqa]`` replicated; ``q_b_proj``,
  ``kv_b_proj`` by heads; shared experts as a TP-sharded gated MLP.
* PP: layers split by vLLM's rule; embeddings on the first stage (and, when tied, on the last
  stage, which uses them as its head); final norm and ``lm_head`` on the last. vLLM's Qwen3-MoE
  and Mixtral models keep embeddings, norm and head on every stage.
* Names follow vLLM before 0.24 (``mlp.experts.w13_weight``); later versions add a
  ``routed_experts.`` segment that an engine adapter maps.
"""

from __future__ import annotations

from functools import lru_cache

from planners.layouts import InferenceLayout, vllm_pp_layers
from planners.megatron_rules import padded_vocab
from planners.model import Catalog, ModelSpec, expert_names, router_prefix
from planners.placement import Placement
from planners.shards import LocalTensor, Piece, ShardError, even_part, require_divides

__all__ = ["inference_locals", "inference_template", "check_inference", "VLLM_NAMES"]

VLLM_NAMES = """
model.embed_tokens.weight, model.norm.weight, lm_head.weight,
model.layers.{i}.input_layernorm.weight, model.layers.{i}.post_attention_layernorm.weight,
model.layers.{i}.self_attn.qkv_proj.weight (.bias), self_attn.q_norm.weight, self_attn.k_norm.weight,
model.layers.{i}.self_attn.o_proj.weight,
model.layers.{i}.mlp.gate_up_proj.weight, model.layers.{i}.mlp.down_proj.weight,
model.layers.{i}.mlp.gate.weight, mlp.gate.e_score_correction_bias,
model.layers.{i}.mlp.experts.w13_weight, model.layers.{i}.mlp.experts.w2_weight,
model.layers.{i}.mlp.shared_experts.gate_up_proj.weight / down_proj.weight,
self_attn.fused_qkv_a_proj.weight, q_a_layernorm.weight, q_b_proj.weight, q_proj.weight,
kv_a_proj_with_mqa.weight (q_lora_rank unset), kv_a_layernorm.weight, kv_b_proj.weight
(Mixtral: block_sparse_moe.gate / block_sparse_moe.experts instead of mlp.gate / mlp.experts)
"""


def check_inference(spec: ModelSpec, layout: InferenceLayout, placement: Placement | None) -> None:
    """Raise ShardError when the model's shapes do not divide over the inference layout."""
    tp = layout.tp
    vllm_pp_layers(spec.num_layers, layout.pp)
    require_divides(tp, spec.num_heads, "inference.tp must divide model.num_attention_heads")
    if not spec.is_mla:
        kv = spec.num_kv_heads
        if tp >= kv:
            require_divides(kv, tp, "inference.tp must be a multiple of model.num_key_value_heads when larger")
        else:
            require_divides(tp, kv, "inference.tp must divide model.num_key_value_heads")
    vp = padded_vocab(spec.vocab_size, layout.vocab_padding)
    require_divides(tp, vp, f"inference.tp must divide the vocabulary padded to a multiple of {layout.vocab_padding}")
    if spec.intermediate_size and len(spec.moe_layers) < spec.num_layers:
        require_divides(tp, spec.intermediate_size, "inference.tp must divide model.intermediate_size")
    if spec.is_moe:
        require_divides(layout.moe_tp_size, spec.moe_intermediate_size,
                        "inference MoE tensor parallel size (dp*tp without EP) must divide model.moe_intermediate_size")
        if spec.num_shared_experts:
            require_divides(tp, spec.moe_intermediate_size * spec.num_shared_experts,
                            "inference.tp must divide the shared experts' intermediate size")
        P = placement.num_physical if placement is not None else spec.num_experts
        if P != spec.num_experts:
            if not layout.enable_ep:
                raise ShardError("inference: redundant expert slots need enable_ep: true (vLLM's EPLB runs with EP)")
            require_divides(layout.ep_size, P, "inference EP size (dp*tp) must divide the number of physical expert slots with EPLB")
        elif layout.enable_ep and layout.ep_size > P:
            raise ShardError(f"inference EP size dp*tp={layout.ep_size} exceeds the {P} experts; some ranks would hold none")
        if placement is not None:
            placement.check(len(spec.moe_layers), spec.num_experts, P)
    elif layout.enable_ep:
        raise ShardError(f"inference.enable_ep needs a MoE model; model {spec.model_type!r} has no experts")


def inference_locals(spec: ModelSpec, cat: Catalog, layout: InferenceLayout, placement: Placement | None,
                     rank: int, global_rank: int) -> list[LocalTensor]:
    """Local tensors of inference ``rank`` (engine-local numbering), tagged with ``global_rank``."""
    return [LocalTensor(global_rank, t.name, t.shape, t.dtype, t.pieces)
            for t in inference_template(spec, cat, layout, placement, rank)]


def inference_template(spec: ModelSpec, cat: Catalog, layout: InferenceLayout, placement: Placement | None,
                       rank: int) -> tuple[LocalTensor, ...]:
    """The (shared, rank-less) local tensors of ``rank``: ranks with equal shard coordinates share one."""
    c = layout.coords(rank)
    return _locals_for(spec, cat, layout, placement, c.dp, c.pp, c.tp)


@lru_cache(maxsize=1024)
def _locals_for(spec: ModelSpec, cat: Catalog, layout: InferenceLayout, placement: Placement | None,
                dp_rank: int, pp_rank: int, tp_rank: int) -> tuple[LocalTensor, ...]:
    out: list[LocalTensor] = []
    tp, H = layout.tp, spec.hidden_size
    ix = cat.index

    def local(name: str, shape: tuple[int, ...], pieces: list[Piece], dtype: str | None = None) -> None:
        out.append(LocalTensor(-1, name, shape, dtype or spec.dtype, pieces))

    def whole(logical: str, base: int = 0, dim: int | None = None, off: int = 0) -> Piece:
        t = cat[logical]
        n = t.shape[t.split_dim]
        return Piece(ix[logical], 0, n, base, n if dim is None else dim, off)

    def column(logical: str, parts: int, k: int, base: int = 0, dim: int | None = None, off: int = 0) -> Piece:
        t = cat[logical]
        lo, hi = even_part(t.shape[t.split_dim], parts, k)
        return Piece(ix[logical], lo, hi, base, hi - lo if dim is None else dim, off)

    def vocab(name: str, logical: str) -> None:
        vp = padded_vocab(spec.vocab_size, layout.vocab_padding) // tp
        lo, hi = tp_rank * vp, min((tp_rank + 1) * vp, spec.vocab_size)
        local(name, (vp, H), [Piece(ix[logical], lo, hi, 0, vp, 0)] if hi > lo else [])

    def gated_mlp(hf: str, parts: int, k: int) -> None:
        inter = cat[f"{hf}.gate_proj.weight"].shape[0] // parts
        local(f"{hf}.gate_up_proj.weight", (2 * inter, H),
              [column(f"{hf}.gate_proj.weight", parts, k, dim=2 * inter),
               column(f"{hf}.up_proj.weight", parts, k, dim=2 * inter, off=inter)])
        local(f"{hf}.down_proj.weight", (H, inter), [column(f"{hf}.down_proj.weight", parts, k)])

    stages = vllm_pp_layers(spec.num_layers, layout.pp)
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    if spec.family in ("qwen3_moe", "mixtral"):
        first = last = True  # vLLM's MoE models of these families keep embeddings, norm and head on every stage
    if first or (last and spec.tie_word_embeddings):
        vocab("model.embed_tokens.weight", "model.embed_tokens.weight")
    moe_index = {layer: k for k, layer in enumerate(spec.moe_layers)}
    for i in stages[pp_rank]:
        p = f"model.layers.{i}"
        local(f"{p}.input_layernorm.weight", (H,), [whole(f"{p}.input_layernorm.weight")])
        if spec.is_mla:
            _mla(spec, cat, tp, tp_rank, p, local, whole, column)
        else:
            _gqa(spec, cat, tp, tp_rank, p, local, whole, column)
        local(f"{p}.post_attention_layernorm.weight", (H,), [whole(f"{p}.post_attention_layernorm.weight")])
        if i in moe_index:
            router = router_prefix(spec, i)
            local(f"{router}.weight", (spec.num_experts, H), [whole(f"{router}.weight")])
            if spec.router_bias:
                local(f"{router}.e_score_correction_bias", (spec.num_experts,),
                      [whole(f"{router}.e_score_correction_bias")], "float32")
            _experts(spec, cat, layout, placement, moe_index[i], i, dp_rank * tp + tp_rank, local, column)
            if spec.num_shared_experts:
                gated_mlp(f"{p}.mlp.shared_experts", tp, tp_rank)
        else:
            gated_mlp(f"{p}.mlp", tp, tp_rank)
    if last:
        local("model.norm.weight", (H,), [whole("model.norm.weight")])
        if not spec.tie_word_embeddings:
            vocab("lm_head.weight", "lm_head.weight")
    return tuple(out)


def _experts(spec, cat, layout, placement, moe_layer, layer, group_rank, local, column) -> None:
    """FusedMoE stacks: this rank's physical slots, each filled from its logical expert."""
    H, Im = spec.hidden_size, spec.moe_intermediate_size
    P = placement.num_physical if placement is not None else spec.num_experts
    mtp, mtp_rank = (1, 0) if layout.enable_ep else (layout.moe_tp_size, group_rank)
    slots = layout.expert_slots(P, group_rank)
    ims = Im // mtp
    w13, w2 = [], []
    for s, slot in enumerate(slots):
        e = int(placement.phy2log[moe_layer, slot]) if placement is not None else slot
        gate, up, down = expert_names(spec, layer, e)
        w13.append(column(gate, mtp, mtp_rank, base=s * 2 * ims * H, dim=2 * ims))
        w13.append(column(up, mtp, mtp_rank, base=s * 2 * ims * H, dim=2 * ims, off=ims))
        w2.append(column(down, mtp, mtp_rank, base=s * H * ims))
    block = router_prefix(spec, layer).rsplit(".", 1)[0]
    local(f"{block}.experts.w13_weight", (len(slots), 2 * ims, H), w13)
    local(f"{block}.experts.w2_weight", (len(slots), H, ims), w2)


def _gqa(spec, cat, tp, tp_rank, p, local, whole, column) -> None:
    d, H = spec.head_dim, spec.hidden_size
    a = f"{p}.self_attn"
    kv = spec.num_kv_heads
    if tp >= kv:
        kv_parts, kv_rank = kv, tp_rank // (tp // kv)
    else:
        kv_parts, kv_rank = tp, tp_rank
    q_rows = spec.num_heads * d // tp
    kv_rows = kv * d // kv_parts
    rows = q_rows + 2 * kv_rows
    for kind in (["weight", "bias"] if spec.qkv_bias else ["weight"]):
        local(f"{a}.qkv_proj.{kind}", (rows, H) if kind == "weight" else (rows,),
              [column(f"{a}.q_proj.{kind}", tp, tp_rank, dim=rows),
               column(f"{a}.k_proj.{kind}", kv_parts, kv_rank, dim=rows, off=q_rows),
               column(f"{a}.v_proj.{kind}", kv_parts, kv_rank, dim=rows, off=q_rows + kv_rows)])
    if spec.qk_norm:
        local(f"{a}.q_norm.weight", (d,), [whole(f"{a}.q_norm.weight")])
        local(f"{a}.k_norm.weight", (d,), [whole(f"{a}.k_norm.weight")])
    local(f"{a}.o_proj.weight", (H, q_rows), [column(f"{a}.o_proj.weight", tp, tp_rank)])


def _mla(spec, cat, tp, tp_rank, p, local, whole, column) -> None:
    H, a = spec.hidden_size, f"{p}.self_attn"
    heads = spec.num_heads // tp
    kv_a = spec.kv_lora_rank + spec.qk_rope_head_dim
    if spec.q_lora_rank is None:
        local(f"{a}.q_proj.weight", (heads * spec.qk_head_dim, H), [column(f"{a}.q_proj.weight", tp, tp_rank)])
        local(f"{a}.kv_a_proj_with_mqa.weight", (kv_a, H), [whole(f"{a}.kv_a_proj_with_mqa.weight")])
    else:
        rows = spec.q_lora_rank + kv_a
        local(f"{a}.fused_qkv_a_proj.weight", (rows, H),
              [whole(f"{a}.q_a_proj.weight", dim=rows),
               whole(f"{a}.kv_a_proj_with_mqa.weight", dim=rows, off=spec.q_lora_rank)])
        local(f"{a}.q_a_layernorm.weight", (spec.q_lora_rank,), [whole(f"{a}.q_a_layernorm.weight")])
        local(f"{a}.q_b_proj.weight", (heads * spec.qk_head_dim, spec.q_lora_rank),
              [column(f"{a}.q_b_proj.weight", tp, tp_rank)])
    local(f"{a}.kv_a_layernorm.weight", (spec.kv_lora_rank,), [whole(f"{a}.kv_a_layernorm.weight")])
    local(f"{a}.kv_b_proj.weight", (heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank),
          [column(f"{a}.kv_b_proj.weight", tp, tp_rank)])
    local(f"{a}.o_proj.weight", (H, heads * spec.v_head_dim), [column(f"{a}.o_proj.weight", tp, tp_rank)])
