"""Model specs and the catalog of logical tensors, named as Hugging Face checkpoints name them.

``ModelSpec.from_hf_config`` reads a ``config.json`` dict of the families ``llama`` (and the
dense ``qwen2``/``qwen3``), ``qwen3_moe``, ``mixtral`` and ``deepseek_v3`` (also ``kimi_k2``).
``catalog(spec)`` lists every logical tensor with its shape, dtype and the dimension along which
tensor parallelism splits it (the same dimension on the trainer and the engine side).
DeepSeek's multi-token-prediction layers are not part of the policy the engine serves and are
left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

__all__ = ["ModelSpec", "LogicalTensor", "Catalog", "catalog", "ModelError", "DTYPES"]


class ModelError(ValueError):
    """A model config the planner cannot use; the message names the field."""


DTYPES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}
_FAMILY_ALIASES = {
    "llama": "llama",
    "qwen2": "llama",
    "qwen3": "llama",
    "mistral": "llama",
    "qwen3_moe": "qwen3_moe",
    "mixtral": "mixtral",
    "deepseek_v3": "deepseek_v3",
    "kimi_k2": "deepseek_v3",
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything about a model's architecture that decides tensor names and shapes."""

    family: str  # llama | qwen3_moe | mixtral | deepseek_v3
    hidden_size: int
    num_layers: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # dense MLP width (dense layers)
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    dtype: str = "bfloat16"
    # MoE
    num_experts: int = 0
    moe_intermediate_size: int = 0
    moe_layers: tuple[int, ...] = ()
    num_shared_experts: int = 0
    router_bias: bool = False  # DeepSeek's e_score_correction_bias
    # MLA (DeepSeek-V3)
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Routing details the engine needs (no tensors of their own)
    num_experts_per_tok: int = 0
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = False
    # What a forward pass needs (no tensors of their own)
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    model_type: str = ""

    def __post_init__(self) -> None:
        if self.family not in ("llama", "qwen3_moe", "mixtral", "deepseek_v3"):
            raise ModelError(f"model.family {self.family!r} is not supported (llama, qwen3_moe, mixtral, deepseek_v3)")
        if self.dtype not in DTYPES:
            raise ModelError(f"model.torch_dtype {self.dtype!r} is not supported; use one of {sorted(DTYPES)}")
        for name in ("hidden_size", "num_layers", "vocab_size", "num_heads", "num_kv_heads", "head_dim"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ModelError(f"model.{name} must be a positive integer, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ModelError(
                f"model.num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        if self.moe_layers and (self.num_experts < 1 or self.moe_intermediate_size < 1):
            raise ModelError("model: MoE layers need num_experts >= 1 and moe_intermediate_size >= 1")
        bad = [i for i in self.moe_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ModelError(f"model: MoE layer indices {bad} outside [0, {self.num_layers})")

    @property
    def is_moe(self) -> bool:
        return bool(self.moe_layers)

    @property
    def is_mla(self) -> bool:
        return self.family == "deepseek_v3"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype]

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelSpec":
        """Build a spec from a Hugging Face ``config.json`` dict."""
        if not isinstance(cfg, dict):
            raise ModelError(f"model config must be a mapping, got {type(cfg).__name__}")
        model_type = cfg.get("model_type")
        if model_type not in _FAMILY_ALIASES:
            raise ModelError(
                f"model.model_type {model_type!r} is not supported; use one of {sorted(_FAMILY_ALIASES)}"
            )
        family = _FAMILY_ALIASES[model_type]

        def need(key: str) -> Any:
            if key not in cfg:
                raise ModelError(f"model.{key} is required for model_type {model_type!r}")
            return cfg[key]

        hidden = need("hidden_size")
        layers = need("num_hidden_layers")
        heads = need("num_attention_heads")
        common = dict(
            family=family,
            model_type=model_type,
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=need("vocab_size"),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or (hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else 0),
            intermediate_size=cfg.get("intermediate_size", 0),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            dtype=str(cfg.get("torch_dtype", cfg.get("dtype", "bfloat16"))).replace("torch.", ""),
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) or 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", family == "mixtral")),
            rope_theta=float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta") or 10000.0),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        )
        if family == "llama":
            return cls(
                **common,
                qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
                qk_norm=model_type == "qwen3",
            )
        if family == "qwen3_moe":
            experts = need("num_experts")
            step = cfg.get("decoder_sparse_step", 1) or 1
            dense_only = set(cfg.get("mlp_only_layers", []) or [])
            moe = tuple(i for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
            return cls(
                **common,
                qkv_bias=bool(cfg.get("attention_bias", False)),
                qk_norm=True,
                num_experts=experts,
                moe_intermediate_size=need("moe_intermediate_size"),
                moe_layers=moe,
            )
        if family == "mixtral":
            common["intermediate_size"] = 0
            return cls(
                **common,
                num_experts=need("num_local_experts"),
                moe_intermediate_size=need("intermediate_size"),
                moe_layers=tuple(range(layers)),
            )
        # deepseek_v3 / kimi_k2
        first_dense = cfg.get("first_k_dense_replace", 0) or 0
        freq = cfg.get("moe_layer_freq", 1) or 1
        experts = need("n_routed_experts")
        moe = tuple(i for i in range(first_dense, layers) if experts and i % freq == 0)
        common["num_kv_heads"] = heads  # MLA has no GQA; every head has its own k/v
        common["head_dim"] = need("v_head_dim")
        return cls(
            **common,
            num_experts=experts,
            moe_intermediate_size=need("moe_intermediate_size"),
            moe_layers=moe,
            num_shared_experts=cfg.get("n_shared_experts", 0) or 0,
            router_bias=cfg.get("topk_method", "noaux_tc") == "noaux_tc",
            q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=need("kv_lora_rank"),
            qk_nope_head_dim=need("qk_nope_head_dim"),
            qk_rope_head_dim=need("qk_rope_head_dim"),
            v_head_dim=need("v_head_dim"),
            n_group=cfg.get("n_group", 1) or 1,
            topk_group=cfg.get("topk_group", 1) or 1,
        )


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


def expert_names(spec: ModelSpec, layer: int, expert: int) -> tuple[str, str, str]:
    """HF names of a routed expert's (gate, up, down) projections."""
    if spec.family == "mixtral":
        p = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
    p = f"model.layers.{layer}.mlp.experts.{expert}"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def router_prefix(spec: ModelSpec, layer: int) -> str:
    """HF name prefix of a MoE layer's router (``...mlp.gate``)."""
    block = "block_sparse_moe" if spec.family == "mixtral" else "mlp"
    return f"model.layers.{layer}.{block}.gate"


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
        if spec.is_mla:
            nh = spec.num_heads
            if spec.q_lora_rank is None:
                add("self_attn.q_proj.weight", (nh * spec.qk_head_dim, H))
            else:
                add("self_attn.q_a_proj.weight", (spec.q_lora_rank, H))
                add("self_attn.q_a_layernorm.weight", (spec.q_lora_rank,))
                add("self_attn.q_b_proj.weight", (nh * spec.qk_head_dim, spec.q_lora_rank))
            add("self_attn.kv_a_proj_with_mqa.weight", (spec.kv_lora_rank + spec.qk_rope_head_dim, H))
            add("self_attn.kv_a_layernorm.weight", (spec.kv_lora_rank,))
            add("self_attn.kv_b_proj.weight", (nh * (spec.qk_nope_head_dim + spec.v_head_dim), spec.kv_lora_rank))
            add("self_attn.o_proj.weight", (H, nh * spec.v_head_dim), 1)
        else:
            q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
            add("self_attn.q_proj.weight", (q, H))
            add("self_attn.k_proj.weight", (kv, H))
            add("self_attn.v_proj.weight", (kv, H))
            if spec.qkv_bias:
                add("self_attn.q_proj.bias", (q,))
                add("self_attn.k_proj.bias", (kv,))
                add("self_attn.v_proj.bias", (kv,))
            if spec.qk_norm:
                add("self_attn.q_norm.weight", (spec.head_dim,))
                add("self_attn.k_norm.weight", (spec.head_dim,))
            add("self_attn.o_proj.weight", (H, q), 1)
        add("post_attention_layernorm.weight", (H,))
        if i in moe:
            E, Im = spec.num_experts, spec.moe_intermediate_size
            router = router_prefix(spec, i)[len(p) + 1 :]
            add(f"{router}.weight", (E, H))
            if spec.router_bias:
                add(f"{router}.e_score_correction_bias", (E,), dtype="float32")
            for e in range(E):
                gate, up, down = (n[len(p) + 1 :] for n in expert_names(spec, i, e))
                add(gate, (Im, H), expert=e)
                add(up, (Im, H), expert=e)
                add(down, (H, Im), 1, expert=e)
            if spec.num_shared_experts:
                Is = Im * spec.num_shared_experts
                add("mlp.shared_experts.gate_proj.weight", (Is, H))
                add("mlp.shared_experts.up_proj.weight", (Is, H))
                add("mlp.shared_experts.down_proj.weight", (H, Is), 1)
        else:
            if spec.intermediate_size < 1:
                raise ModelError(f"model.intermediate_size is required: layer {i} is a dense MLP layer")
            I = spec.intermediate_size
            add("mlp.gate_proj.weight", (I, H))
            add("mlp.up_proj.weight", (I, H))
            add("mlp.down_proj.weight", (H, I), 1)
    out.append(LogicalTensor("model.norm.weight", (H,), dt))
    if not spec.tie_word_embeddings:
        out.append(LogicalTensor("lm_head.weight", (spec.vocab_size, H), dt))
    return Catalog(out)
