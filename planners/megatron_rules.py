"""Trainer shard rules: what each Megatron-core rank holds, as pieces of logical tensors.

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

from planners.layouts import TrainerLayout
from planners.model import Catalog, ModelSpec, expert_names, router_prefix
from planners.shards import LocalTensor, Piece, ShardError, even_part, require_divides

__all__ = ["trainer_locals", "trainer_template", "trainer_chunk_layers", "chunk_prefix", "check_trainer",
           "padded_vocab"]


def padded_vocab(vocab: int, multiple: int) -> int:
    return -(-vocab // multiple) * multiple


def chunk_prefix(vpp: int, chunk: int) -> str:
    """Name prefix of model chunk ``chunk`` under ``vpp`` virtual stages: ``model{chunk}.``, none without VPP."""
    return f"model{chunk}." if vpp > 1 else ""


def trainer_chunk_layers(spec: ModelSpec, layout: TrainerLayout, rank: int) -> list[range]:
    """Global layer indices of each model chunk trainer ``rank`` holds (one chunk without VPP)."""
    return layout.chunk_layers(spec.num_layers)[layout.coords(rank).pp]


def check_trainer(spec: ModelSpec, layout: TrainerLayout) -> None:
    """Raise ShardError when the model's shapes do not divide over the trainer layout."""
    tp, etp, ep = layout.tp, layout.etp, layout.ep
    layout.chunk_layers(spec.num_layers)
    if spec.is_mla:
        require_divides(tp, spec.num_heads, "trainer.tp must divide model.num_attention_heads")
        if spec.q_lora_rank is not None:
            require_divides(tp, spec.q_lora_rank, "trainer.tp must divide model.q_lora_rank (linear_q_down_proj is column-parallel)")
        require_divides(tp, spec.kv_lora_rank + spec.qk_rope_head_dim,
                        "trainer.tp must divide model.kv_lora_rank + qk_rope_head_dim (linear_kv_down_proj is column-parallel)")
    else:
        require_divides(tp, spec.num_kv_heads, "trainer.tp must divide model.num_key_value_heads (query groups)")
    if spec.intermediate_size and len(spec.moe_layers) < spec.num_layers:
        require_divides(tp, spec.intermediate_size, "trainer.tp must divide model.intermediate_size")
    if spec.is_moe:
        require_divides(ep, spec.num_experts, "trainer.ep must divide the number of routed experts")
        require_divides(etp, spec.moe_intermediate_size, "trainer.etp must divide model.moe_intermediate_size")
        if spec.num_shared_experts:
            require_divides(tp, spec.moe_intermediate_size * spec.num_shared_experts,
                            "trainer.tp must divide the shared experts' intermediate size")
    elif ep > 1:
        raise ShardError(f"trainer.ep={ep} needs a MoE model; model {spec.model_type!r} has no experts")


def trainer_locals(spec: ModelSpec, cat: Catalog, layout: TrainerLayout, rank: int) -> list[LocalTensor]:
    """Local tensors of trainer ``rank``."""
    return [LocalTensor(rank, t.name, t.shape, t.dtype, t.pieces) for t in trainer_template(spec, cat, layout, rank)]


def trainer_template(spec: ModelSpec, cat: Catalog, layout: TrainerLayout, rank: int) -> tuple[LocalTensor, ...]:
    """The (shared, rank-less) local tensors of ``rank``: ranks with equal shard coordinates share one."""
    c = layout.coords(rank)
    return _locals_for(spec, cat, layout, c.tp, c.pp, c.etp, c.ep)


