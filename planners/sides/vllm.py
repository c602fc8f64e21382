"""The vLLM engine side: what each rank holds, as pieces of logical tensors.

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
  stage, which uses them as its head); final norm and ``lm_head`` on the last. Families whose vLLM
  model keeps embeddings, norm and head on every stage say so (``ModelSpec.vllm``).
* Names follow vLLM before 0.24 (``mlp.experts.w13_weight``); later versions add a
  ``routed_experts.`` segment that an engine adapter maps.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from planners.errors import LayoutError, ShardError
from planners.layouts import InferenceLayout, vllm_pp_layers
from planners.models import GQA, MLA, Catalog, ModelSpec, expert_names, router_prefix
from planners.eplb.placement import EnginePlacements, Placement
from planners.sides.shards import LocalTensor, Locals, padded_vocab, require_divides

__all__ = ["NAME", "check", "template", "inference_locals", "VLLM_NAMES"]

NAME = "vllm"

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


def check(spec: ModelSpec, layout: InferenceLayout, placement: Placement | EnginePlacements | None) -> None:
    """Raise ShardError, naming the fields as the job wrote them, unless the model's shapes divide over
    the engine layout as vLLM requires (and ``placement`` fits its expert slots)."""
    tp = layout.tp
    try:
        vllm_pp_layers(spec.num_layers, layout.pp)
    except LayoutError as err:
        raise ShardError(f"{spec.key('num_hidden_layers', spec.num_layers)} does not split over inference.pp={layout.pp}: "
                         f"{err}") from None
    a = spec.attention
    require_divides(tp, a.num_heads, f"inference.tp={tp} must divide {spec.key('num_attention_heads', a.num_heads)}")
    if isinstance(a, GQA):
        kv = a.num_kv_heads
        require_divides(*(kv, tp) if tp >= kv else (tp, kv), f"inference.tp={tp} must divide "
                        f"{spec.key('num_key_value_heads', kv)}, or be a multiple of it when larger")
    padded = padded_vocab(spec.vocab_size, layout.vocab_padding)
    require_divides(tp, padded, f"inference.tp={tp} must divide the vocabulary ({spec.key('vocab_size', spec.vocab_size)}) "
                                f"padded to a multiple of inference.vocab_padding={layout.vocab_padding} ({padded}); a "
                                f"vocab_padding that is a multiple of {tp} always works")
    if spec.dense_layers:
        width = spec.mlp.intermediate_size
        require_divides(tp, width, f"inference.tp={tp} must divide {spec.key('intermediate_size', width)}")
    if not spec.is_moe:
        if layout.enable_ep:
            raise ShardError(f"inference.enable_ep needs a MoE model: model {spec.model_type!r} has no MoE layers "
                             f"({spec.moe_pattern()}); set inference.enable_ep: false for a dense model")
        return
    m, group = spec.moe, f"inference dp*tp = {layout.dp}*{tp} = {layout.dp * tp}"
    if spec.vllm.tp_at_most_experts and tp > m.num_experts:
        raise ShardError(f"inference.tp={tp} exceeds the routed experts ({spec.key('experts', m.num_experts)}): vLLM's "
                         f"{spec.model_type} model refuses it (\"Tensor parallel size {tp} is greater than the number "
                         f"of experts\"); use inference.tp <= {m.num_experts}, with inference.dp for more ranks")
    if spec.vllm.moe_layer_on_every_stage:
        moe = set(spec.moe_layers)
        for stage, layers in enumerate(vllm_pp_layers(spec.num_layers, layout.pp)):
            if not moe & set(layers):
                raise ShardError(f"inference.pp={layout.pp}: pipeline stage {stage} holds layers {list(layers)} and no MoE "
                                 f"layer ({spec.moe_pattern()}); vLLM's {spec.model_type} model refuses such a stage "
                                 "(\"No ... layer found\"): use fewer stages")
    require_divides(layout.moe_tp_size, m.intermediate_size,
                    f"without expert parallelism vLLM splits every expert over the engine's DP x TP ranks ({group}), "
                    f"which must divide {spec.key('moe_intermediate_size', m.intermediate_size)}; or set "
                    "inference.enable_ep: true")
    if m.num_shared_experts:
        require_divides(tp, m.shared_intermediate_size, f"inference.tp={tp} must divide the shared experts' width "
                        f"({spec.key('moe_intermediate_size', m.intermediate_size)} x "
                        f"{spec.key('shared_experts', m.num_shared_experts)} = {m.shared_intermediate_size})")
    P = placement.num_physical if placement is not None else m.num_experts
    if P != m.num_experts:
        if not layout.enable_ep:
            raise ShardError(f"{P - m.num_experts} redundant expert slots need inference.enable_ep: true "
                             "(vLLM's EPLB runs with expert parallelism)")
        require_divides(layout.ep_size, P, f"the {P} physical expert slots must divide over the inference EP group "
                                           f"({group})")
    elif layout.enable_ep and layout.ep_size > P:
        raise ShardError(f"inference EP size ({group}) exceeds the routed experts "
                         f"({spec.key('experts', m.num_experts)}); some ranks would hold none")
    if placement is not None:
        placement.check(len(spec.moe_layers), m.num_experts, P, layout.engines)


def inference_locals(spec: ModelSpec, cat: Catalog, layout: InferenceLayout, placement: Placement | EnginePlacements | None,
                     rank: int, global_rank: int) -> list[LocalTensor]:
    """Local tensors of inference ``rank`` (engine-local numbering), tagged with ``global_rank``."""
    return [LocalTensor(global_rank, t.name, t.shape, t.dtype, t.pieces)
            for t in template(spec, cat, layout, placement, rank)]


def slots_of(layout: InferenceLayout, num_physical: int, ranks: np.ndarray, local_shapes: list[tuple[int, ...]],
             which: np.ndarray, bases: np.ndarray) -> np.ndarray:
    """The physical expert slot each expert piece fills: engine ``ranks``, the shape of each piece's
    local tensor (``local_shapes[which]``), the pieces' flat ``bases``. FusedMoE stacks a rank's slots
    along dimension 0 of ``w13_weight`` / ``w2_weight``, so the block a piece lands in says which."""
    starts = np.array([layout.expert_slots(num_physical, c.dp * layout.tp + c.tp).start
                       for c in (layout.coords(r) for r in range(layout.world_size))], dtype=np.int64)
    per_slot = np.array([int(np.prod(shape[1:])) for shape in local_shapes], dtype=np.int64)
    return starts[ranks] + bases // per_slot[which]


def template(spec: ModelSpec, cat: Catalog, layout: InferenceLayout, placement: Placement | EnginePlacements | None,
             rank: int) -> tuple[LocalTensor, ...]:
    """The (shared, rank-less) local tensors of ``rank``: ranks with equal shard coordinates share one."""
    c = layout.coords(rank)
    mine = placement.of_engine(c.engine) if placement is not None else None  # each engine's own, where given
    return _locals_for(spec, cat, layout, mine, c.dp, c.pp, c.tp)


@lru_cache(maxsize=1024)
def _locals_for(spec: ModelSpec, cat: Catalog, layout: InferenceLayout, placement: Placement | None,
                dp_rank: int, pp_rank: int, tp_rank: int) -> tuple[LocalTensor, ...]:
    rank = _Rank(spec, cat, layout, placement, dp_rank, tp_rank)
    stages = vllm_pp_layers(spec.num_layers, layout.pp)
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    if spec.vllm.io_on_every_stage:
        first = last = True
    if first or (last and spec.tie_word_embeddings):
        rank.vocab_rows("model.embed_tokens.weight", "model.embed_tokens.weight")
    for i in stages[pp_rank]:
        rank.layer(i)
    if last:
        rank.add("model.norm.weight", (spec.hidden_size,), [rank.whole("model.norm.weight")])
        if not spec.tie_word_embeddings:
            rank.vocab_rows("lm_head.weight", "lm_head.weight")
    return rank.done()


class _Rank(Locals):
    """The local tensors of one (DP, TP) coordinate of an engine's PP stage."""

    def __init__(self, spec: ModelSpec, cat: Catalog, layout: InferenceLayout, placement: Placement | None,
                 dp_rank: int, tp_rank: int) -> None:
        super().__init__(cat)
        self.spec, self.layout, self.placement = spec, layout, placement
        self.tp, self.tp_rank, self.group_rank = layout.tp, tp_rank, dp_rank * layout.tp + tp_rank
        self.moe_index = {layer: k for k, layer in enumerate(spec.moe_layers)}

    def vocab_rows(self, name: str, logical: str) -> None:
        self.vocab(name, logical, padded_vocab(self.spec.vocab_size, self.layout.vocab_padding) // self.tp, self.tp_rank)

    def layer(self, i: int) -> None:
        spec, H, p = self.spec, self.spec.hidden_size, f"model.layers.{i}"
        self.add(f"{p}.input_layernorm.weight", (H,), [self.whole(f"{p}.input_layernorm.weight")])
        if isinstance(spec.attention, MLA):
            self.mla(spec.attention, f"{p}.self_attn")
        else:
            self.gqa(spec.attention, f"{p}.self_attn")
        self.add(f"{p}.post_attention_layernorm.weight", (H,), [self.whole(f"{p}.post_attention_layernorm.weight")])
        if i in self.moe_index:
            router = router_prefix(spec, i)
            self.add(f"{router}.weight", (spec.num_experts, H), [self.whole(f"{router}.weight")])
            if spec.moe.router_bias:
                self.add(f"{router}.e_score_correction_bias", (spec.num_experts,),
                         [self.whole(f"{router}.e_score_correction_bias")])
            self.experts(self.moe_index[i], i)
            if spec.moe.num_shared_experts:
                hf = f"{p}.mlp.shared_experts"
                self.gated_mlp(hf, f"{hf}.gate_up_proj.weight", f"{hf}.down_proj.weight", self.tp, self.tp_rank)
        else:
            self.gated_mlp(f"{p}.mlp", f"{p}.mlp.gate_up_proj.weight", f"{p}.mlp.down_proj.weight", self.tp, self.tp_rank)

    def experts(self, moe_layer: int, layer: int) -> None:
        """FusedMoE stacks: this rank's physical slots, each filled from its logical expert."""
        spec, lay, placement = self.spec, self.layout, self.placement
        H, width = spec.hidden_size, spec.moe.intermediate_size
        P = placement.num_physical if placement is not None else spec.num_experts
        mtp, mtp_rank = (1, 0) if lay.enable_ep else (lay.moe_tp_size, self.group_rank)
        slots = lay.expert_slots(P, self.group_rank)
        ims = width // mtp
        w13, w2 = [], []
        for s, slot in enumerate(slots):
            e = int(placement.phy2log[moe_layer, slot]) if placement is not None else slot
            gate, up, down = expert_names(spec, layer, e)
            w13.append(self.column(gate, mtp, mtp_rank, base=s * 2 * ims * H, dim=2 * ims))
            w13.append(self.column(up, mtp, mtp_rank, base=s * 2 * ims * H, dim=2 * ims, off=ims))
            w2.append(self.column(down, mtp, mtp_rank, base=s * H * ims))
        block = router_prefix(spec, layer).rsplit(".", 1)[0]
        self.add(f"{block}.experts.w13_weight", (len(slots), 2 * ims, H), w13)
        self.add(f"{block}.experts.w2_weight", (len(slots), H, ims), w2)

    def gqa(self, a: GQA, attn: str) -> None:
        """``qkv_proj = [q_r; k_r; v_r]``; with tp > kv heads each rank holds one kv head."""
        d, H, tp, r = a.head_dim, self.spec.hidden_size, self.tp, self.tp_rank
        kv = a.num_kv_heads
        kv_parts, kv_rank = (kv, r // (tp // kv)) if tp >= kv else (tp, r)
        q_rows = a.num_heads * d // tp
        kv_rows = kv * d // kv_parts
        rows = q_rows + 2 * kv_rows
        for kind in (["weight", "bias"] if a.qkv_bias else ["weight"]):
            self.add(f"{attn}.qkv_proj.{kind}", (rows, H) if kind == "weight" else (rows,),
                     [self.column(f"{attn}.q_proj.{kind}", tp, r, dim=rows),
                      self.column(f"{attn}.k_proj.{kind}", kv_parts, kv_rank, dim=rows, off=q_rows),
                      self.column(f"{attn}.v_proj.{kind}", kv_parts, kv_rank, dim=rows, off=q_rows + kv_rows)])
        if a.qk_norm:
            self.add(f"{attn}.q_norm.weight", (d,), [self.whole(f"{attn}.q_norm.weight")])
            self.add(f"{attn}.k_norm.weight", (d,), [self.whole(f"{attn}.k_norm.weight")])
        self.add(f"{attn}.o_proj.weight", (H, q_rows), [self.column(f"{attn}.o_proj.weight", tp, r)])

    def mla(self, a: MLA, attn: str) -> None:
        """``fused_qkv_a_proj = [q_a_proj; kv_a_proj_with_mqa]`` replicated; the rest by heads."""
        H, tp, r = self.spec.hidden_size, self.tp, self.tp_rank
        heads = a.num_heads // tp
        kv_a = a.kv_lora_rank + a.qk_rope_head_dim
        if a.q_lora_rank is None:
            self.add(f"{attn}.q_proj.weight", (heads * a.qk_head_dim, H), [self.column(f"{attn}.q_proj.weight", tp, r)])
            self.add(f"{attn}.kv_a_proj_with_mqa.weight", (kv_a, H), [self.whole(f"{attn}.kv_a_proj_with_mqa.weight")])
        else:
            rows = a.q_lora_rank + kv_a
            self.add(f"{attn}.fused_qkv_a_proj.weight", (rows, H),
                     [self.whole(f"{attn}.q_a_proj.weight", dim=rows),
                      self.whole(f"{attn}.kv_a_proj_with_mqa.weight", dim=rows, off=a.q_lora_rank)])
            self.add(f"{attn}.q_a_layernorm.weight", (a.q_lora_rank,), [self.whole(f"{attn}.q_a_layernorm.weight")])
            self.add(f"{attn}.q_b_proj.weight", (heads * a.qk_head_dim, a.q_lora_rank),
                     [self.column(f"{attn}.q_b_proj.weight", tp, r)])
        self.add(f"{attn}.kv_a_layernorm.weight", (a.kv_lora_rank,), [self.whole(f"{attn}.kv_a_layernorm.weight")])
        self.add(f"{attn}.kv_b_proj.weight", (heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
                 [self.column(f"{attn}.kv_b_proj.weight", tp, r)])
        self.add(f"{attn}.o_proj.weight", (H, heads * a.v_head_dim), [self.column(f"{attn}.o_proj.weight", tp, r)])
