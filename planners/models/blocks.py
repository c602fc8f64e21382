"""The kinds of block a decoder layer is made of, each with the sizes that decide its tensors.

Attention is :class:`GQA` (grouped-query, fused into one QKV projection by the engine) or :class:`MLA`
(DeepSeek's multi-latent attention). The MLP of a layer is :class:`DenseMLP` (SwiGLU) or :class:`MoE`
(routed experts, optional shared experts, a softmax or sigmoid router with an optional correction
bias). Any attention kind goes with any MLP kind: a GQA model with DeepSeek-style MoE (GLM-4.5) is
``GQA`` + ``MoE(router="sigmoid", router_bias=True, num_shared_experts=1)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["GQA", "MLA", "DenseMLP", "MoE", "Names", "VllmTraits"]


@dataclass(frozen=True)
class GQA:
    """Grouped-query attention: ``num_heads`` query heads share ``num_kv_heads`` key/value heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    qkv_bias: bool = False
    qk_norm: bool = False  # RMSNorm over each head of q and k (Qwen3, optional in GLM-4.5)
    rotary_dim: int = 0  # leading dimensions of each head that RoPE rotates (GLM: half); 0: all of them


@dataclass(frozen=True)
class MLA:
    """Multi-latent attention: low-rank q (``q_lora_rank``; None: a full q projection) and kv."""

    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class DenseMLP:
    """A gated MLP (gate, up, down projections)."""

    intermediate_size: int


@dataclass(frozen=True)
class MoE:
    """Routed experts of ``intermediate_size`` each, and ``num_shared_experts`` always-on experts fused
    into one gated MLP of ``num_shared_experts * intermediate_size``."""

    num_experts: int
    intermediate_size: int
    top_k: int = 0
    num_shared_experts: int = 0
    router: Literal["softmax", "sigmoid"] = "softmax"
    router_bias: bool = False  # DeepSeek's e_score_correction_bias: added to the scores for choosing experts
    router_dtype: str | None = None  # the router weight's dtype where it is not the model's (GLM-4.5: float32)
    norm_topk_prob: bool = False  # renormalize the chosen experts' weights to sum to one
    n_group: int = 1  # expert groups; a token picks experts from its topk_group best groups
    topk_group: int = 1
    routed_scaling_factor: float = 1.0  # multiplies the routed experts' weights (after normalizing)

    @property
    def shared_intermediate_size(self) -> int:
        return self.intermediate_size * self.num_shared_experts


@dataclass(frozen=True)
class Names:
    """How a family's checkpoint names its MoE tensors (everything else is named alike by every family)."""

    moe_block: str = "mlp"  # model.layers.{i}.{moe_block}.gate / .experts (Mixtral: block_sparse_moe)
    expert_projections: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")  # Mixtral: w1, w3, w2


@dataclass(frozen=True)
class VllmTraits:
    """What vLLM's model class of a family does with a layout, where families differ."""

    io_on_every_stage: bool = False  # embeddings, final norm and head on every PP stage (not first/last only)
    moe_layer_on_every_stage: bool = False  # refuses a PP stage holding no MoE layer ("No ... layer found")
    tp_at_most_experts: bool = False  # refuses inference.tp above the routed experts
