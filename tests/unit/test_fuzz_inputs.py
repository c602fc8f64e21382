"""Fuzzed job specs (YAML text and dicts), loads and placements: every bad input ends in the project's
own error, naming the field, before anything is planned or sent -- never a traceback from deep inside."""

from __future__ import annotations

import copy
import math
import os
import re
import tempfile
from contextlib import contextmanager
from unittest import mock

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import planners.build
from planners import JobError, JobSpec, build_plan
from planners.eplb import EplbError, rebalance
from planners.eplb.placement import Placement
from planners.errors import PlacementError, ShardError
from planners.models import PRESETS, family_of

BASE = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
            inference=dict(tp=2, dp=2, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=4))
PATHS = [("trainer", k) for k in ("tp", "pp", "ep", "etp", "cp", "dp", "order", "first_stage_layers")] + \
        [("inference", k) for k in ("tp", "pp", "dp", "enable_ep", "engines", "vocab_padding")] + \
        [("deployment", k) for k in ("mode", "gpus_per_node", "nodes")] + \
        [("links", k) for k in ("nvlink_gbps", "nic_gbps")] + [("sync", k) for k in ("bucket_mb", "timeout_s")] + \
        [("eplb", k) for k in ("num_redundant_experts", "policy", "num_groups", "window")] + \
        [("model", "preset"), ("model", "hf_config"), ("model", "overrides"), ("trainer", "bogus"), ("bogus", "x")]
VALUES = st.one_of(st.integers(-3, 40), st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=5),
                   st.none(), st.booleans(), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
