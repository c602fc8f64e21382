"""The Megatron-core trainer side: what each rank holds, as pieces of logical tensors.

Names are those of ``GPTModel`` built with the local (non-Transformer-Engine) layer spec, with
layer indices local to the model chunk. With virtual pipeline parallelism (``trainer.vpp > 1``) a
rank holds ``vpp`` chunks (Megatron's list of models) and every name starts with its chunk's
prefix ``model{v}.`` (Megatron-LM's checkpoint key of chunk ``v``); without it there is no prefix.
Conventions followed:

* ``linear_qkv``: per query group, ``[q heads of the group; k; v]``; TP splits query groups.
* ``linear_fc1``: ``[gate shard; up shard]``; ``linear_proj``/``linear_fc2`` split on dim 1.
* Vocabulary padded to a multiple of ``vocab_divisible_by * tp`` and split evenly over TP.
* Routed experts ``mlp.experts.local_experts.{j}``, global id ``ep_rank * E/ep + j``, sharded by ETP.
* Tied embeddings with PP > 1: the last stage keeps its own copy as ``output_layer.weight``.
* Embedding on the first chunk of PP rank 0; final norm and output layer on the last chunk of the
  last PP rank (layers of each chunk: :meth:`TrainerLayout.chunk_layers`).
* MLA (local spec): ``linear_q_down_proj``/``linear_kv_down_proj`` are column-parallel too;
  ``q_layernorm``/``kv_layernorm`` replicated. (Transformer Engine's spec replicates the down
  projections and fuses the norms into ``linear_*_up_proj.layer_norm_weight``; a TE source
  adapter presents its tensors under these names.)
"""

from __future__ import annotations

from functools import lru_cache

from planners.errors import LayoutError, ShardError
from planners.layouts import TrainerLayout
from planners.models import GQA, MLA, Catalog, ModelSpec, expert_names, router_prefix
from planners.sides.shards import LocalTensor, Locals, Piece, divisors, padded_vocab, require_divides

__all__ = ["NAME", "check", "template", "trainer_locals", "trainer_chunk_layers", "chunk_prefix"]

NAME = "megatron"


def chunk_prefix(vpp: int, chunk: int) -> str:
    """Name prefix of model chunk ``chunk`` under ``vpp`` virtual stages: ``model{chunk}.``, none without VPP."""
    return f"model{chunk}." if vpp > 1 else ""


def trainer_chunk_layers(spec: ModelSpec, layout: TrainerLayout, rank: int) -> list[range]:
    """Global layer indices of each model chunk trainer ``rank`` holds (one chunk without VPP)."""
    return layout.chunk_layers(spec.num_layers)[layout.coords(rank).pp]


def check(spec: ModelSpec, layout: TrainerLayout) -> None:
    """Raise ShardError, naming the fields as the job wrote them, unless the model's shapes divide over
    the trainer layout as Megatron-core requires."""
    tp, etp, ep = layout.tp, layout.etp, layout.ep
    try:
        layout.chunk_layers(spec.num_layers)
    except LayoutError as err:
        raise ShardError(f"{spec.key('num_hidden_layers', spec.num_layers)} does not split over trainer.pp={layout.pp}: "
                         f"{err}") from None
    a = spec.attention
    if isinstance(a, MLA):
        require_divides(tp, a.num_heads, f"trainer.tp={tp} must divide {spec.key('num_attention_heads', a.num_heads)}")
        if a.q_lora_rank is not None:
            require_divides(tp, a.q_lora_rank, f"trainer.tp={tp} must divide {spec.key('q_lora_rank', a.q_lora_rank)} "
                                               "(linear_q_down_proj is column-parallel)")
        kv_a = a.kv_lora_rank + a.qk_rope_head_dim
        require_divides(tp, kv_a, f"trainer.tp={tp} must divide {spec.key('kv_lora_rank', a.kv_lora_rank)} + "
                                  f"{spec.key('qk_rope_head_dim', a.qk_rope_head_dim)} = {kv_a} "
                                  "(linear_kv_down_proj is column-parallel)")
    else:
        require_divides(tp, a.num_kv_heads, f"trainer.tp={tp} must divide {spec.key('num_key_value_heads', a.num_kv_heads)} "
                                            f"(Megatron splits query groups over TP); valid: {divisors(a.num_kv_heads)}")
    if spec.dense_layers:
        width = spec.mlp.intermediate_size
        require_divides(tp, width, f"trainer.tp={tp} must divide {spec.key('intermediate_size', width)}")
    if not spec.is_moe:
        if ep > 1:
            raise ShardError(f"trainer.ep={ep} needs a MoE model: model {spec.model_type!r} has no MoE layers "
                             f"({spec.moe_pattern()}); set trainer.ep: 1 for a dense model")
        return
    m = spec.moe
    require_divides(ep, m.num_experts, f"trainer.ep={ep} must divide the routed experts "
                                       f"({spec.key('experts', m.num_experts)}); valid: {divisors(m.num_experts)}")
    require_divides(etp, m.intermediate_size, f"trainer.etp={etp} must divide "
                                              f"{spec.key('moe_intermediate_size', m.intermediate_size)}")
    if m.num_shared_experts:
        require_divides(tp, m.shared_intermediate_size, f"trainer.tp={tp} must divide the shared experts' width "
                        f"({spec.key('moe_intermediate_size', m.intermediate_size)} x "
                        f"{spec.key('shared_experts', m.num_shared_experts)} = {m.shared_intermediate_size})")


