"""YAML job specs: model, both layouts, deployment, links, sync settings and EPLB.

The schema is checked with pydantic (unknown keys and wrong types are errors naming the field);
the layouts and the model's divisibility are checked right after, so a bad job fails with a
:class:`JobError` before anything is planned or sent. Example::

    model: {preset: tiny_qwen3_moe}          # or hf_config: {model_type: ..., ...}
    trainer: {tp: 2, pp: 1, ep: 2}
    inference: {tp: 2, dp: 2, enable_ep: true, engines: 2}
    deployment: {mode: disaggregated, gpus_per_node: 8}
    links: {nvlink_gbps: 450, nic_gbps: 50}
    sync: {bucket_mb: 256, timeout_s: 60}
    eplb: {num_redundant_experts: 4}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from planners.buckets import ALIGN
from planners.cost import Links
from planners.eplb import EplbError
from planners.errors import JobError
from planners.layouts import Deployment, InferenceLayout, LayoutError, TrainerLayout, vllm_pp_layers
from planners.megatron_rules import check_trainer, padded_vocab
from planners.model import MOE_KEYS, ModelError, ModelSpec
from planners.placement import Placement, PlacementError
from planners.presets import PRESETS, preset
from planners.shards import ShardError
from planners.vllm_rules import check_inference

__all__ = ["JobSpec", "JobError", "SyncSettings", "EplbSettings"]


MAX_RANKS = 1 << 20  # GPUs of one job; beyond this a layout is a typo, and device tables would not fit
MAX_TIMEOUT_S = 30 * 86400.0  # torch's timedelta-based timeouts overflow far beyond this
MAX_BUCKET_MB = float(1 << 20)  # 1 TiB
# an integer of a layout: the layouts check the lower bounds (naming the field); this one keeps
# absurd values from sizing tables
_Int = Annotated[int, Field(le=MAX_RANKS)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Model(_Strict):
    preset: str | None = None
    hf_config: dict[str, Any] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> "_Model":
        if (self.preset is None) == (self.hf_config is None):
            raise ValueError(f"give exactly one of model.preset (one of {sorted(PRESETS)}) or model.hf_config")
        return self


class _Trainer(_Strict):
    # positivity, divisibility and the order's tokens are the layout's own checks (LayoutError)
    tp: _Int = 1
    pp: _Int = 1
    ep: _Int = 1
    etp: _Int | None = None
    cp: _Int = 1
    dp: _Int | None = None
    order: str = "tp-cp-ep-dp-pp"
    first_stage_layers: _Int | None = None
    last_stage_layers: _Int | None = None
    vocab_divisible_by: _Int = 128
    vpp: int = 1  # Megatron's virtual_pipeline_model_parallel_size (interleaved schedule); needs pp > 1


class _Inference(_Strict):
    tp: _Int = 1
    pp: _Int = 1
    dp: _Int = 1
    enable_ep: bool = False
    engines: _Int = 1
    vocab_padding: _Int = 64


class _Deployment(_Strict):
    mode: Literal["colocated", "disaggregated"] = "disaggregated"
    gpus_per_node: _Int = 8
    nodes: _Int | None = Field(None, ge=1)


def _finite(default: float, **bounds: float) -> Any:
    """A float field that must be a finite number within ``bounds`` (ints are accepted)."""
    return Field(default, allow_inf_nan=False, **bounds)


MAX_GBPS = 1e9  # a petabyte per second: beyond any link, and bytes per second stay finite


class _Links(_Strict):
    same_device_gbps: float = _finite(1500.0, gt=0, le=MAX_GBPS)
    nvlink_gbps: float = _finite(450.0, gt=0, le=MAX_GBPS)
    nic_gbps: float = _finite(50.0, gt=0, le=MAX_GBPS)


class SyncSettings(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    bucket_mb: float = _finite(256.0, ge=ALIGN / (1 << 20), le=MAX_BUCKET_MB)  # at least one aligned tile
    timeout_s: float = _finite(120.0, gt=0, le=MAX_TIMEOUT_S)
    # True: checksums of every engine tensor; "logits": also compare engine logits with a Hugging Face
    # model holding the trainer's weights (small models: ``rlsync run``)
    verify: bool | Literal["logits"] = True
    # engines receive into a copy of their weights and swap it in only after verification, so a failed
    # sync leaves the served version intact (costs one copy of each engine rank's weights) ...
    staging: bool = False
    # ... in at most this many buckets (bucket_mb each) per engine rank, or a whole copy when None; an
    # engine rank whose copy needs more is refused before any byte moves
    staging_buckets: int | None = Field(None, ge=1, le=1 << 20)


class EplbSettings(_Strict):
    """Expert placement: with ``enabled``, every sync recomputes it from the engines' expert loads."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    enabled: bool = False
    num_redundant_experts: int = Field(0, ge=0, le=1 << 16)
    policy: Literal["default", "deepseek"] = "default"
    num_groups: int | None = Field(None, ge=1)  # expert groups for hierarchical packing; default: model's n_group
    window: int = Field(1000, ge=1)  # forward passes of load statistics kept


