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
from planners.build import PlanBuilder
from strategies import jobs, specs
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


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(jobs(), st.booleans())
def test_expected_sums_reach_every_engine_from_every_process_that_feeds_it(job, by_device):
    """The point-to-point exchange of expected sums (``Verifier.routes``) equals the all-reduce it
    replaced: every process whose contributions to another's engine tensors are not zero sends them,
    and the routes agree on both ends (one process per rank, or per device hosting its ranks)."""
    from sync.verify.verifier import Verifier

    plan = build_plan(job)
    if by_device:
        _, process_of = np.unique(plan.devices, return_inverse=True)
    else:
        process_of = np.arange(plan.num_ranks)
    processes = sorted(set(process_of.tolist()))
    sources, _ = endpoints(plan, range(plan.num_trainer), version=1)
    verifiers, sums = {}, {}
    for p in processes:
        ranks = np.flatnonzero(process_of == p).tolist()
        verifiers[p] = Verifier(plan, ranks, process_of=process_of)
        flats = {}
        for r in ranks:
            if r < plan.num_trainer:
                tensors = sources[r].local_tensors()
                flats.update({int(lid): tensors[plan.local_name[lid]].view(-1) for lid in plan.locals_of(r)})
        sums[p] = verifiers[p].expected(flats) if flats else verifiers[p]._zeros({0: torch.zeros(1)})
    total = sum(sums.values())
    builder = PlanBuilder.for_job(job)
    words = []
    for p in processes:  # a rank's part of the plan names the same receivers (its senders it learns)
        ranks = np.flatnonzero(process_of == p).tolist()
        scoped = Verifier(builder.rank_plan(job.placement(None), ranks), ranks, process_of=process_of)
        routes = scoped.routes
        assert routes.receive_from is None and sorted(routes.send_to) == sorted(verifiers[p].routes.send_to)
        assert np.array_equal(routes.mine, verifiers[p].routes.mine)
        words.append(scoped.word)
    # the words every process agrees on (the smallest any found) are the whole plan's
    assert np.array_equal(np.minimum.reduce(words), verifiers[processes[0]].word)
    for q in processes:
        routes = verifiers[q].routes
        assert set(routes.receive_from) == {p for p in processes if q in verifiers[p].routes.send_to}
        mine = torch.from_numpy(routes.mine)
        got = sums[q][mine] + sum((sums[p][mine] for p in routes.receive_from), torch.zeros((len(mine), 2), dtype=torch.int64))
        assert torch.equal(got, total[mine])
        for p in routes.receive_from:
            assert np.array_equal(verifiers[p].routes.send_to[q], routes.mine)
