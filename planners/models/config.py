"""Reading a Hugging Face ``config.json``: every key checked against its kind before it is used.

A family module (``planners.models.llama`` and its siblings) declares a :class:`Family`: the
``model_type`` values it reads, the keys it reads beyond :data:`COMMON_KEYS` (key -> (kind, default)),
other spellings real configs use for them, and a ``build`` function that turns the checked values
(:class:`ConfigValues`) into a :class:`ModelSpec`. Errors name each key as the job wrote it
(``model.hf_config.num_experts``, ``model.overrides.num_experts``, ``model.config[path].num_experts``)
and say what would be valid. A null value counts as absent, as in Hugging Face configs, except for a key
whose kind ends in ``?``: there an explicit null is a value (DeepSeek's ``q_lora_rank: null`` is no
q compression; an absent one is transformers' default). Defaults are transformers' own, so a
``config.json`` written by ``save_pretrained`` (which leaves out keys equal to their defaults) reads the
same as the full one.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from planners.errors import ModelError
from planners.models.blocks import GQA, DenseMLP
from planners.models.spec import DTYPES, ModelSpec

__all__ = ["Family", "ConfigValues", "COMMON_KEYS", "REQUIRED", "read_config_file"]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# kind -> (what a valid value is, in words; test)
KINDS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "pos_int": ("a positive integer", lambda v: _is_int(v) and v >= 1),
    "nonneg_int": ("a non-negative integer", lambda v: _is_int(v) and v >= 0),
    "bool": ("a boolean (true or false)", lambda v: isinstance(v, bool)),
    "pos_float": ("a positive finite number", lambda v: _is_number(v) and math.isfinite(v) and v > 0),
    "fraction": ("a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1),
    "str": ("a string", lambda v: isinstance(v, str)),
    "router": ("'softmax' or 'sigmoid'", lambda v: v in ("softmax", "sigmoid")),
    "mapping": ("a mapping", lambda v: isinstance(v, dict)),
    "layer_list": ("a list of layer indices (non-negative integers)",
                   lambda v: isinstance(v, (list, tuple)) and all(_is_int(x) and x >= 0 for x in v)),
}
REQUIRED = object()  # default of a key that must be given

# HF key -> (kind, default), read for every family
COMMON_KEYS: dict[str, tuple[str, Any]] = {
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
    "norm_topk_prob": ("bool", None),  # None: the family's default
    "rope_theta": ("pos_float", None),
    "rope_parameters": ("mapping", None),  # transformers >= 5 keeps rope_theta (and partial_rotary_factor) in here
    "rms_norm_eps": ("pos_float", 1e-6),
}

# Largest values the planner takes (a catalog of that many layers or experts would not fit anyway)
MAX_DIM = 1 << 24  # any width, head count or vocabulary
MAX_COUNT = {"num_hidden_layers": 1 << 14, "num_experts": 1 << 14, "num_local_experts": 1 << 14,
             "n_routed_experts": 1 << 14}
MAX_EXPERT_TENSORS = 1 << 22  # MoE layers x routed experts


@dataclass(frozen=True)
class Family:
    """What a family module declares (see the module docstring)."""

    name: str
    model_types: tuple[str, ...]
    keys: dict[str, tuple[str, Any]]
    build: Callable[["ConfigValues"], ModelSpec]
    moe_keys: tuple[str, ...] = ()  # the keys that decide which layers are MoE layers (named in errors)
    spellings: dict[str, tuple[str, ...]] = field(default_factory=dict)  # key -> other names configs give it
    presets: dict[str, dict[str, Any]] = field(default_factory=dict)  # named configs (examples, tests, benchmarks)

    def all_keys(self) -> dict[str, tuple[str, Any]]:
        """Every config.json key this family reads: key -> (kind, default)."""
        return {**COMMON_KEYS, **self.keys}


class ConfigValues:
    """A config's keys for one family, each checked against its kind (defaults for absent keys)."""

    def __init__(self, cfg: dict[str, Any], family: Family, where: str, overrides: dict[str, Any],
                 overrides_where: str) -> None:
        self.family, self.model_type = family, cfg["model_type"]
        self.config = {**cfg, **overrides}
        self._overrides, self._where, self._overrides_where = overrides, where, overrides_where
        self._found: dict[str, str] = {}  # key -> the spelling the config used
        self.values = {key: self._read(key, kind, default) for key, (kind, default) in family.all_keys().items()}

    def path(self, key: str) -> str:
        """The key as the job spec wrote it (``model.overrides.k``, ``model.hf_config.k``, ...)."""
        key = self._found.get(key, key)
        return f"{self._overrides_where}.{key}" if key in self._overrides else f"{self._where}.{key}"

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    def _read(self, key: str, kind: str, default: Any) -> Any:
        if kind.endswith("?"):  # an explicit null is a value
            if key in self.config and self.config[key] is None:
                return None
            kind = kind[:-1]
        what, ok = KINDS[kind]
        value = self.config.get(key)
        for other in self.family.spellings.get(key, ()):
            if value is None and self.config.get(other) is not None:
                value, self._found[key] = self.config[other], other
        if value is None:
            if default is REQUIRED:
                also = "".join(f" (or {o})" for o in self.family.spellings.get(key, ()))
                raise ModelError(f"{self.path(key)}{also} is required for model_type {self.model_type!r}; give {what}")
            return default
        if not ok(value):
            raise ModelError(f"{self.path(key)} must be {what}, got {value!r}")
        if _is_int(value) and value > MAX_COUNT.get(key, MAX_DIM):
            raise ModelError(f"{self.path(key)} must be at most {MAX_COUNT.get(key, MAX_DIM)}, got {value!r}")
        return value

    def rope(self, key: str, kind: str, default: Any) -> Any:
        """A RoPE setting: top-level (transformers 4) or inside ``rope_parameters`` (transformers 5)."""
        if self.config.get(key) is not None:
            return self._read(key, kind, default)
        nested = self.values["rope_parameters"]
        if nested is None or nested.get(key) is None:
            return default
        what, ok = KINDS[kind]
        if not ok(nested[key]):
            raise ModelError(f"{self.path('rope_parameters')}.{key} must be {what}, got {nested[key]!r}")
        return nested[key]

    # -- pieces every family's build uses -------------------------------------------------------
    def common(self) -> dict[str, Any]:
        """The ModelSpec fields read the same way for every family."""
        dtype_key = "torch_dtype" if self["torch_dtype"] is not None else "dtype"
        dtype = (self[dtype_key] or "bfloat16").replace("torch.", "")
        if dtype not in DTYPES:
            raise ModelError(f"{self.path(dtype_key)} {self[dtype_key]!r} is not supported; use one of {sorted(DTYPES)}")
        paths = {key: self.path(key) for key in self.values}
        if self.family.moe_keys:
            paths["experts"] = paths[self.family.moe_keys[0]]
        if "n_shared_experts" in paths:
            paths["shared_experts"] = paths["n_shared_experts"]
        return dict(family=self.family.name, model_type=self.model_type, hidden_size=self["hidden_size"],
                    num_layers=self["num_hidden_layers"], vocab_size=self["vocab_size"],
                    tie_word_embeddings=self["tie_word_embeddings"], dtype=dtype,
                    rope_theta=float(self.rope("rope_theta", "pos_float", self.family.all_keys()["rope_theta"][1] or 10000.0)),
                    rms_norm_eps=float(self["rms_norm_eps"]), config=dict(self.config), paths=paths,
                    pattern_keys=("num_hidden_layers", *self.family.moe_keys))

    def gqa(self, qkv_bias: bool, qk_norm: bool, rotary_fraction: float = 1.0) -> GQA:
        """Grouped-query attention from the head counts (``rotary_fraction``: of each head RoPE rotates)."""
        heads, hidden = self["num_attention_heads"], self["hidden_size"]
        kv = heads if self["num_key_value_heads"] is None else self["num_key_value_heads"]
        if heads % kv:
            raise ModelError(f"{self.path('num_attention_heads')} ({heads}) must be a multiple of "
                             f"{self.path('num_key_value_heads')} ({kv})")
        head_dim = self["head_dim"]
        if head_dim is None:
            head_dim = hidden // heads
            if head_dim < 1:
                raise ModelError(f"{self.path('head_dim')} is required when {self.path('hidden_size')} ({hidden}) < "
                                 f"{self.path('num_attention_heads')} ({heads}); give a positive integer")
        rotary = int(head_dim * rotary_fraction)
        if rotary_fraction < 1 and (rotary < 2 or rotary % 2):
            raise ModelError(f"partial_rotary_factor {rotary_fraction} of head_dim {head_dim} rotates {rotary} "
                             f"dimensions; RoPE needs an even number, at least 2")
        return GQA(heads, kv, head_dim, qkv_bias, qk_norm, rotary if rotary_fraction < 1 else 0)

    def dense_mlp(self, moe_layers: tuple[int, ...]) -> DenseMLP | None:
        """The dense layers' MLP; its width must be given where any layer is dense."""
        dense = [i for i in range(self["num_hidden_layers"]) if i not in set(moe_layers)]
        if not dense:
            return None
        if self["intermediate_size"] < 1:
            raise ModelError(f"{self.path('intermediate_size')} must be a positive integer: layers "
                             f"{dense[:8]} are dense MLP layers, got {self['intermediate_size']!r}")
        return DenseMLP(self["intermediate_size"])

    def check_expert_count(self, moe_layers: tuple[int, ...], experts_key: str) -> None:
        if len(moe_layers) * self[experts_key] > MAX_EXPERT_TENSORS:
            raise ModelError(f"{len(moe_layers)} MoE layers x {self.path(experts_key)} ({self[experts_key]}) routed "
                             f"experts is more than the planner takes (at most {MAX_EXPERT_TENSORS}); check "
                             f"{self.path('num_hidden_layers')}")

    def check_groups(self, experts_key: str) -> None:
        """Group-limited routing: ``n_group`` groups of experts, a token's experts from ``topk_group`` of them."""
        experts, groups, best = self[experts_key], self["n_group"], self["topk_group"]
        if experts and experts % groups:
            raise ModelError(f"{self.path('n_group')} ({groups}) must divide {self.path(experts_key)} ({experts})")
        if best > groups:
            raise ModelError(f"{self.path('topk_group')} ({best}) must be at most {self.path('n_group')} ({groups})")

    def norm_topk_prob(self, default: bool) -> bool:
        return default if self["norm_topk_prob"] is None else self["norm_topk_prob"]


def read_config_file(path: str | Path, where: str) -> dict[str, Any]:
    """A checkpoint's ``config.json`` (``path`` is the file or the model directory holding it)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except OSError as e:
        raise ModelError(f"{where}: cannot read {file}: {e.strerror}; give a config.json file or a model "
                         "directory holding one") from None
    except ValueError as e:
        raise ModelError(f"{where}: {file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelError(f"{where}: {file} must hold a JSON object of config keys, got {type(data).__name__}")
    return data