def trainer_locals(spec: ModelSpec, cat: Catalog, layout: TrainerLayout, rank: int) -> list[LocalTensor]:
    """Local tensors of trainer ``rank``."""
    return [LocalTensor(rank, t.name, t.shape, t.dtype, t.pieces) for t in template(spec, cat, layout, rank)]


def template(spec: ModelSpec, cat: Catalog, layout: TrainerLayout, rank: int) -> tuple[LocalTensor, ...]:
    """The (shared, rank-less) local tensors of ``rank``: ranks with equal shard coordinates share one."""
    c = layout.coords(rank)
    return _locals_for(spec, cat, layout, c.tp, c.pp, c.etp, c.ep)


@lru_cache(maxsize=4096)
def _locals_for(spec: ModelSpec, cat: Catalog, layout: TrainerLayout, tp_rank: int, pp_rank: int,
                etp_rank: int, ep_rank: int) -> tuple[LocalTensor, ...]:
    rank = _Rank(spec, cat, layout, tp_rank, etp_rank, ep_rank)
    chunks = layout.chunk_layers(spec.num_layers)[pp_rank]
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    for v, layers in enumerate(chunks):
        rank.chunk(chunk_prefix(layout.vpp, v), layers, first and v == 0, last and v == len(chunks) - 1)
    return rank.done()