@lru_cache(maxsize=4096)
def _locals_for(spec: ModelSpec, cat: Catalog, layout: TrainerLayout, tp_rank: int, pp_rank: int,
                etp_rank: int, ep_rank: int) -> tuple[LocalTensor, ...]:
    out: list[LocalTensor] = []
    tp, H = layout.tp, spec.hidden_size
    ix = cat.index

    def local(name: str, shape: tuple[int, ...], pieces: list[Piece], dtype: str | None = None) -> None:
        out.append(LocalTensor(-1, name, shape, dtype or spec.dtype, pieces))

    def whole(logical: str) -> list[Piece]:
        t = cat[logical]
        n = t.shape[t.split_dim]
        return [Piece(ix[logical], 0, n, 0, n, 0)]

    def column(logical: str, parts: int, k: int, base: int = 0, dim: int | None = None, off: int = 0) -> Piece:
        """Part k of ``parts`` along the split dimension."""
        t = cat[logical]
        lo, hi = even_part(t.shape[t.split_dim], parts, k)
        return Piece(ix[logical], lo, hi, base, hi - lo if dim is None else dim, off)

    def vocab_rows(logical: str) -> tuple[tuple[int, int], list[Piece]]:
        vp = padded_vocab(spec.vocab_size, layout.vocab_divisible_by * tp) // tp
        lo = tp_rank * vp
        hi = min(lo + vp, spec.vocab_size)
        pieces = [Piece(ix[logical], lo, hi, 0, vp, 0)] if hi > lo else []
        return (vp, H), pieces

    chunks = layout.chunk_layers(spec.num_layers)[pp_rank]
    first, last = pp_rank == 0, pp_rank == layout.pp - 1
    for v, layers in enumerate(chunks):
        _chunk(spec, cat, layout, tp_rank, etp_rank, ep_rank, chunk_prefix(layout.vpp, v), layers,
               first and v == 0, last and v == len(chunks) - 1, local, whole, column, vocab_rows)
    return tuple(out)


def _chunk(spec, cat, layout, tp_rank, etp_rank, ep_rank, prefix, layers, pre, post, local, whole, column,
           vocab_rows) -> None:
    """One model chunk: embedding (``pre``), the decoder layers ``layers``, final norm and output (``post``)."""
    tp, H = layout.tp, spec.hidden_size
    if pre:
        shape, pieces = vocab_rows("model.embed_tokens.weight")
        local(f"{prefix}embedding.word_embeddings.weight", shape, pieces)
    moe = set(spec.moe_layers)
    for j, i in enumerate(layers):
        hf, mg = f"model.layers.{i}", f"{prefix}decoder.layers.{j}"
        local(f"{mg}.input_layernorm.weight", (H,), whole(f"{hf}.input_layernorm.weight"))
        if spec.is_mla:
            _mla(spec, cat, layout, tp_rank, hf, mg, local, whole, column)
        else:
            _gqa(spec, cat, tp, tp_rank, hf, mg, local, whole, column)
        local(f"{mg}.pre_mlp_layernorm.weight", (H,), whole(f"{hf}.post_attention_layernorm.weight"))
        if i in moe:
            E, Im = spec.num_experts, spec.moe_intermediate_size
            router = router_prefix(spec, i)
            local(f"{mg}.mlp.router.weight", (E, H), whole(f"{router}.weight"))
            if spec.router_bias:
                local(f"{mg}.mlp.router.expert_bias", (E,), whole(f"{router}.e_score_correction_bias"), "float32")
            per_rank, etp = E // layout.ep, layout.etp
            ims = Im // etp
            for k in range(per_rank):
                gate, up, down = expert_names(spec, i, ep_rank * per_rank + k)
                p = f"{mg}.mlp.experts.local_experts.{k}"
                local(f"{p}.linear_fc1.weight", (2 * ims, H),
                      [column(gate, etp, etp_rank, dim=2 * ims), column(up, etp, etp_rank, dim=2 * ims, off=ims)])
                local(f"{p}.linear_fc2.weight", (H, ims), [column(down, etp, etp_rank)])
            if spec.num_shared_experts:
                _gated_mlp(cat, tp, tp_rank, f"{hf}.mlp.shared_experts", f"{mg}.mlp.shared_experts", H, local, column)
        else:
            _gated_mlp(cat, tp, tp_rank, f"{hf}.mlp", f"{mg}.mlp", H, local, column)
    if post:
        local(f"{prefix}decoder.final_layernorm.weight", (H,), whole("model.norm.weight"))
        if not spec.tie_word_embeddings:
            shape, pieces = vocab_rows("lm_head.weight")
            local(f"{prefix}output_layer.weight", shape, pieces)
        elif layout.pp > 1:
            shape, pieces = vocab_rows("model.embed_tokens.weight")
            local(f"{prefix}output_layer.weight", shape, pieces)


