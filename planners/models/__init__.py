"""Models: what the planner knows of an architecture, and one module per model family.

:class:`ModelSpec` is built from per-block kinds (``blocks``: attention GQA or MLA; MLP dense or MoE,
with optional shared experts and router bias) and a per-layer pattern (which layers are MoE);
:func:`catalog` lists its logical tensors as Hugging Face checkpoints name them. Each family module
(``llama``, ``qwen3_moe``, ``mixtral``, ``deepseek_v3``, ``glm4_moe``) holds everything family-specific:
the ``config.json`` keys it reads and their spellings, how they become a spec, its names, its presets.
Adding a family is one module here and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from planners.errors import ModelError
from planners.models import deepseek_v3, glm4_moe, llama, mixtral, qwen3_moe
from planners.models.blocks import GQA, MLA, DenseMLP, MoE, Names, VllmTraits
from planners.models.catalog import Catalog, LogicalTensor, catalog, expert_names, router_prefix
from planners.models.config import ConfigValues, Family, read_config_file
from planners.models.spec import DTYPES, ModelSpec

__all__ = ["ModelSpec", "GQA", "MLA", "DenseMLP", "MoE", "Names", "VllmTraits", "LogicalTensor", "Catalog", "catalog",
           "expert_names", "router_prefix", "Family", "FAMILIES", "family", "family_of", "spec_from_config",
           "read_config_file", "PRESETS", "preset", "DTYPES"]

FAMILIES: dict[str, Family] = {m.FAMILY.name: m.FAMILY for m in (llama, qwen3_moe, mixtral, deepseek_v3, glm4_moe)}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
PRESETS: dict[str, dict[str, Any]] = {name: cfg for f in FAMILIES.values() for name, cfg in f.presets.items()}


def family(name: str) -> Family:
    """The family of a spec (``spec.family``)."""
    return FAMILIES[name]


def family_of(model_type: str) -> Family | None:
    """The family that reads configs of ``model_type`` (None if none does)."""
    return _BY_MODEL_TYPE.get(model_type)


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ModelError(f"model.preset {name!r} is unknown; choose one of {sorted(PRESETS)}")
    return dict(PRESETS[name])


def spec_from_config(cfg: dict[str, Any] | str | Path, where: str = "model.hf_config",
                     overrides: dict[str, Any] | None = None, overrides_where: str = "model.overrides") -> ModelSpec:
    """A spec from a Hugging Face ``config.json`` dict (or the path of the file, or of a model directory
    holding it); ``overrides`` replace its keys. Every key the family reads is checked before it is used;
    errors name the key as ``{where}.{key}`` (``{overrides_where}.{key}`` for an override)."""
    if isinstance(cfg, (str, Path)):
        cfg = read_config_file(cfg, where)
    if not isinstance(cfg, dict):
        raise ModelError(f"{where} must be a mapping of config.json keys, got {type(cfg).__name__}")
    overrides = dict(overrides or {})
    merged = {**cfg, **overrides}
    model_type = merged.get("model_type")
    fam = family_of(model_type) if isinstance(model_type, str) else None
    if fam is None:
        at = f"{overrides_where if 'model_type' in overrides else where}.model_type"
        got = "is required" if model_type is None else f"{model_type!r} is not supported"
        raise ModelError(f"{at} {got}; use one of {sorted(_BY_MODEL_TYPE)}")
    known = set(fam.all_keys()) | {s for spellings in fam.spellings.values() for s in spellings} | {"model_type"}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ModelError(f"{overrides_where}.{unknown[0]}: unknown key for model_type {model_type!r}; "
                         f"known keys: {', '.join(sorted(known - {'model_type'}))}")
    return fam.build(ConfigValues(merged, fam, where, overrides, overrides_where))
