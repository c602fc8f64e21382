"""An independent oracle: each vLLM rank's parameters cut directly from full HF weights.

Written in the plainest way (slice and concatenate whole arrays), sharing no code with the
planner's shard rules, so that a test comparing ``plan.simulate`` with it checks both.
"""

from __future__ import annotations

import numpy as np

from planners.layouts import InferenceLayout
from planners.models import ModelSpec


def _split(x: np.ndarray, parts: int, k: int, axis: int = 0) -> np.ndarray:
    return np.split(x, parts, axis=axis)[k]


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    out = np.zeros((rows,) + x.shape[1:], dtype=x.dtype)
    out[: len(x)] = x
    return out


def _pp_layers(n: int, pp: int) -> list[list[int]]:
    sizes = [n // pp] * pp
    for j in range(n % pp):
        sizes[pp - 2 - j] += 1
    bounds = np.cumsum([0] + sizes)
    return [list(range(bounds[s], bounds[s + 1])) for s in range(pp)]


def reference_rank(spec: ModelSpec, lay: InferenceLayout, phy2log: np.ndarray | None, rank: int,
                   w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """vLLM parameters of engine-local ``rank``."""
    tp_rank = rank % lay.tp
    pp_rank = (rank // lay.tp) % lay.pp
    dp_rank = (rank // (lay.tp * lay.pp)) % lay.dp
    tp = lay.tp
    out: dict[str, np.ndarray] = {}
    mixtral = spec.family == "mixtral"
    everywhere = spec.family in ("qwen3_moe", "mixtral")  # vLLM's models of these keep io on every stage
    a_spec, m_spec = spec.attention, spec.moe
    first = pp_rank == 0 or everywhere
    last = pp_rank == lay.pp - 1 or everywhere

    vp = -(-spec.vocab_size // 64) * 64

    def vocab_shard(x: np.ndarray) -> np.ndarray:
        return _split(_pad_rows(x, vp), tp, tp_rank)

    if first or (last and spec.tie_word_embeddings):
        out["model.embed_tokens.weight"] = vocab_shard(w["model.embed_tokens.weight"])
    moe_layers = list(spec.moe_layers)
    for i in _pp_layers(spec.num_layers, lay.pp)[pp_rank]:
        p = f"model.layers.{i}"
        a = f"{p}.self_attn"
        out[f"{p}.input_layernorm.weight"] = w[f"{p}.input_layernorm.weight"]
        out[f"{p}.post_attention_layernorm.weight"] = w[f"{p}.post_attention_layernorm.weight"]
        if spec.is_mla:
            if a_spec.q_lora_rank is None:
                out[f"{a}.q_proj.weight"] = _split(w[f"{a}.q_proj.weight"], tp, tp_rank)
                out[f"{a}.kv_a_proj_with_mqa.weight"] = w[f"{a}.kv_a_proj_with_mqa.weight"]
            else:
                out[f"{a}.fused_qkv_a_proj.weight"] = np.concatenate(
                    [w[f"{a}.q_a_proj.weight"], w[f"{a}.kv_a_proj_with_mqa.weight"]])
                out[f"{a}.q_a_layernorm.weight"] = w[f"{a}.q_a_layernorm.weight"]
                out[f"{a}.q_b_proj.weight"] = _split(w[f"{a}.q_b_proj.weight"], tp, tp_rank)
            out[f"{a}.kv_a_layernorm.weight"] = w[f"{a}.kv_a_layernorm.weight"]
            out[f"{a}.kv_b_proj.weight"] = _split(w[f"{a}.kv_b_proj.weight"], tp, tp_rank)
        else:
            d = a_spec.head_dim
            kv_heads = a_spec.num_kv_heads
            kv_idx = (
                [tp_rank // (tp // kv_heads)] if tp >= kv_heads
                else list(range(tp_rank * kv_heads // tp, (tp_rank + 1) * kv_heads // tp))
            )
            for kind in ["weight", "bias"] if a_spec.qkv_bias else ["weight"]:
                q = _split(w[f"{a}.q_proj.{kind}"], tp, tp_rank)
                k = np.concatenate([w[f"{a}.k_proj.{kind}"][h * d:(h + 1) * d] for h in kv_idx])
                v = np.concatenate([w[f"{a}.v_proj.{kind}"][h * d:(h + 1) * d] for h in kv_idx])
                out[f"{a}.qkv_proj.{kind}"] = np.concatenate([q, k, v])
            if a_spec.qk_norm:
                out[f"{a}.q_norm.weight"] = w[f"{a}.q_norm.weight"]
                out[f"{a}.k_norm.weight"] = w[f"{a}.k_norm.weight"]
        out[f"{a}.o_proj.weight"] = _split(w[f"{a}.o_proj.weight"], tp, tp_rank, axis=1)

        def gated(prefix: str, parts: int, k: int) -> None:
            out[f"{prefix}.gate_up_proj.weight"] = np.concatenate(
                [_split(w[f"{prefix}.gate_proj.weight"], parts, k), _split(w[f"{prefix}.up_proj.weight"], parts, k)])
            out[f"{prefix}.down_proj.weight"] = _split(w[f"{prefix}.down_proj.weight"], parts, k, axis=1)

        if i in moe_layers:
            block = f"{p}.block_sparse_moe" if mixtral else f"{p}.mlp"
            out[f"{block}.gate.weight"] = w[f"{block}.gate.weight"]
            if m_spec.router_bias:
                out[f"{block}.gate.e_score_correction_bias"] = w[f"{block}.gate.e_score_correction_bias"]
            row = phy2log[moe_layers.index(i)] if phy2log is not None else np.arange(spec.num_experts)
            group_rank = dp_rank * tp + tp_rank
            if lay.enable_ep:
                mine = np.array_split(np.arange(len(row)), lay.dp * tp)[group_rank]
                parts, k = 1, 0
            else:
                mine, parts, k = np.arange(len(row)), lay.dp * tp, group_rank
            names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
            w13, w2 = [], []
            for slot in mine:
                e = row[slot]
                g, u, dn = (w[f"{block}.experts.{e}.{n}.weight"] for n in names)
                w13.append(np.concatenate([_split(g, parts, k), _split(u, parts, k)]))
                w2.append(_split(dn, parts, k, axis=1))
            out[f"{block}.experts.w13_weight"] = np.stack(w13)
            out[f"{block}.experts.w2_weight"] = np.stack(w2)
            if m_spec.num_shared_experts:
                gated(f"{p}.mlp.shared_experts", tp, tp_rank)
        else:
            gated(f"{p}.mlp", tp, tp_rank)
    if last:
        out["model.norm.weight"] = w["model.norm.weight"]
        if not spec.tie_word_embeddings:
            out["lm_head.weight"] = vocab_shard(w["lm_head.weight"])
    return out