def _gated_mlp(cat, tp, tp_rank, hf, mg, H, local, column) -> None:
    inter = cat[f"{hf}.gate_proj.weight"].shape[0] // tp
    local(f"{mg}.linear_fc1.weight", (2 * inter, H),
          [column(f"{hf}.gate_proj.weight", tp, tp_rank, dim=2 * inter),
           column(f"{hf}.up_proj.weight", tp, tp_rank, dim=2 * inter, off=inter)])
    local(f"{mg}.linear_fc2.weight", (H, inter), [column(f"{hf}.down_proj.weight", tp, tp_rank)])


def _gqa(spec, cat, tp, tp_rank, hf, mg, local, whole, column) -> None:
    """linear_qkv with per-query-group interleaving [q of group; k; v]."""
    d, H = spec.head_dim, spec.hidden_size
    groups = spec.num_kv_heads // tp
    q_per_group = spec.num_heads // spec.num_kv_heads
    rows_per_group = (q_per_group + 2) * d
    rows = groups * rows_per_group
    a = f"{hf}.self_attn"
    ix = cat.index
    names = ["weight", "bias"] if spec.qkv_bias else ["weight"]
    for kind in names:
        pieces = []
        for g in range(groups):
            G = tp_rank * groups + g
            base_off = g * rows_per_group
            pieces.append(Piece(ix[f"{a}.q_proj.{kind}"], G * q_per_group * d, (G + 1) * q_per_group * d, 0, rows, base_off))
            pieces.append(Piece(ix[f"{a}.k_proj.{kind}"], G * d, (G + 1) * d, 0, rows, base_off + q_per_group * d))
            pieces.append(Piece(ix[f"{a}.v_proj.{kind}"], G * d, (G + 1) * d, 0, rows, base_off + (q_per_group + 1) * d))
        local(f"{mg}.self_attention.linear_qkv.{kind}", (rows, H) if kind == "weight" else (rows,), pieces)
    if spec.qk_norm:
        local(f"{mg}.self_attention.q_layernorm.weight", (d,), whole(f"{a}.q_norm.weight"))
        local(f"{mg}.self_attention.k_layernorm.weight", (d,), whole(f"{a}.k_norm.weight"))
    q = spec.num_heads * d // tp
    local(f"{mg}.self_attention.linear_proj.weight", (H, q), [column(f"{a}.o_proj.weight", tp, tp_rank)])


def _mla(spec, cat, layout, tp_rank, hf, mg, local, whole, column) -> None:
    """Multi-latent attention as the local spec builds it: every projection column-parallel
    (the down projections too, gathered in forward), the latent norms replicated."""
    tp, H = layout.tp, spec.hidden_size
    a, s = f"{hf}.self_attn", f"{mg}.self_attention"
    heads = spec.num_heads // tp
    if spec.q_lora_rank is None:
        local(f"{s}.linear_q_proj.weight", (heads * spec.qk_head_dim, H), [column(f"{a}.q_proj.weight", tp, tp_rank)])
    else:
        local(f"{s}.linear_q_down_proj.weight", (spec.q_lora_rank // tp, H), [column(f"{a}.q_a_proj.weight", tp, tp_rank)])
        local(f"{s}.linear_q_up_proj.weight", (heads * spec.qk_head_dim, spec.q_lora_rank),
              [column(f"{a}.q_b_proj.weight", tp, tp_rank)])
        local(f"{s}.q_layernorm.weight", (spec.q_lora_rank,), whole(f"{a}.q_a_layernorm.weight"))
    kv_a = spec.kv_lora_rank + spec.qk_rope_head_dim
    local(f"{s}.linear_kv_down_proj.weight", (kv_a // tp, H), [column(f"{a}.kv_a_proj_with_mqa.weight", tp, tp_rank)])
    local(f"{s}.linear_kv_up_proj.weight", (heads * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank),
          [column(f"{a}.kv_b_proj.weight", tp, tp_rank)])
    local(f"{s}.kv_layernorm.weight", (spec.kv_lora_rank,), whole(f"{a}.kv_a_layernorm.weight"))
    local(f"{s}.linear_proj.weight", (H, heads * spec.v_head_dim), [column(f"{a}.o_proj.weight", tp, tp_rank)])