# values of the wrong type or range for most fields (some happen to be valid for some fields)
WRONG = st.one_of(
    st.integers(-4, 0), st.sampled_from([3, 5, 7, 1 << 40, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([math.nan, math.inf, -math.inf, 2.0, 0.5]),
    st.text(max_size=6), st.sampled_from(["2", "yes", "no", "true", "1e3", "bfloat16", "llama", ""]),
    st.booleans(), st.none(), st.lists(st.integers(-2, 4), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


@contextmanager
def no_planning():
    """Counts plans built (the plan is what the executor runs: no plan, no transfer)."""
    calls = []
    real = planners.build.build_plan_from_parts

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with mock.patch.object(planners.build, "build_plan_from_parts", spy):
        yield calls


def named(message: str, path: tuple[str, ...]) -> bool:
    """Does ``message`` name the field at ``path``: its dotted path, ``section.key``, or the key itself
    (as a word: 'tp' inside 'etp' does not count)?"""
    dotted = ".".join(path)
    if dotted in message or ".".join(path[-2:]) in message:
        return True
    if any(f"{'.'.join(path[:k])}: unknown key" in message for k in range(1, len(path))):
        return True  # an unknown section or key above the mutated one
    return re.search(rf"(?<![A-Za-z_]){re.escape(path[-1])}(?![A-Za-z_])", message) is not None


# -- YAML text -----------------------------------------------------------------------------

def _hf(preset: str) -> dict:
    return {k: v for k, v in PRESETS[preset].items()}


YAML_BASES = {
    "qwen3_moe": dict(
        name="fuzz-moe", model=dict(hf_config=_hf("tiny_qwen3_moe")), trainer=dict(tp=2, pp=1, ep=2),
        inference=dict(tp=2, dp=2, enable_ep=True), deployment=dict(mode="disaggregated", gpus_per_node=4),
        links=dict(nvlink_gbps=450, nic_gbps=50, same_device_gbps=1500), sync=dict(bucket_mb=256, timeout_s=120, verify=True),
        eplb=dict(enabled=True, num_redundant_experts=4, policy="default", window=100)),
    "deepseek_v3": dict(
        name="fuzz-mla", model=dict(hf_config=_hf("tiny_deepseek_v3")), trainer=dict(tp=2, pp=3, ep=2),
        inference=dict(tp=4, enable_ep=False), deployment=dict(mode="disaggregated", gpus_per_node=8)),
    "llama": dict(
        name="fuzz-dense", model=dict(hf_config=_hf("tiny_llama")), trainer=dict(tp=2, pp=2, dp=2),
        inference=dict(tp=2, pp=2, engines=2), deployment=dict(mode="colocated", gpus_per_node=4),
        sync=dict(timeout_s=30)),
}
SECTION_KEYS = {  # optional keys a base may not spell out, mutated too
    "trainer": ["tp", "pp", "ep", "etp", "cp", "dp", "order", "first_stage_layers", "last_stage_layers",
                "vocab_divisible_by"],
    "inference": ["tp", "pp", "dp", "enable_ep", "engines", "vocab_padding"],
    "deployment": ["mode", "gpus_per_node", "nodes"],
    "links": ["same_device_gbps", "nvlink_gbps", "nic_gbps"],
    "sync": ["bucket_mb", "timeout_s", "verify"],
    "eplb": ["enabled", "num_redundant_experts", "policy", "num_groups", "window"],
}
REQUIRED_SECTIONS = ("model", "trainer", "inference")


def _hf_keys(base: dict) -> dict:
    """Every config.json key the base's model family reads."""
    return family_of(base["model"]["hf_config"]["model_type"]).all_keys()


@st.composite
def mutations(draw):
    """(base name, mutated spec, path of the mutated field, kind of mutation)."""
    name = draw(st.sampled_from(sorted(YAML_BASES)))
    spec = copy.deepcopy(YAML_BASES[name])
    kind = draw(st.sampled_from(["set", "set", "set", "hf", "hf", "hf", "delete", "unknown", "section"]))
    if kind == "set":
        section = draw(st.sampled_from(sorted(SECTION_KEYS)))
        key = draw(st.sampled_from(SECTION_KEYS[section]))
        spec.setdefault(section, {})[key] = draw(WRONG)
        return name, spec, (section, key), kind
    if kind == "hf":
        key = draw(st.sampled_from(sorted(_hf_keys(spec))))
        spec["model"]["hf_config"][key] = draw(WRONG)
        return name, spec, ("model", "hf_config", key), kind
    if kind == "delete":
        leaves = [(s,) for s in spec] + [(s, k) for s, v in spec.items() if isinstance(v, dict) for k in v]
        leaves += [("model", "hf_config", k) for k in spec["model"]["hf_config"]]
        path = draw(st.sampled_from(sorted(leaves)))
        parent = spec
        for part in path[:-1]:
            parent = parent[part]
        del parent[path[-1]]
        return name, spec, path, kind
    if kind == "unknown":
        section = draw(st.sampled_from([None, "model", *sorted(SECTION_KEYS)]))
        key = draw(st.sampled_from(["bogus", "tpp", "nodes_", "gpus", "Tp", "timeout"]))
        if section is None:
            spec[key] = draw(WRONG)
            return name, spec, (key,), kind
        spec.setdefault(section, {})[key] = draw(WRONG)
        return name, spec, (section, key), kind
    section = draw(st.sampled_from([*REQUIRED_SECTIONS, *sorted(SECTION_KEYS), "name"]))
    value = draw(st.one_of(st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.booleans(),
                           st.floats()))
    spec[section] = value
    return name, spec, (section,), kind


def _load_yaml_text(text: str) -> JobSpec:
    fd, path = tempfile.mkstemp(suffix=".yaml")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return JobSpec.from_yaml(path)
    finally:
        os.unlink(path)


def test_yaml_bases_are_valid():
    for spec in YAML_BASES.values():
        build_plan(_load_yaml_text(yaml.safe_dump(spec))).validate()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations(), st.booleans())
def test_fuzzed_yaml_fields_fail_naming_the_field(mutation, flow_style):
    _, spec, path, kind = mutation
    text = yaml.safe_dump(spec, default_flow_style=flow_style, allow_unicode=True)
    with no_planning() as plans:
        try:
            job = _load_yaml_text(text)
        except JobError as e:
            message = str(e)
            assert not plans, "a plan was built for an invalid job"
            assert named(message, path), f"{path} not named in: {message}"
            return
    # a mutation may be valid (a float bandwidth, a dropped optional key, None for a default): then it plans
    assert kind not in ("unknown", "section") or path == ("name",), f"{path}: accepted"
    build_plan(job).validate()


@st.composite
def corrupted_yaml(draw):
    spec = YAML_BASES[draw(st.sampled_from(sorted(YAML_BASES)))]
    text = yaml.safe_dump(spec, default_flow_style=draw(st.booleans()))
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(text)))
        edit = draw(st.sampled_from(["insert", "delete", "replace"]))
        junk = draw(st.one_of(st.sampled_from([":", "{", "}", "[", "]", "-", ",", "'", '"', "\t", "\n", "&a", "*a", "!!",
                                               "!!python/object:os.system", "%", "@", "`", "|", ">", "? ", "#", "  ", "0x",
                                               ".inf", ".nan", "null", "~", "yes", "1e400", "-1"]),
                              st.text(max_size=3)))
        if edit == "insert":
            text = text[:i] + junk + text[i:]
        elif edit == "delete":
            text = text[:i] + text[i + draw(st.integers(1, 12)):]
        else:
            text = text[:i] + junk + text[i + len(junk):]
    return text


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(corrupted_yaml())
def test_corrupted_yaml_text_fails_with_job_errors(text):
    with no_planning() as plans:
        try:
            job = _load_yaml_text(text)
        except JobError as e:
            message = str(e)
            assert message and not plans
            if "not valid YAML" in message:
                assert "line" in message  # where in the file
            return
    build_plan(job).validate()  # the corruption happened to leave a valid job


@pytest.mark.parametrize("text,message", [
    ("model: {preset: tiny_llama}\ntrainer: {tp: 1}\ninference: {tp: 1}\nsync: {timeout_s: .inf}\n",
     r"sync.timeout_s: Input should be a finite number, got inf"),
    ("model: {preset: tiny_llama}\ntrainer: {tp: 1}\ninference: {tp: 1}\nlinks: {nic_gbps: .nan}\n",
     r"links.nic_gbps: Input should be a finite number"),
    ("model: {preset: tiny_llama, overrides: {num_key_value_heads: '2'}}\ntrainer: {tp: 1}\ninference: {tp: 1}\n",
     r"model.overrides.num_key_value_heads must be a positive integer, got '2'"),
    ("model: {hf_config: {model_type: llama, hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 8,\n"
     "  vocab_size: 256, intermediate_size: 128, tie_word_embeddings: no_thanks}}\ntrainer: {tp: 1}\ninference: {tp: 1}\n",
     r"model.hf_config.tie_word_embeddings must be a boolean \(true or false\), got 'no_thanks'"),
    ("model: {preset: tiny_llama}\ntrainer: {tp: 1}\ninference: {tp: 1}\ntrainer: {tp: 2}\n",
     r"(?s)not valid YAML \(line 4, column 1\): .*found duplicate key 'trainer'"),
    ("model: {preset: tiny_llama}\ntrainer: {tp: 1, tp: 2}\ninference: {tp: 1}\n", r"duplicate key 'tp'"),
    ("model: {preset: tiny_llama}\ntrainer: {tp: 1}\n", r"inference: required field is missing"),
    ("model: {preset: tiny_llama}\ntrainer: {tp: 1}\ninference: {tp: !!python/object:os.system ls}\n", r"not valid YAML"),
    ("model: {preset: tiny_llama}\ntrainer: &t {tp: 1}\ninference: *t\n", None),  # aliases are fine
])
def test_yaml_edge_cases(text, message):
    if message is None:
        _load_yaml_text(text)
        return
    with pytest.raises(JobError, match=message):
        _load_yaml_text(text)


# -- job dicts -----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PATHS), VALUES), min_size=1, max_size=4), st.booleans())
def test_mutated_jobs_fail_with_job_errors(mutations, drop_section):
    spec = copy.deepcopy(BASE)
    for (section, key), value in mutations:
        if not isinstance(spec.get(section), dict):
            spec[section] = {}
        spec[section][key] = value
    if drop_section:
        spec.pop("trainer")
    with no_planning() as plans:
        try:
            job = JobSpec.from_dict(spec)
        except JobError as e:
            assert not plans
            if drop_section:
                assert "trainer: required field is missing" in str(e)
            elif len(mutations) == 1:
                assert named(str(e), mutations[0][0]), f"{mutations[0][0]} not named in: {e}"
            return
    plan = build_plan(job)  # a job that passed validation must plan
    plan.validate()


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.sampled_from(["model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                        "num_key_value_heads", "vocab_size", "intermediate_size", "num_experts",
                                        "moe_intermediate_size", "head_dim", "torch_dtype"]), VALUES, max_size=11))
