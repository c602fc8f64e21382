"""Faults mid-sync: corrupted bytes are caught, dead peers end the sync with an error naming them,
and every engine knows which version it serves (in place: none after a failure; staged: the old one)."""

from __future__ import annotations

import time

import pytest

from planners import JobSpec, build_plan
from sync.faults import Fault
from sync.launch import LocalRun, run_local

JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2), inference=dict(tp=2, dp=2, enable_ep=True),
           deployment=dict(gpus_per_node=2))


@pytest.fixture(scope="module")
def plan():
    return build_plan(JobSpec.from_dict(JOB))


@pytest.mark.parametrize("staging", [False, True])
def test_corrupted_bucket_is_caught_and_engines_know_their_version(plan, staging):
    run = LocalRun(versions=[1, 2], timeout_s=20, versioned=True, staging=staging, fault=Fault("corrupt", 0, 1, 2),
                   bucket_bytes=4 << 10)
    results, errors = run_local(plan, run, allow_failures=True)
    assert not errors
    for rank in plan.inference_ranks:
        first, second = results[rank]["states"]
        assert first["serving"] == 1 and first["complete"]
        assert "verification failed" in second["error"]
        if staging:  # the old version was never touched
            assert second["serving"] == 1 and second["complete"]
        else:
            assert second["serving"] is None and not second["complete"]
    assert results[0]["stats"]["plan"][1].verified is False


@pytest.mark.parametrize("victim", [1, 5], ids=["sender", "receiver"])
def test_a_killed_rank_ends_the_sync_and_engines_are_marked_incomplete(plan, victim):
    t0 = time.monotonic()
    run = LocalRun(versions=[1, 2], timeout_s=5, versioned=True, fault=Fault("kill", victim, 1, 2), bucket_bytes=4 << 10)
    results, errors = run_local(plan, run, allow_failures=True)
    assert time.monotonic() - t0 < 60
    assert "a kill fault" in errors[victim]  # the launcher names the dead rank
    for rank in plan.inference_ranks:
        if rank in errors:
            continue
        first, second = results[rank]["states"]
        assert first["serving"] == 1
        assert second["serving"] is None and not second["complete"] and second["error"]
        assert "stage" in second["error"] or "checksums" in second["error"], second["error"]  # where it stopped
    # a fresh group afterwards works
    again, _ = run_local(plan, LocalRun(versions=[3], timeout_s=20))
    assert all(r["stats"]["plan"][0].verified for r in again.values())


def test_bucket_memory_stays_within_two_rounds_per_peer(plan):
    bucket = 4 << 10
    results, _ = run_local(plan, LocalRun(versions=[1], timeout_s=20, bucket_bytes=bucket))
    for rank, r in results.items():
        stats = r["stats"]["plan"][0]
        peers = len({p for p in stats.sent_to} | {c for c in plan.chunks["src"][plan.chunks["dst"] == rank].tolist()} - {rank})
        assert 0 < stats.peak_buffer_bytes <= 2 * bucket * max(peers, 1), (rank, stats.peak_buffer_bytes, peers)
        assert stats.peak_buffer_bytes < plan.chunks["nbytes"][(plan.chunks["src"] == rank) | (plan.chunks["dst"] == rank)].sum()


class _Recorder:
    def __init__(self):
        self.placements = []

    def set_placement(self, placement):
        self.placements.append(placement)


class _Verdict:  # a verifier that reports a given number of mismatches
    def __init__(self, bad):
        self.bad = bad

    def check(self, flats, transport, wait):
        return (["model.layers.0.mlp.experts.w13_weight"] * self.bad, self.bad)


@pytest.mark.parametrize("bad", [0, 1])
def test_engines_get_the_new_placement_only_after_a_verified_sync(bad):
    import torch

    from sync.executor import SyncStats, finish_sync
    from sync.transport import SoloTransport

    target, stats = _Recorder(), SyncStats(0)
    finish_sync(stats, {}, _Verdict(bad), SoloTransport(), lambda w, what: None, torch.device("cpu"), [target], "new")
    assert stats.verified is (bad == 0)
    assert target.placements == ([] if bad else ["new"])
