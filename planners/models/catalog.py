"""The catalog of a model: every logical tensor, named as Hugging Face checkpoints name them.

``catalog(spec)`` lists every tensor with its shape, dtype and the dimension along which tensor
parallelism splits it (the same dimension on the trainer and the engine side), built from the kinds
of the model's blocks. DeepSeek's and GLM's multi-token-prediction layers are not part of the policy
the engine serves and are left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from math import prod

import numpy as np

from planners.models.blocks import GQA, MLA
from planners.models.spec import DTYPES, ModelSpec

__all__ = ["LogicalTensor", "Catalog", "catalog", "expert_names", "router_prefix"]


@dataclass(frozen=True)
class LogicalTensor:
    """One tensor of the model as the checkpoint names it.

    ``split_dim`` is the dimension both sides shard it along (0 for replicated tensors).
    ``layer`` is the decoder layer (-1 for embedding, final norm and head); ``expert`` the
    routed expert it belongs to (-1 for others).
    """

    name: str
    shape: tuple[int, ...]
    dtype: str
    split_dim: int = 0
    layer: int = -1
    expert: int = -1

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPES[self.dtype]

    @property
    def outer(self) -> int:
        """Elements before the split dimension (rows of the strided view)."""
        return prod(self.shape[: self.split_dim])

    @property
    def inner(self) -> int:
        """Elements after the split dimension (contiguous run per split index)."""
        return prod(self.shape[self.split_dim + 1 :])

    @property
    def row_bytes(self) -> int:
        """Bytes per index along the split dimension."""
        return prod(self.shape) // self.shape[self.split_dim] * DTYPES[self.dtype]


@dataclass(eq=False)  # hashed by identity: shard rules cache on it
class Catalog:
    """Logical tensors in a fixed order; ``index[name]`` is a tensor's id."""

    tensors: list[LogicalTensor]
    index: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {t.name: i for i, t in enumerate(self.tensors)}

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, key: int | str) -> LogicalTensor:
        return self.tensors[self.index[key] if isinstance(key, str) else key]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @cached_property
    def table(self) -> "TensorTable":
        """Every tensor's sizes as arrays by tensor id (computed once)."""
        return TensorTable.of(self.tensors)


@dataclass(frozen=True, eq=False)
class TensorTable:
    """Every tensor's sizes as arrays by tensor id (int64): vectorized code indexes them by chunk."""

    itemsize: np.ndarray
    outer: np.ndarray  # elements before the split dimension
    inner: np.ndarray  # elements after it
    row_bytes: np.ndarray  # bytes of one index along it
    expert: np.ndarray  # the routed expert a tensor belongs to, -1 for others

    @classmethod
    def of(cls, tensors: list[LogicalTensor]) -> "TensorTable":
        itemsize = np.array([DTYPES[t.dtype] for t in tensors], dtype=np.int64)
        outer = np.array([t.outer for t in tensors], dtype=np.int64)
        inner = np.array([t.inner for t in tensors], dtype=np.int64)
        return cls(itemsize, outer, inner, np.array([t.row_bytes for t in tensors], dtype=np.int64),
                   np.array([t.expert for t in tensors], dtype=np.int64))


def expert_names(spec: ModelSpec, layer: int, expert: int) -> tuple[str, str, str]:
    """HF names of a routed expert's (gate, up, down) projections."""
    names = spec.names
    p = f"model.layers.{layer}.{names.moe_block}.experts.{expert}."
    gate, up, down = names.expert_projections  # plain concatenation: planning calls this ~100,000 times
    return p + gate + ".weight", p + up + ".weight", p + down + ".weight"


def router_prefix(spec: ModelSpec, layer: int) -> str:
    """HF name prefix of a MoE layer's router (``...mlp.gate``)."""
    return f"model.layers.{layer}.{spec.names.moe_block}.gate"


def catalog(spec: ModelSpec) -> Catalog:
    """Every logical tensor of ``spec``, in checkpoint order (embedding, layers, norm, head)."""
    H, dt = spec.hidden_size, spec.dtype
    out: list[LogicalTensor] = [LogicalTensor("model.embed_tokens.weight", (spec.vocab_size, H), dt)]
    moe = set(spec.moe_layers)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"

        def add(name: str, shape: tuple[int, ...], split_dim: int = 0, dtype: str = dt, expert: int = -1) -> None:
            out.append(LogicalTensor(f"{p}.{name}", shape, dtype, split_dim, i, expert))

        add("input_layernorm.weight", (H,))
        if isinstance(spec.attention, MLA):
            _mla(spec.attention, H, add)
        else:
            _gqa(spec.attention, H, add)
        add("post_attention_layernorm.weight", (H,))
        if i in moe:
            _moe(spec, i, add)
        else:
            _gated_mlp("mlp", spec.mlp.intermediate_size, H, add)
    out.append(LogicalTensor("model.norm.weight", (H,), dt))
    if not spec.tie_word_embeddings:
        out.append(LogicalTensor("lm_head.weight", (spec.vocab_size, H), dt))
    return Catalog(out)


def _gqa(a: GQA, H: int, add) -> None:
    q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
    add("self_attn.q_proj.weight", (q, H))
    add("self_attn.k_proj.weight", (kv, H))
    add("self_attn.v_proj.weight", (kv, H))
    if a.qkv_bias:
        add("self_attn.q_proj.bias", (q,))
        add("self_attn.k_proj.bias", (kv,))
        add("self_attn.v_proj.bias", (kv,))
    if a.qk_norm:
        add("self_attn.q_norm.weight", (a.head_dim,))
        add("self_attn.k_norm.weight", (a.head_dim,))
    add("self_attn.o_proj.weight", (H, q), 1)


def _mla(a: MLA, H: int, add) -> None:
    nh = a.num_heads
    if a.q_lora_rank is None:
        add("self_attn.q_proj.weight", (nh * a.qk_head_dim, H))
    else:
        add("self_attn.q_a_proj.weight", (a.q_lora_rank, H))
        add("self_attn.q_a_layernorm.weight", (a.q_lora_rank,))
        add("self_attn.q_b_proj.weight", (nh * a.qk_head_dim, a.q_lora_rank))
    add("self_attn.kv_a_proj_with_mqa.weight", (a.kv_lora_rank + a.qk_rope_head_dim, H))
    add("self_attn.kv_a_layernorm.weight", (a.kv_lora_rank,))
    add("self_attn.kv_b_proj.weight", (nh * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank))
    add("self_attn.o_proj.weight", (H, nh * a.v_head_dim), 1)


def _moe(spec: ModelSpec, layer: int, add) -> None:
    m, H = spec.moe, spec.hidden_size
    p = f"model.layers.{layer}."
    router = router_prefix(spec, layer)[len(p):]
    add(f"{router}.weight", (m.num_experts, H), dtype=m.router_dtype or spec.dtype)
    if m.router_bias:
        add(f"{router}.e_score_correction_bias", (m.num_experts,), dtype="float32")
    for e in range(m.num_experts):
        gate, up, down = (n[len(p):] for n in expert_names(spec, layer, e))
        add(gate, (m.intermediate_size, H), expert=e)
        add(up, (m.intermediate_size, H), expert=e)
        add(down, (H, m.intermediate_size), 1, expert=e)
    if m.num_shared_experts:
        _gated_mlp("mlp.shared_experts", m.shared_intermediate_size, H, add)


def _gated_mlp(prefix: str, width: int, H: int, add) -> None:
    add(f"{prefix}.gate_proj.weight", (width, H))
    add(f"{prefix}.up_proj.weight", (width, H))
    add(f"{prefix}.down_proj.weight", (H, width), 1)