def test_fuzzed_hf_configs(cfg):
    try:
        JobSpec.from_dict(dict(model=dict(hf_config=cfg), trainer=dict(tp=1), inference=dict(tp=1)))
    except JobError as e:
        assert "model" in str(e)


# -- loads and placements ------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=8, max_size=8))
def test_fuzzed_loads(row):
    load = np.array([row] * 4)
    job = JobSpec.from_dict(BASE)
    bad = any(math.isnan(x) or math.isinf(x) or x < 0 for x in row)
    if bad:
        with no_planning() as plans, pytest.raises(EplbError, match=r"^load\[0, \d\] is"):
            build_plan(job, load)
        assert not plans
    else:
        build_plan(job, load).validate()


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 6), st.integers(0, 10))
def test_wrong_shape_loads_name_the_load(layers, experts):
    assume((layers, experts) != (4, 8))
    job = JobSpec.from_dict(BASE)
    with no_planning() as plans, pytest.raises(EplbError, match=r"^load has shape .* expected \[4 MoE layers, 8 experts\]"):
        build_plan(job, np.ones((layers, experts)))
    assert not plans


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-2, 9), min_size=12, max_size=12), st.integers(3, 5), st.sampled_from([10, 12, 14]))
def test_fuzzed_placements(row, layers, slots):
    from planners.build import build_plan_from_parts

    job = JobSpec.from_dict(BASE)
    phy2log = np.resize(np.array(row), (layers, slots))
    ok = (layers, slots) == (4, 12) and all(set(range(8)) <= set(r) for r in phy2log.tolist()) and \
        phy2log.min() >= 0 and phy2log.max() < 8
    if ok:
        build_plan_from_parts(job.model, job.trainer, job.inference, job.deployment, Placement(phy2log)).validate()
        return
    with pytest.raises((PlacementError, ShardError), match="placement|slots"):
        build_plan_from_parts(job.model, job.trainer, job.inference, job.deployment, Placement(phy2log))


def test_placements_that_miss_experts_are_refused():
    job = JobSpec.from_dict(BASE)
    p = Placement(np.zeros((4, 12), dtype=np.int64))  # every slot serves expert 0
    with pytest.raises(PlacementError, match="no slot for experts"):
        p.check(4, 8, 12)
    from planners.build import build_plan_from_parts

    with pytest.raises((PlacementError, ShardError)):
        build_plan_from_parts(job.model, job.trainer, job.inference, job.deployment, p)
    with pytest.raises(EplbError):
        rebalance(np.ones((2, 8)), 6)