class _Job(_Strict):
    name: str = "job"
    model: _Model
    trainer: _Trainer
    inference: _Inference
    deployment: _Deployment = Field(default_factory=_Deployment)
    links: _Links = Field(default_factory=_Links)
    sync: SyncSettings = Field(default_factory=SyncSettings)
    eplb: EplbSettings = Field(default_factory=EplbSettings)


def _schema_at(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], list[str] | None]:
    """Split a pydantic error location into the field's path (a dict field keeps its key; union
    member tags are dropped) and the keys the schema allows in the section holding it."""
    model: Any = _Job
    keys: list[str] | None = None
    for n, part in enumerate(loc):
        fields = getattr(model, "model_fields", None)
        if fields is None:
            return loc[:n], keys
        keys = sorted(fields)
        if part not in fields:
            return loc[: n + 1], keys
        ann = fields[part].annotation
        members = (ann, *getattr(ann, "__args__", ()))
        model = next((a for a in members if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None and any(getattr(a, "__origin__", a) is dict for a in members):
            return loc[: n + 2], None  # a mapping field: its key, then pydantic's '[key]' tags
    return loc, keys


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _pydantic_message(err: ValidationError) -> str:
    merged: dict[str, list[str]] = {}
    got: dict[str, str] = {}
    for e in err.errors():
        path, keys = _schema_at(tuple(e["loc"]))
        where = ".".join(str(x) for x in path) or "job"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling" + (f" (valid keys: {', '.join(keys)})" if keys else "")
        elif e["type"] == "missing":
            msg = "required field is missing"
        elif e["type"] not in ("value_error", "assertion_error"):
            got[where] = f", got {_short(e['input'])}"
        msgs = merged.setdefault(where, [])
        if msgs and msg.startswith("Input should be "):  # one line per field, a union's members or-ed
            msg = msg[len("Input should be "):]
        if msg not in msgs:
            msgs.append(msg)
    lines = [f"{where}: {' or '.join(msgs)}{got.get(where, '')}" for where, msgs in merged.items()]
    return "invalid job spec:\n  " + "\n  ".join(lines)


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[str] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = key_node.value
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


@dataclass(frozen=True)
class JobSpec:
    name: str
    model: ModelSpec
    trainer: TrainerLayout
    inference: InferenceLayout
    deployment: Deployment
    links: Links = field(default_factory=Links)
    sync: SyncSettings = field(default_factory=SyncSettings)
    eplb: EplbSettings = field(default_factory=EplbSettings)
    nodes: int | None = None
    # where the model's config keys came from, so relational errors name them as written
    model_where: str = field(default="model.hf_config", compare=False, repr=False)
    model_config: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    model_overridden: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JobSpec":
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise JobError(f"cannot read job spec {path}: {e.strerror}") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
            if mark is not None:
                at = f" (line {mark.line + 1}, column {mark.column + 1})"
            else:  # a reader error (a character YAML does not allow) knows only its offset
                at = f" (line {text.count(chr(10), 0, getattr(e, 'position', 0)) + 1})"
            raise JobError(f"{path} is not valid YAML{at}: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: Any) -> "JobSpec":
        if not isinstance(data, dict):
            raise JobError(f"a job spec must be a mapping with keys model, trainer, inference, ...; got {type(data).__name__}")
        try:
            raw = _Job.model_validate(data)
        except ValidationError as e:
            raise JobError(_pydantic_message(e)) from None
        m = raw.model
        if m.preset is not None and m.preset not in PRESETS:
            raise JobError(f"model.preset {m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        base, where = (preset(m.preset), f"model.preset[{m.preset}]") if m.preset is not None else (m.hf_config, "model.hf_config")
        try:
            model = ModelSpec.from_hf_config(base, where=where, overrides=m.overrides)
            job = cls(
                name=raw.name,
                model=model,
                trainer=TrainerLayout(**raw.trainer.model_dump()),
                inference=InferenceLayout(**raw.inference.model_dump()),
                deployment=Deployment(mode=raw.deployment.mode, gpus_per_node=raw.deployment.gpus_per_node),
                links=Links(**raw.links.model_dump()),
                sync=raw.sync,
                eplb=raw.eplb,
                nodes=raw.deployment.nodes,
                model_where=where,
                model_config={**base, **m.overrides},
                model_overridden=frozenset(m.overrides),
            )
        except (ModelError, LayoutError, ValueError) as e:
            raise JobError(str(e)) from None
        job.check()
        return job

    def check(self) -> None:
        """Raise JobError unless the model's shapes divide over both layouts and the job fits."""
        ranks = self.trainer.world_size + self.inference.world_size
        if ranks > MAX_RANKS:
            raise JobError(f"trainer and inference world sizes ({self.trainer.world_size} + {self.inference.world_size} "
                           f"ranks) exceed {MAX_RANKS}; check trainer.tp/pp/cp/dp and inference.tp/pp/dp/engines")
        self._check_relations()
        try:
            check_trainer(self.model, self.trainer)
            check_inference(self.model, self.inference, self.placement())
            n = self.deployment.num_nodes(self.trainer, self.inference)
        except (ShardError, LayoutError, PlacementError, ModelError) as e:
            raise JobError(str(e)) from None
        if self.nodes is not None and n > self.nodes:
            raise JobError(
                f"deployment.nodes={self.nodes} is too few: the job needs {n} nodes of "
                f"{self.deployment.gpus_per_node} GPUs"
            )
        if self.eplb.enabled and not self.inference.enable_ep:
            raise JobError("eplb.enabled needs inference.enable_ep: true (placements spread experts over an EP group)")
        if self.eplb.num_groups and self.model.num_experts % self.eplb.num_groups:
            raise JobError(f"eplb.num_groups={self.eplb.num_groups} must divide the {self.model.num_experts} experts")

    def model_path(self, key: str) -> str:
        """Dotted path of a model config key as the job spec wrote it."""
        return f"model.overrides.{key}" if key in self.model_overridden else f"{self.model_where}.{key}"

    def _check_relations(self) -> None:
        """Relations between sections, with every field on both sides named (the shard rules check
        the same and more, in the model's own terms, right after)."""
        t, i, d, e, m = self.trainer, self.inference, self.deployment, self.eplb, self.model
        layers = f"{self.model_path('num_hidden_layers')}={m.num_layers}"
        for side, split in (("trainer", lambda: t.stage_layers(m.num_layers)),
                            ("inference", lambda: vllm_pp_layers(m.num_layers, i.pp))):
            try:
                split()
            except LayoutError as err:
                raise JobError(f"{layers} does not split over {side}.pp={getattr(self, side).pp}: {err}") from None
        heads, kv = (f"{self.model_path(k)}={v}" for k, v in (("num_attention_heads", m.num_heads),
                                                              ("num_key_value_heads", m.num_kv_heads)))
        if m.num_heads % i.tp:
            raise JobError(f"inference.tp={i.tp} must divide {heads}")
        if not m.is_mla and (i.tp % m.num_kv_heads if i.tp >= m.num_kv_heads else m.num_kv_heads % i.tp):
            raise JobError(f"inference.tp={i.tp} must divide {kv}, or be a multiple of it when larger")
        padded = padded_vocab(m.vocab_size, i.vocab_padding)
        if padded % i.tp:
            raise JobError(f"inference.tp={i.tp} must divide the vocabulary ({self.model_path('vocab_size')}={m.vocab_size}) "
                           f"padded to a multiple of inference.vocab_padding={i.vocab_padding} ({padded}); a vocab_padding "
                           f"that is a multiple of {i.tp} always works")
        if d.mode == "colocated" and i.world_size > t.world_size:
            raise JobError(
                f"deployment.mode=colocated needs the inference world size (inference tp*pp*dp*engines = "
                f"{i.tp}*{i.pp}*{i.dp}*{i.engines} = {i.world_size}) <= the trainer world size (trainer "
                f"tp*cp*dp*pp = {t.tp}*{t.cp}*{t.dp}*{t.pp} = {t.world_size}); use fewer inference ranks, "
                f"more trainer ranks, or deployment.mode=disaggregated"
            )
        if not m.is_moe:
            wants = [name for name, on in (("trainer.ep", t.ep > 1), ("inference.enable_ep", i.enable_ep),
                                           ("eplb.enabled", e.enabled),
                                           ("eplb.num_redundant_experts", e.num_redundant_experts > 0)) if on]
            if wants:
                why = ", ".join(f"{self.model_path(k)}={self.model_config.get(k)!r}"
                                for k in ("num_hidden_layers", *MOE_KEYS[m.family]))
                raise JobError(f"{', '.join(wants)} need a MoE model: model {m.model_type!r} has no MoE layers ({why}); "
                               "set trainer.ep: 1, inference.enable_ep: false and leave eplb out for a dense model")
            return
        r, E = e.num_redundant_experts, m.num_experts
        experts = f"{self.model_path(MOE_KEYS[m.family][0])}={E}"
        if E % t.ep:
            raise JobError(f"trainer.ep={t.ep} must divide the routed experts ({experts}); "
                           f"valid: {[x for x in range(1, E + 1) if E % x == 0]}")
        if m.num_shared_experts:
            width = m.moe_intermediate_size * m.num_shared_experts
            for side, tp in (("trainer", t.tp), ("inference", i.tp)):
                if width % tp:
                    raise JobError(
                        f"{side}.tp={tp} must divide the shared experts' width ({self.model_path('moe_intermediate_size')}"
                        f"={m.moe_intermediate_size} x {self.model_path('n_shared_experts')}={m.num_shared_experts} = {width})")
        if r and not i.enable_ep:
            raise JobError(f"eplb.num_redundant_experts={r} needs inference.enable_ep: true (vLLM's EPLB runs with EP)")
        if r and (E + r) % i.ep_size:
            fits = [x for x in range(r, r + i.ep_size + 1) if (E + x) % i.ep_size == 0]
            raise JobError(
                f"eplb.num_redundant_experts={r}: the {experts} + {r} = {E + r} physical expert slots must divide over the "
                f"inference EP group (inference dp*tp = {i.dp}*{i.tp} = {i.ep_size}); e.g. num_redundant_experts: {fits[0]}"
            )
        if not r and i.enable_ep and i.ep_size > E:
            raise JobError(f"inference EP size (inference dp*tp = {i.dp}*{i.tp} = {i.ep_size}) exceeds the routed experts "
                           f"({experts}); some ranks would hold none")

    @property
    def num_physical_experts(self) -> int:
        return self.model.num_experts + self.eplb.num_redundant_experts

    def placement(self, load: Any = None) -> Placement | None:
        """The engines' expert placement: vLLM's initial one (slot i serves expert i % E), or, with
        EPLB enabled and ``load [moe_layers, experts]`` given, a balanced one computed from it."""
        if not self.model.is_moe:
            return None
        if load is not None:
            load = self.check_load(load)
        if load is None or not self.eplb.enabled:
            return Placement.identity(len(self.model.moe_layers), self.model.num_experts, self.num_physical_experts)
        from planners.eplb import rebalance

        groups, nodes, gpus = self.eplb_shape()
        return rebalance(load, self.num_physical_experts, groups, nodes, gpus, policy=self.eplb.policy)

    def check_load(self, load: Any) -> np.ndarray:
        """``load`` as a float array ``[moe_layers, experts]`` of finite, non-negative token counts;
        EplbError naming the load (its shape, or the first bad entry) otherwise."""
        L, E = len(self.model.moe_layers), self.model.num_experts
        want = f"[{L} MoE layers, {E} experts] of finite, non-negative token counts"
        try:
            arr = np.asarray(load, dtype=np.float64)
        except (TypeError, ValueError):
            raise EplbError(f"load must be a numeric array {want}; got {type(load).__name__}") from None
        if arr.shape != (L, E):
            raise EplbError(f"load has shape {arr.shape}; expected {want}")
        bad = np.argwhere(~np.isfinite(arr) | (arr < 0))
        if len(bad):
            layer, expert = (int(x) for x in bad[0])
            raise EplbError(f"load[{layer}, {expert}] is {float(arr[layer, expert])!r} ({len(bad)} bad entries); expected {want}")
        return arr

    def eplb_shape(self) -> tuple[int, int, int]:
        """(expert groups, nodes, GPUs) of one engine's EP group, as the placement sees them."""
        gpus = self.inference.ep_size
        per_node = self.deployment.gpus_per_node
        nodes = gpus // per_node if gpus % per_node == 0 and gpus > per_node else 1
        groups = self.eplb.num_groups or self.model.n_group
        if self.model.num_experts % groups:
            groups = 1
        return groups, nodes, gpus

    def describe(self) -> dict[str, Any]:
        t, i, d = self.trainer, self.inference, self.deployment
        return {
            "name": self.name,
            "model": self.model.model_type,
            "trainer": dict(tp=t.tp, pp=t.pp, vpp=t.vpp, ep=t.ep, etp=t.etp, cp=t.cp, dp=t.dp, edp=t.edp, order=t.order),
            "inference": dict(tp=i.tp, pp=i.pp, dp=i.dp, enable_ep=i.enable_ep, engines=i.engines),
            "deployment": dict(mode=d.mode, gpus_per_node=d.gpus_per_node),
            "physical_experts": self.num_physical_experts if self.model.is_moe else 0,
            "eplb": dict(enabled=self.eplb.enabled, policy=self.eplb.policy) if self.model.is_moe else {},
        }
