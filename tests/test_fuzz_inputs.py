"""Fuzzed job specs, loads and placements: every bad input ends in the project's own error, naming
the field, before anything is planned or sent -- never a traceback from deep inside."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planners import JobError, JobSpec, build_plan
from planners.eplb import EplbError, rebalance
from planners.placement import Placement, PlacementError
from planners.shards import ShardError

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
    try:
        job = JobSpec.from_dict(spec)
    except JobError as e:
        assert str(e)  # names something
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
    except JobError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(allow_nan=True, allow_infinity=True), min_size=8, max_size=8))
def test_fuzzed_loads(row):
    load = np.array([row] * 4)
    job = JobSpec.from_dict(BASE)
    bad = any(math.isnan(x) or math.isinf(x) or x < 0 for x in row)
    if bad:
        with pytest.raises(EplbError):
            build_plan(job, load)
    else:
        build_plan(job, load).validate()


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
