"""YAML job specs: model, both layouts, deployment, links, sync settings and EPLB.

One schema: the layout and link dataclasses (``planners.layouts``, ``planners.cost``) declare their
fields, types and bounds once, and the sections of the job are read from those declarations; the
sync and EPLB settings are pydantic models of their own. One validator: pydantic checks types and
unknown keys (errors name the field), each section's own checks run as it is built, then
:meth:`JobSpec.check` runs the checks between sections -- the trainer side's and the engine side's
(``planners.sides``: the model's shapes over each layout, naming the model's keys as the job wrote
them), the deployment's and EPLB's -- so a bad job fails with a :class:`JobError` before anything is
planned or sent. Example::

    model: {preset: tiny_qwen3_moe}          # or hf_config: {model_type: ..., ...}, or config: path/to/config.json
    trainer: {tp: 2, pp: 1, ep: 2}           # kind: megatron (the default)
    inference: {tp: 2, dp: 2, enable_ep: true, engines: 2}   # kind: vllm (the default)
    deployment: {mode: disaggregated, gpus_per_node: 8}
    links: {nvlink_gbps: 450, nic_gbps: 50}
    sync: {bucket_mb: 256, timeout_s: 60}
    eplb: {num_redundant_experts: 4}
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_type_hints

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from planners.cost import Links
from planners.eplb import check_load
from planners.errors import EplbError, JobError, LayoutError, ModelError, PlacementError, ShardError
from planners.layouts import MAX_RANKS, Deployment, InferenceLayout, TrainerLayout
from planners.models import PRESETS, ModelSpec, preset, spec_from_config
from planners.eplb.placement import EnginePlacements, Placement
from planners.schedule.buckets import ALIGN
from planners.sides import ENGINES, TRAINERS, engine_side, trainer_side

__all__ = ["JobSpec", "JobError", "SyncSettings", "EplbSettings"]


MAX_TIMEOUT_S = 30 * 86400.0  # torch's timedelta-based timeouts overflow far beyond this
MAX_BUCKET_MB = float(1 << 20)  # 1 TiB


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


def _section(cls: type, **extra: Any) -> type[BaseModel]:
    """The schema of a job section read from dataclass ``cls``'s own field declarations (``extra``:
    keys of the section that are not fields of ``cls``)."""
    hints = get_type_hints(cls, include_extras=True)
    fields = {f.name: (hints[f.name], ... if f.default is dataclasses.MISSING else f.default)
              for f in dataclasses.fields(cls) if f.init}
    return create_model(f"_{cls.__name__}", __base__=_Strict, **fields, **extra)


class _Model(_Strict):
    preset: str | None = None
    hf_config: dict[str, Any] | None = None
    config: str | None = None  # a checkpoint's config.json, or the model directory holding it
    overrides: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_source(self) -> "_Model":
        if sum(x is not None for x in (self.preset, self.hf_config, self.config)) != 1:
            raise ValueError(f"give exactly one of model.preset (one of {sorted(PRESETS)}), model.hf_config or "
                             "model.config (a config.json, or the model directory holding it)")
        return self


def _finite(default: float, **bounds: float) -> Any:
    """A float field that must be a finite number within ``bounds`` (ints are accepted)."""
    return Field(default, allow_inf_nan=False, **bounds)


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

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * (1 << 20))


class EplbSettings(_Strict):
    """Expert placement: with ``enabled``, every sync recomputes it from the engines' expert loads."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    enabled: bool = False
    num_redundant_experts: int = Field(0, ge=0, le=1 << 16)
    policy: Literal["default", "deepseek"] = "default"
    num_groups: int | None = Field(None, ge=1)  # expert groups for hierarchical packing; default: model's n_group
    window: int = Field(1000, ge=1)  # forward passes of load statistics kept
    per_engine: bool = False  # rlsync run: each engine gets its own placement, balanced by its own load


_TrainerSection = _section(TrainerLayout, kind=(str, "megatron"))
_InferenceSection = _section(InferenceLayout, kind=(str, "vllm"))
_DeploymentSection = _section(Deployment)
_LinksSection = _section(Links)


