"""A model as the planner sees it: sizes, the kind of every block, and the per-layer pattern."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from planners.errors import ModelError
from planners.models.blocks import GQA, MLA, DenseMLP, MoE, Names, VllmTraits

__all__ = ["ModelSpec", "DTYPES"]

DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model's architecture that decides tensor names and shapes, and what a
    forward pass needs. Layers in ``moe_layers`` have the ``moe`` MLP, the others the ``mlp``."""

    family: str  # the planners.models module that read it (FAMILIES)
    model_type: str  # as config.json says (qwen2, kimi_k2, ...)
    hidden_size: int
    num_layers: int
    vocab_size: int
    attention: GQA | MLA
    mlp: DenseMLP | None = None  # the dense layers' MLP (None when every layer is MoE)
    moe: MoE | None = None
    moe_layers: tuple[int, ...] = ()
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    names: Names = Names()
    vllm: VllmTraits = VllmTraits()  # what vLLM's model class of the family does with a layout
    # the config.json keys it was read from (what a Hugging Face model of it is built from)
    config: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)
    # each key as the job spec wrote it (model.hf_config.k, model.overrides.k, model.preset[p].k), and the
    # roles "experts" (the key counting routed experts) and "shared_experts", so errors name them so
    paths: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False, repr=False)
    pattern_keys: tuple[str, ...] = field(default=(), compare=False, hash=False, repr=False)  # decide the MoE layers

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ModelError(f"model.torch_dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        for name in ("hidden_size", "num_layers", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ModelError(f"model.{name} must be a positive integer, got {v!r}")
        if isinstance(self.attention, GQA) and self.attention.num_heads % self.attention.num_kv_heads:
            raise ModelError(f"model.num_attention_heads ({self.attention.num_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.attention.num_kv_heads})")
        if self.moe_layers and (self.moe is None or self.moe.num_experts < 1 or self.moe.intermediate_size < 1):
            raise ModelError("model: MoE layers need num_experts >= 1 and moe_intermediate_size >= 1")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ModelError(f"model: MoE layer indices {bad} outside [0, {self.num_layers})")
        dense = [i for i in range(self.num_layers) if i not in set(self.moe_layers)]
        if dense and (self.mlp is None or self.mlp.intermediate_size < 1):
            raise ModelError(f"model.intermediate_size is required: layers {dense[:8]} are dense MLP layers")

    def key(self, key: str, value: Any) -> str:
        """``path=value`` of a config key (or role) as the job wrote it: what error messages name."""
        return f"{self.paths.get(key, 'model.' + key)}={value}"

    def moe_pattern(self) -> str:
        """The keys that decide which layers are MoE layers, with their values."""
        return ", ".join(self.key(k, self.config.get(k)) for k in self.pattern_keys)

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def is_mla(self) -> bool:
        return isinstance(self.attention, MLA)

    @property
    def num_experts(self) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return self.moe.num_experts if self.is_moe else 0

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]
