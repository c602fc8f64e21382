"""Checksum words (sync.verify.words) on random layout pairs of bf16 models: a correct sync verifies,
and two neighbouring elements of a tensor read in 4-byte words exchanged fail (a whole sync of tiny
models per example, every rank in one process)."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from expected import endpoints
from planners import JobError, JobSpec, build_plan
from strategies import specs
from sync.executor import PlanExecutor
from sync.transport import SoloTransport


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(specs(), st.integers(1, 50))
def test_word_sums_verify_syncs_and_catch_swapped_neighbours(spec, version):
    spec["model"]["hf_config"]["torch_dtype"] = "bfloat16"
    try:
        job = JobSpec.from_dict(spec)
    except JobError:
        assume(False)
    plan = build_plan(job)
    ranks = list(range(plan.num_ranks))
    sources, targets = endpoints(plan, ranks, version=version)
    executor = PlanExecutor(plan, ranks, SoloTransport())
    assert executor.sync(sources, targets, verify=True).verified
    verifier = executor.verifier
    engine = np.arange(verifier.inf_first, len(plan.local_name))
    in_words = engine[verifier.word[engine] == 4]
    event(f"engine tensors in 4-byte words: {'all' if len(in_words) == len(engine) else 'some' if len(in_words) else 'none'}")
    flats = {}
    for r in ranks:
        tensors = (sources if r < plan.num_trainer else targets)[r].local_tensors()
        flats.update({int(lid): tensors[plan.local_name[lid]].view(-1) for lid in plan.locals_of(r)})
    for lid in in_words.tolist():
        pairs = flats[lid].view(torch.int16).view(-1, 2)
        differ = torch.nonzero(pairs[:, 0] != pairs[:, 1])
        if len(differ):
            k = int(differ[0])
            pairs[k] = pairs[k].flip(0).clone()
            bad, count = verifier.check(flats, SoloTransport(), lambda work, label: None)
            assert count == 1 and bad == [plan.local_name[lid]]
            break