class _Job(_Strict):
    name: str = "job"
    model: _Model
    trainer: _TrainerSection
    inference: _InferenceSection
    deployment: _DeploymentSection = Field(default_factory=_DeploymentSection)
    links: _LinksSection = Field(default_factory=_LinksSection)
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
    deployment: Deployment = field(default_factory=Deployment)
    links: Links = field(default_factory=Links)
    sync: SyncSettings = field(default_factory=SyncSettings)
    eplb: EplbSettings = field(default_factory=EplbSettings)
    trainer_kind: str = "megatron"  # which side's rules say what trainer ranks hold (planners.sides)
    engine_kind: str = "vllm"

    @classmethod
    def from_yaml(cls, path: str | Path) -> "JobSpec":
        """A job from a YAML file; a relative ``model.config`` path is read from the file's folder."""
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
        return cls.from_dict(data, base_dir=Path(path).parent)

    @classmethod
    def from_dict(cls, data: Any, base_dir: str | Path = ".") -> "JobSpec":
        """A job from its YAML's mapping (``base_dir``: where a relative ``model.config`` path starts)."""
        if not isinstance(data, dict):
            raise JobError(f"a job spec must be a mapping with keys model, trainer, inference, ...; got {type(data).__name__}")
        try:
            raw = _Job.model_validate(data)
        except ValidationError as e:
            raise JobError(_pydantic_message(e)) from None
        try:
            model = _model_spec(raw.model, Path(base_dir))
            trainer, inference = raw.trainer.model_dump(), raw.inference.model_dump()
            job = cls(
                name=raw.name,
                model=model,
                trainer_kind=trainer.pop("kind"),
                engine_kind=inference.pop("kind"),
                trainer=TrainerLayout(**trainer),
                inference=InferenceLayout(**inference),
                deployment=Deployment(**raw.deployment.model_dump()),
                links=Links(**raw.links.model_dump()),
                sync=raw.sync,
                eplb=raw.eplb,
            )
        except (ModelError, LayoutError) as e:
            raise JobError(str(e)) from None
        job.check()
        return job

    def check(self) -> None:
        """Raise JobError unless the job can run: the checks between its sections (each section checked
        its own fields when it was built)."""
        t, i, m = self.trainer, self.inference, self.model
        ranks = t.world_size + i.world_size
        if ranks > MAX_RANKS:
            raise JobError(f"trainer and inference world sizes ({t.world_size} + {i.world_size} ranks) exceed "
                           f"{MAX_RANKS}; check trainer.tp/pp/cp/dp and inference.tp/pp/dp/engines")
        for kind, known, where in ((self.trainer_kind, TRAINERS, "trainer"), (self.engine_kind, ENGINES, "inference")):
            if kind not in known:
                raise JobError(f"{where}.kind {kind!r} is not supported; use one of {sorted(known)}")
        self._check_eplb()
        try:
            trainer_side(self.trainer_kind).check(m, t)
            engine_side(self.engine_kind).check(m, i, self.placement())
            self.deployment.check(t, i)
        except (ShardError, LayoutError, PlacementError, ModelError) as e:
            raise JobError(str(e)) from None

    def _check_eplb(self) -> None:
        """EPLB settings against the model and the engine layout (before the engine side checks the
        slots they make, so that errors name the eplb field)."""
        e, i, m = self.eplb, self.inference, self.model
        wants = [name for name, on in (("eplb.enabled", e.enabled), ("eplb.num_redundant_experts", e.num_redundant_experts > 0))
                 if on]
        if wants and not m.is_moe:
            raise JobError(f"{', '.join(wants)} need a MoE model: model {m.model_type!r} has no MoE layers "
                           f"({m.moe_pattern()}); leave eplb out for a dense model")
        if not m.is_moe:
            return
        r, E = e.num_redundant_experts, m.num_experts
        if r and not i.enable_ep:
            raise JobError(f"eplb.num_redundant_experts={r} needs inference.enable_ep: true (vLLM's EPLB runs with EP)")
        if e.enabled and not i.enable_ep:
            raise JobError("eplb.enabled needs inference.enable_ep: true (placements spread experts over an EP group)")
        if r and (E + r) % i.ep_size:
            fits = [x for x in range(r, r + i.ep_size + 1) if (E + x) % i.ep_size == 0]
            raise JobError(
                f"eplb.num_redundant_experts={r}: the {m.key('experts', E)} + {r} = {E + r} physical expert slots must "
                f"divide over the inference EP group (inference dp*tp = {i.dp}*{i.tp} = {i.ep_size}); e.g. "
                f"num_redundant_experts: {fits[0]}")
        if e.num_groups and E % e.num_groups:
            raise JobError(f"eplb.num_groups={e.num_groups} must divide the routed experts ({m.key('experts', E)})")

    @property
    def num_physical_experts(self) -> int:
        return self.model.num_experts + self.eplb.num_redundant_experts

    def placement(self, load: Any = None) -> Placement | EnginePlacements | None:
        """The engines' expert placement: vLLM's initial one (slot i serves expert i % E), or, with
        EPLB enabled and ``load`` given, a balanced one computed from it: ``load [moe_layers, experts]``
        gives one placement every engine shares; ``load [engines, moe_layers, experts]`` gives each
        engine its own, balanced for its own traffic (as vLLM's EPLB balances each engine's EP group)."""
        if not self.model.is_moe:
            return None
        if load is not None:
            load = self.check_load(load)
        if load is None or not self.eplb.enabled:
            return Placement.identity(len(self.model.moe_layers), self.model.num_experts, self.num_physical_experts)
        from planners.eplb import rebalance

        groups, nodes, gpus = self.eplb_shape()
        if load.ndim == 3:
            return EnginePlacements(tuple(rebalance(engine_load, self.num_physical_experts, groups, nodes, gpus,
                                                    policy=self.eplb.policy) for engine_load in load))
        return rebalance(load, self.num_physical_experts, groups, nodes, gpus, policy=self.eplb.policy)

    def check_load(self, load: Any) -> np.ndarray:
        """``load`` as a float array ``[moe_layers, experts]`` or, per engine, ``[engines, moe_layers,
        experts]``; EplbError naming the load otherwise."""
        L, E, engines = len(self.model.moe_layers), self.model.num_experts, self.inference.engines
        try:
            per_engine = np.ndim(load) == 3
        except (TypeError, ValueError):  # ragged or not numeric: check_load names it
            per_engine = False
        if per_engine:
            if len(load) != engines:
                raise EplbError(f"a per-engine load has shape {np.shape(load)}; expected [{engines} engines "
                                f"(inference.engines), {L} MoE layers, {E} experts]")
            return np.stack([check_load(engine_load, L, E) for engine_load in load])
        return check_load(load, L, E)

    def balancedness(self, load: Any, placement: Placement | EnginePlacements) -> float:
        """Mean over max GPU load of ``placement`` under ``load`` (as vLLM logs it): of the worst-balanced
        engine where each engine has its own load or placement."""
        from planners.eplb import balance_report

        load = self.check_load(load)
        _, nodes, gpus = self.eplb_shape()
        loads = load if load.ndim == 3 else [load] * self.inference.engines
        return min(balance_report(engine_load, placement.of_engine(k), gpus, nodes).balancedness
                   for k, engine_load in enumerate(loads))

    def eplb_shape(self) -> tuple[int, int, int]:
        """(expert groups, nodes, GPUs) of one engine's EP group, as the placement sees them."""
        gpus = self.inference.ep_size
        per_node = self.deployment.gpus_per_node
        nodes = gpus // per_node if gpus % per_node == 0 and gpus > per_node else 1
        groups = self.eplb.num_groups or self.model.moe.n_group
        if self.model.num_experts % groups:
            groups = 1
        return groups, nodes, gpus

    def describe(self) -> dict[str, Any]:
        """What a plan records of its job (``plan.meta``): enough for an engine to check its settings
        and to take every sync setting from the plan."""
        t, i, d = self.trainer, self.inference, self.deployment
        return {
            "name": self.name,
            "model": self.model.model_type,
            "trainer": dict(kind=self.trainer_kind, tp=t.tp, pp=t.pp, vpp=t.vpp, ep=t.ep, etp=t.etp, cp=t.cp, dp=t.dp,
                            edp=t.edp, order=t.order),
            "inference": dict(kind=self.engine_kind, tp=i.tp, pp=i.pp, dp=i.dp, enable_ep=i.enable_ep,
                              engines=i.engines, quantization=i.quantization),
            "deployment": dict(mode=d.mode, gpus_per_node=d.gpus_per_node),
            "physical_experts": self.num_physical_experts if self.model.is_moe else 0,
            "eplb": dict(enabled=self.eplb.enabled, policy=self.eplb.policy) if self.model.is_moe else {},
            "sync": self.sync.model_dump(),
        }


def _model_spec(m: _Model, base_dir: Path) -> ModelSpec:
    if m.preset is not None:
        if m.preset not in PRESETS:
            raise ModelError(f"model.preset {m.preset!r} is unknown; choose one of {sorted(PRESETS)}")
        return spec_from_config(preset(m.preset), where=f"model.preset[{m.preset}]", overrides=m.overrides)
    if m.config is not None:
        path = base_dir / m.config
        return spec_from_config(path, where=f"model.config[{m.config}]", overrides=m.overrides)
    return spec_from_config(m.hf_config, where="model.hf_config", overrides=m.overrides)
