"""``rlsync run``'s GRPO loop on Ray: trainer and engine log-probs of the sampled tokens agree after every
sync, and drift apart at once when the engines are never refreshed (the control)."""

from __future__ import annotations

import json

import pytest

from planners import JobSpec
from sync.rl.task import GRPOSettings

pytest.importorskip("megatron.core")
pytest.importorskip("ray")

JOB = dict(name="grpo-test", model=dict(preset="tiny_qwen3_moe", overrides=dict(torch_dtype="float32")),
           trainer=dict(tp=1, ep=2), inference=dict(tp=2, enable_ep=True),
           eplb=dict(enabled=True, num_redundant_experts=2), sync=dict(timeout_s=60, verify="logits"))
SETTINGS = GRPOSettings(prompts=2, group=4, completion_tokens=4, lr=1e-2)


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield
    ray.shutdown()


def test_synced_engines_sample_what_the_trainer_computes(ray_local, tmp_path):
    from sync.run.loop import run_job

    report = run_job(JobSpec.from_dict(JOB), iterations=3, report_dir=tmp_path, grpo=SETTINGS)
    rows = report["iterations"]
    assert report["step"] == "grpo" and report["initial_sync"]["verified"]
    assert all(r["verified"] and not r["errors"] for r in rows), [r["errors"] for r in rows]
    assert all(r["logprob_mismatch"] <= 1e-4 for r in rows), [r["logprob_mismatch"] for r in rows]
    assert all(0.0 <= r["reward_mean"] <= 1.0 and r["train_seconds"] > 0 and r["rollout_seconds"] > 0 for r in rows)
    assert all(r["logits_gap"] and all(g is None for g in r["logits_gap"].values()) for r in rows)  # trained weights
    assert {"reward.png", "mismatch.png", "time_share.png"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "report.json").read_text())["iterations"][0]["reward_mean"] == rows[0]["reward_mean"]


def test_without_syncs_the_engines_fall_behind_the_trainer(ray_local):
    from sync.run.loop import run_job

    report = run_job(JobSpec.from_dict(JOB), iterations=3, grpo=SETTINGS, sync_weights=False)
    gaps = [r["logprob_mismatch"] for r in report["iterations"]]
    assert gaps[0] <= 1e-4  # both still hold the initial policy
    assert min(gaps[1:]) > 1e-2, gaps  # the trainer stepped; the engines did not follow
    assert all(r["verified"] is None and r["sync_seconds"] is None for r in report["iterations"])


def test_engines_balanced_by_their_own_traffic_still_sample_what_the_trainer_computes(ray_local):
    """``eplb.per_engine``: each engine's rollouts give it its own load and so its own placement; every sync
    fills each engine's slots by its own placement, and its log-probs still equal the trainer's."""
    from sync.run.loop import run_job

    job = JobSpec.from_dict({**JOB, "inference": dict(tp=1, dp=2, enable_ep=True, engines=2),
                             "eplb": dict(enabled=True, num_redundant_experts=2, per_engine=True)})
    report = run_job(job, iterations=2, grpo=SETTINGS)
    rows = report["iterations"]
    assert all(r["verified"] and not r["errors"] for r in rows), [r["errors"] for r in rows]
    assert all(r["logprob_mismatch"] <= 1e-4 for r in rows), [r["logprob_mismatch"] for r in rows]
    first, second = report["expert_placement"]  # [engines, MoE layers, slots]
    assert first != second  # different prompts, different loads, different placements
