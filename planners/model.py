"""Model specs and the catalog of logical tensors, named as Hugging Face checkpoints name them.

``ModelSpec.from_hf_config`` reads a ``config.json`` dict of the families ``llama`` (and the
dense ``qwen2``/``qwen3``), ``qwen3_moe``, ``mixtral`` and ``deepseek_v3`` (also ``kimi_k2``).
``catalog(spec)`` lists every logical tensor with its shape, dtype and the dimension along which
tensor parallelism splits it (the same dimension on the trainer and the engine side).
DeepSeek's multi-token-prediction layers are not part of the policy the engine serves and are
left out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from math import prod
from typing import Any, Callable

from planners.errors import ModelError

__all__ = ["ModelSpec", "LogicalTensor", "Catalog", "catalog", "ModelError", "DTYPES", "hf_keys"]


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


# -- Hugging Face config keys: what each must be ---------------------------------------------

def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# kind -> (what a valid value is, in words; test)
_KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "pos_int": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "nonneg_int": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "bool": ("a boolean (true or false)", lambda v: isinstance(v, bool)),
    "pos_float": ("a positive finite number", lambda v: _is_number(v) and math.isfinite(v) and v > 0),
    "str": ("a string", lambda v: isinstance(v, str)),
    "mapping": ("a mapping", lambda v: isinstance(v, dict)),
    "layer_list": ("a list of layer indices (non-negative integers)",
                   lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) and x >= 0 for x in v)),
}
REQUIRED = object()  # default of a key that must be given

# HF key -> (kind, default); a null value counts as absent (the default applies)
_COMMON_KEYS: dict[str, tuple[str, Any]] = {
    "hidden_size": ("pos_int", REQUIRED),
    "num_hidden_layers": ("pos_int", REQUIRED),
    "num_attention_heads": ("pos_int", REQUIRED),
    "vocab_size": ("pos_int", REQUIRED),
    "num_key_value_heads": ("pos_int", None),  # None: num_attention_heads (no GQA)
    "head_dim": ("pos_int", None),  # None: hidden_size // num_attention_heads
    "intermediate_size": ("nonneg_int", 0),  # required (positive) where a layer has a dense MLP
    "tie_word_embeddings": ("bool", False),
    "torch_dtype": ("str", None),
    "dtype": ("str", None),  # transformers >= 4.56 writes dtype instead of torch_dtype
    "num_experts_per_tok": ("nonneg_int", 0),
    "norm_topk_prob": ("bool", None),  # None: True for mixtral, else False
    "rope_theta": ("pos_float", None),
    "rope_parameters": ("mapping", None),  # transformers >= 5 keeps rope_theta in here
    "rms_norm_eps": ("pos_float", 1e-6),
}
_FAMILY_KEYS: dict[str, dict[str, tuple[str, Any]]] = {
    "llama": {
        "intermediate_size": ("pos_int", REQUIRED),
        "attention_bias": ("bool", None),  # None: True for qwen2
    },
    "qwen3_moe": {
        "attention_bias": ("bool", False),
        "num_experts": ("nonneg_int", REQUIRED),
        "moe_intermediate_size": ("pos_int", REQUIRED),
        "decoder_sparse_step": ("pos_int", 1),
        "mlp_only_layers": ("layer_list", ()),
    },
    "mixtral": {
        "intermediate_size": ("pos_int", REQUIRED),  # the experts' width
        "num_local_experts": ("pos_int", REQUIRED),
    },
    "deepseek_v3": {
        "n_routed_experts": ("nonneg_int", REQUIRED),
        "moe_intermediate_size": ("pos_int", REQUIRED),
        "first_k_dense_replace": ("nonneg_int", 0),
        "moe_layer_freq": ("pos_int", 1),
        "n_shared_experts": ("nonneg_int", 0),
        "topk_method": ("str", "noaux_tc"),
        "q_lora_rank": ("pos_int", None),  # None: no q compression (q_proj)
        "kv_lora_rank": ("pos_int", REQUIRED),
        "qk_nope_head_dim": ("pos_int", REQUIRED),
        "qk_rope_head_dim": ("pos_int", REQUIRED),
        "v_head_dim": ("pos_int", REQUIRED),
        "n_group": ("pos_int", 1),
        "topk_group": ("pos_int", 1),
    },
}


# Largest values the planner takes (a catalog of that many layers or experts would not fit anyway)
MAX_DIM = 1 << 24  # any width, head count or vocabulary
MAX_COUNT = {"num_hidden_layers": 1 << 14, "num_experts": 1 << 14, "num_local_experts": 1 << 14,
             "n_routed_experts": 1 << 14}
MAX_EXPERT_TENSORS = 1 << 22  # MoE layers x routed experts


# the keys that decide which layers are MoE layers
MOE_KEYS: dict[str, tuple[str, ...]] = {
    "llama": (),
    "qwen3_moe": ("num_experts", "decoder_sparse_step", "mlp_only_layers"),
    "mixtral": ("num_local_experts",),
    "deepseek_v3": ("n_routed_experts", "first_k_dense_replace", "moe_layer_freq"),
}


def hf_keys(family: str) -> dict[str, tuple[str, Any]]:
    """The config.json keys the planner reads for ``family``: key -> (kind, default)."""
    return {**_COMMON_KEYS, **_FAMILY_KEYS[family]}


def _read_keys(cfg: dict[str, Any], table: dict[str, tuple[str, Any]], path: Callable[[str], str],
               model_type: str) -> dict[str, Any]:
    """Every key of ``table`` from ``cfg``, checked against its kind (defaults for absent keys)."""
    out: dict[str, Any] = {}
    for key, (kind, default) in table.items():
        value = cfg.get(key)
        what, ok = _KINDS[kind]
        if value is None:
            if default is REQUIRED:
                raise ModelError(f"{path(key)} is required for model_type {model_type!r}; give {what}")
            out[key] = default
        elif not ok(value):
            raise ModelError(f"{path(key)} must be {what}, got {value!r}")
        elif _is_int(value) and value > MAX_COUNT.get(key, MAX_DIM):
            raise ModelError(f"{path(key)} must be at most {MAX_COUNT.get(key, MAX_DIM)}, got {value!r}")
        else:
            out[key] = value
    return out


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
    def from_hf_config(cls, cfg: dict[str, Any], where: str = "model.hf_config",
                       overrides: dict[str, Any] | None = None, overrides_where: str = "model.overrides") -> "ModelSpec":
        """Build a spec from a Hugging Face ``config.json`` dict (``overrides`` replace its keys).

        Every key the planner reads is checked against :data:`HF_KEYS` before it is used; errors
        name the key as ``{where}.{key}`` (``{overrides_where}.{key}`` for an override) and say what
        would be valid. A null value counts as absent, as in Hugging Face configs.
        """
        if not isinstance(cfg, dict):
            raise ModelError(f"{where} must be a mapping of config.json keys, got {type(cfg).__name__}")
        overrides = dict(overrides or {})
        cfg = {**cfg, **overrides}

        def path(key: str) -> str:
            return f"{overrides_where}.{key}" if key in overrides else f"{where}.{key}"

        model_type = cfg.get("model_type")
        if not isinstance(model_type, str) or model_type not in _FAMILY_ALIASES:
            got = "is required" if model_type is None else f"{model_type!r} is not supported"
            raise ModelError(f"{path('model_type')} {got}; use one of {sorted(_FAMILY_ALIASES)}")
        family = _FAMILY_ALIASES[model_type]
        table = hf_keys(family)
        unknown = sorted(k for k in overrides if k not in table and k != "model_type")
        if unknown:
            raise ModelError(f"{overrides_where}.{unknown[0]}: unknown key for model_type {model_type!r}; "
                             f"known keys: {', '.join(sorted(table))}")
        v = _read_keys(cfg, table, path, model_type)

        layers, heads, hidden = v["num_hidden_layers"], v["num_attention_heads"], v["hidden_size"]
        dtype_key = "torch_dtype" if v["torch_dtype"] is not None else "dtype"
        dtype = (v[dtype_key] or "bfloat16").replace("torch.", "")
        if dtype not in DTYPES:
            raise ModelError(f"{path(dtype_key)} {v[dtype_key]!r} is not supported; use one of {sorted(DTYPES)}")
        rope_theta = v["rope_theta"]
        if rope_theta is None and v["rope_parameters"] is not None and "rope_theta" in v["rope_parameters"]:
            rope_theta = v["rope_parameters"]["rope_theta"]
            if not _KINDS["pos_float"][1](rope_theta):
                raise ModelError(f"{path('rope_parameters')}.rope_theta must be {_KINDS['pos_float'][0]}, got {rope_theta!r}")
        common = dict(
            family=family,
            model_type=model_type,
            hidden_size=hidden,
            num_layers=layers,
            vocab_size=v["vocab_size"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=0,
            intermediate_size=v["intermediate_size"],
            tie_word_embeddings=v["tie_word_embeddings"],
            dtype=dtype,
            num_experts_per_tok=v["num_experts_per_tok"],
            norm_topk_prob=family == "mixtral" if v["norm_topk_prob"] is None else v["norm_topk_prob"],
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_norm_eps=float(v["rms_norm_eps"]),
        )

        def check_size(moe: tuple[int, ...], experts_key: str) -> None:
            if len(moe) * v[experts_key] > MAX_EXPERT_TENSORS:
                raise ModelError(f"{len(moe)} MoE layers x {path(experts_key)} ({v[experts_key]}) routed experts is more "
                                 f"than the planner takes (at most {MAX_EXPERT_TENSORS}); check {path('num_hidden_layers')}")

        def need_dense_width(moe: tuple[int, ...]) -> None:
            dense = [i for i in range(layers) if i not in set(moe)]
            if dense and v["intermediate_size"] < 1:
                raise ModelError(f"{path('intermediate_size')} must be a positive integer: layers "
                                 f"{dense[:8]} are dense MLP layers, got {v['intermediate_size']!r}")

        if family != "deepseek_v3":  # MLA has no GQA; every head has its own k/v
            kv = heads if v["num_key_value_heads"] is None else v["num_key_value_heads"]
            if heads % kv:
                raise ModelError(f"{path('num_attention_heads')} ({heads}) must be a multiple of "
                                 f"{path('num_key_value_heads')} ({kv})")
            head_dim = v["head_dim"]
            if head_dim is None:
                head_dim = hidden // heads
                if head_dim < 1:
                    raise ModelError(f"{path('head_dim')} is required when {path('hidden_size')} ({hidden}) < "
                                     f"{path('num_attention_heads')} ({heads}); give a positive integer")
            common.update(num_kv_heads=kv, head_dim=head_dim)

        if family == "llama":
            bias = v["attention_bias"]
            return cls(**common, qkv_bias=model_type == "qwen2" if bias is None else bias, qk_norm=model_type == "qwen3")
        if family == "qwen3_moe":
            experts, step, dense_only = v["num_experts"], v["decoder_sparse_step"], set(v["mlp_only_layers"])
            outside = sorted(i for i in dense_only if i >= layers)
            if outside:
                raise ModelError(f"{path('mlp_only_layers')} holds layer indices {outside[:8]} outside "
                                 f"[0, {layers}) ({path('num_hidden_layers')})")
            moe = tuple(i for i in range(layers) if i not in dense_only and experts > 0 and (i + 1) % step == 0)
            check_size(moe, "num_experts")
            need_dense_width(moe)
            return cls(**common, qkv_bias=v["attention_bias"], qk_norm=True, num_experts=experts,
                       moe_intermediate_size=v["moe_intermediate_size"], moe_layers=moe)
        if family == "mixtral":
            check_size(tuple(range(layers)), "num_local_experts")
            common["intermediate_size"] = 0
            return cls(**common, num_experts=v["num_local_experts"], moe_intermediate_size=v["intermediate_size"],
                       moe_layers=tuple(range(layers)))
        # deepseek_v3 / kimi_k2
        experts, first_dense, freq = v["n_routed_experts"], v["first_k_dense_replace"], v["moe_layer_freq"]
        moe = tuple(i for i in range(first_dense, layers) if experts and i % freq == 0)
        check_size(moe, "n_routed_experts")
        need_dense_width(moe)
        common["head_dim"] = v["v_head_dim"]
        return cls(
            **common,
            num_experts=experts,
            moe_intermediate_size=v["moe_intermediate_size"],
            moe_layers=moe,
            num_shared_experts=v["n_shared_experts"],
            router_bias=v["topk_method"] == "noaux_tc",
            q_lora_rank=v["q_lora_rank"],
            kv_lora_rank=v["kv_lora_rank"],
            qk_nope_head_dim=v["qk_nope_head_dim"],
            qk_rope_head_dim=v["qk_rope_head_dim"],
            v_head_dim=v["v_head_dim"],
            n_group=v["n_group"],
            topk_group=v["topk_group"],
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