class _Rank(Locals):
    """The local tensors of one (TP, ETP, EP) coordinate, model chunk by model chunk."""

    def __init__(self, spec: ModelSpec, cat: Catalog, layout: TrainerLayout, tp_rank: int, etp_rank: int,
                 ep_rank: int) -> None:
        super().__init__(cat)
        self.spec, self.layout = spec, layout
        self.tp, self.tp_rank, self.etp_rank, self.ep_rank = layout.tp, tp_rank, etp_rank, ep_rank

    def vocab_rows(self, name: str, logical: str) -> None:
        rows = padded_vocab(self.spec.vocab_size, self.layout.vocab_divisible_by * self.tp) // self.tp
        self.vocab(name, logical, rows, self.tp_rank)

    def chunk(self, prefix: str, layers: range, pre: bool, post: bool) -> None:
        """One model chunk: embedding (``pre``), the decoder layers ``layers``, final norm and output (``post``)."""
        spec, H = self.spec, self.spec.hidden_size
        if pre:
            self.vocab_rows(f"{prefix}embedding.word_embeddings.weight", "model.embed_tokens.weight")
        moe = set(spec.moe_layers)
        for j, i in enumerate(layers):
            hf, mg = f"model.layers.{i}", f"{prefix}decoder.layers.{j}"
            self.add(f"{mg}.input_layernorm.weight", (H,), [self.whole(f"{hf}.input_layernorm.weight")])
            if isinstance(spec.attention, MLA):
                self.mla(spec.attention, hf, f"{mg}.self_attention")
            else:
                self.gqa(spec.attention, hf, f"{mg}.self_attention")
            self.add(f"{mg}.pre_mlp_layernorm.weight", (H,), [self.whole(f"{hf}.post_attention_layernorm.weight")])
            if i in moe:
                self.moe(i, hf, f"{mg}.mlp")
            else:
                self.gated_mlp(f"{hf}.mlp", f"{mg}.mlp.linear_fc1.weight", f"{mg}.mlp.linear_fc2.weight", self.tp,
                               self.tp_rank)
        if post:
            self.add(f"{prefix}decoder.final_layernorm.weight", (H,), [self.whole("model.norm.weight")])
            if not spec.tie_word_embeddings:
                self.vocab_rows(f"{prefix}output_layer.weight", "lm_head.weight")
            elif self.layout.pp > 1:
                self.vocab_rows(f"{prefix}output_layer.weight", "model.embed_tokens.weight")

    def moe(self, layer: int, hf: str, mg: str) -> None:
        """Router (and its expert bias), this EP rank's experts (ETP shards of each), shared experts."""
        m, H = self.spec.moe, self.spec.hidden_size
        router = router_prefix(self.spec, layer)
        self.add(f"{mg}.router.weight", (m.num_experts, H), [self.whole(f"{router}.weight")])
        if m.router_bias:
            self.add(f"{mg}.router.expert_bias", (m.num_experts,), [self.whole(f"{router}.e_score_correction_bias")])
        per_rank, etp = m.num_experts // self.layout.ep, self.layout.etp
        width = m.intermediate_size // etp
        for k in range(per_rank):
            gate, up, down = expert_names(self.spec, layer, self.ep_rank * per_rank + k)
            p = f"{mg}.experts.local_experts.{k}"
            self.add(f"{p}.linear_fc1.weight", (2 * width, H),
                     [self.column(gate, etp, self.etp_rank, dim=2 * width),
                      self.column(up, etp, self.etp_rank, dim=2 * width, off=width)])
            self.add(f"{p}.linear_fc2.weight", (H, width), [self.column(down, etp, self.etp_rank)])
        if m.num_shared_experts:
            self.gated_mlp(f"{hf}.mlp.shared_experts", f"{mg}.shared_experts.linear_fc1.weight",
                           f"{mg}.shared_experts.linear_fc2.weight", self.tp, self.tp_rank)

    def gqa(self, a: GQA, hf: str, mg: str) -> None:
        """linear_qkv with per-query-group interleaving [q of group; k; v]; TP splits query groups."""
        d, H, tp = a.head_dim, self.spec.hidden_size, self.tp
        groups = a.num_kv_heads // tp
        q_per_group = a.num_heads // a.num_kv_heads
        rows_per_group = (q_per_group + 2) * d
        rows = groups * rows_per_group
        attn, ix = f"{hf}.self_attn", self.cat.index
        for kind in (["weight", "bias"] if a.qkv_bias else ["weight"]):
            pieces = []
            for g in range(groups):
                G = self.tp_rank * groups + g
                at = g * rows_per_group
                pieces += [Piece(ix[f"{attn}.q_proj.{kind}"], G * q_per_group * d, (G + 1) * q_per_group * d, 0, rows, at),
                           Piece(ix[f"{attn}.k_proj.{kind}"], G * d, (G + 1) * d, 0, rows, at + q_per_group * d),
                           Piece(ix[f"{attn}.v_proj.{kind}"], G * d, (G + 1) * d, 0, rows, at + (q_per_group + 1) * d)]
            self.add(f"{mg}.linear_qkv.{kind}", (rows, H) if kind == "weight" else (rows,), pieces)
        if a.qk_norm:
            self.add(f"{mg}.q_layernorm.weight", (d,), [self.whole(f"{attn}.q_norm.weight")])
            self.add(f"{mg}.k_layernorm.weight", (d,), [self.whole(f"{attn}.k_norm.weight")])
        self.add(f"{mg}.linear_proj.weight", (H, a.num_heads * d // tp), [self.column(f"{attn}.o_proj.weight", tp, self.tp_rank)])

    def mla(self, a: MLA, hf: str, mg: str) -> None:
        """Multi-latent attention as the local spec builds it: every projection column-parallel
        (the down projections too, gathered in forward), the latent norms replicated."""
        H, tp, r = self.spec.hidden_size, self.tp, self.tp_rank
        attn = f"{hf}.self_attn"
        heads = a.num_heads // tp
        if a.q_lora_rank is None:
            self.add(f"{mg}.linear_q_proj.weight", (heads * a.qk_head_dim, H), [self.column(f"{attn}.q_proj.weight", tp, r)])
        else:
            self.add(f"{mg}.linear_q_down_proj.weight", (a.q_lora_rank // tp, H),
                     [self.column(f"{attn}.q_a_proj.weight", tp, r)])
            self.add(f"{mg}.linear_q_up_proj.weight", (heads * a.qk_head_dim, a.q_lora_rank),
                     [self.column(f"{attn}.q_b_proj.weight", tp, r)])
            self.add(f"{mg}.q_layernorm.weight", (a.q_lora_rank,), [self.whole(f"{attn}.q_a_layernorm.weight")])
        kv_a = a.kv_lora_rank + a.qk_rope_head_dim
        self.add(f"{mg}.linear_kv_down_proj.weight", (kv_a // tp, H),
                 [self.column(f"{attn}.kv_a_proj_with_mqa.weight", tp, r)])
        self.add(f"{mg}.linear_kv_up_proj.weight", (heads * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank),
                 [self.column(f"{attn}.kv_b_proj.weight", tp, r)])
        self.add(f"{mg}.kv_layernorm.weight", (a.kv_lora_rank,), [self.whole(f"{attn}.kv_a_layernorm.weight")])
        self.add(f"{mg}.linear_proj.weight", (H, heads * a.v_head_dim), [self.column(f"{attn}.o_proj.weight", tp, r)])
