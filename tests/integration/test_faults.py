"""Faults mid-sync: corrupted bytes are caught, dead peers end the sync with an error naming them,
and every engine knows which version it serves (in place: none after a failure; staged: the old one)."""

from __future__ import annotations

import time

import numpy as np
import pytest

from planners import JobSpec, build_plan
from sync.channels.faulty import Fault
from sync.run.local import LocalRun, run_local

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


def test_measured_sync_memory_stays_within_the_bucket_budget():
    # ranks hold 4-9 MB each; a 256 KB budget: two rounds in flight may hold 512 KB, checksums included
    cfg = dict(model_type="qwen3", hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
               head_dim=32, vocab_size=16384, intermediate_size=1024, tie_word_embeddings=False, torch_dtype="bfloat16")
    plan = build_plan(JobSpec.from_dict(dict(model=dict(hf_config=cfg), trainer=dict(tp=2), inference=dict(tp=4))))
    bucket = 256 << 10
    results, _ = run_local(plan, LocalRun(versions=[1, 2, 3], timeout_s=30, bucket_bytes=bucket, measure_memory=True))
    for rank, r in results.items():
        first, *later = r["stats"]["plan"]
        held = sum(int(np.prod(plan.local_shape[lid])) * 2 for lid in plan.locals_of(rank))  # bf16
        assert held >= 8 * bucket and all(s.verified for s in r["stats"]["plan"])
        assert 0 < first.peak_buffer_bytes <= 2 * bucket, (rank, first.peak_buffer_bytes)  # the arena, kept
        for s in later:  # measured: resident-set high-water mark over the sync (first: one-time set-up)
            assert s.peak_extra_bytes is not None and s.peak_extra_bytes <= 2 * bucket, (rank, s.peak_extra_bytes)


class _Recorder:
    def __init__(self):
        self.placements = []

    def set_placement(self, placement):
        self.placements.append(placement)


class _Verdict:  # a verifier that reports a given number of mismatches
    def __init__(self, bad):
        self.bad = bad

    def check(self, flats, transport, wait, agree=True):
        return (["model.layers.0.mlp.experts.w13_weight"] * self.bad, self.bad if agree else None)


@pytest.mark.parametrize("bad", [0, 1])
def test_engines_get_the_new_placement_only_after_a_verified_sync(bad):
    import torch

    from sync.executor import SyncStats, finish_sync
    from sync.transport import SoloTransport

    class Plan:  # the plan's side of it: each engine rank's placement
        placement = "new"

        def placement_of(self, rank):
            return f"new for rank {rank}"

    target, stats = _Recorder(), SyncStats(0)
    finish_sync(stats, {}, _Verdict(bad), SoloTransport(), lambda w, what: None, torch.device("cpu"), {3: target}, Plan())
    assert stats.verified is (bad == 0)
    assert target.placements == ([] if bad else ["new for rank 3"])


def test_staging_beyond_its_budget_is_refused_before_any_byte_moves():
    from sync.ends.synthetic import BufferTarget
    from sync.ends.versioned import VersionedTarget

    job = JobSpec.from_dict({**JOB, "sync": dict(staging=True, staging_buckets=1, bucket_mb=0.001)})
    target = BufferTarget(build_plan(job), job.trainer.world_size)
    with pytest.raises(ValueError, match="staging_buckets x sync.bucket_mb allows 0.0 MB"):
        VersionedTarget.for_job(target, job.sync)
    roomy = JobSpec.from_dict({**JOB, "sync": dict(staging=True, staging_buckets=64, bucket_mb=1)})
    assert VersionedTarget.for_job(target, roomy.sync).staging_bytes > 0
