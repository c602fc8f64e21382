"""The GRPO task, its advantages and the checks a GRPO run makes of its job before anything starts."""

from __future__ import annotations

import numpy as np
import pytest

from planners import JobSpec
from sync.rl.task import GRPOSettings, TargetTokens, group_advantages, prompt_groups
from sync.run.grpo import check_grpo_job


def test_advantages_are_group_relative():
    rewards = np.array([0.0, 1.0, 0.5, 0.5, 0.2, 0.2, 0.2, 0.2])
    adv = group_advantages(rewards, group=4).reshape(2, 4)
    np.testing.assert_allclose(adv[0], [-1.414, 1.414, 0.0, 0.0], atol=1e-3)  # (r - mean) / std
    assert not adv[1].any()  # completions that all scored alike teach nothing


def test_reward_is_the_share_of_target_tokens_and_prompts_are_seeded():
    task = TargetTokens(vocab_size=250, every=8)
    np.testing.assert_allclose(task.reward(np.array([[0, 8, 3, 16], [1, 2, 3, 5]])), [0.75, 0.0])
    settings = GRPOSettings(prompts=3, group=2)
    assert np.array_equal(task.prompts(settings, 4), task.prompts(settings, 4))
    assert not np.array_equal(task.prompts(settings, 4), task.prompts(settings, 5))
    groups = prompt_groups(task.prompts(settings, 1), settings.group)
    assert groups.shape == (6, settings.prompt_tokens) and np.array_equal(groups[0], groups[1])


@pytest.mark.parametrize("bad, field", [(dict(group=1), "group"), (dict(temperature=0.0), "temperature"),
                                        (dict(prompts=0), "prompts")])
def test_settings_name_what_is_wrong(bad, field):
    with pytest.raises(ValueError, match=f"GRPOSettings.{field}"):
        GRPOSettings(**bad)


def job(**trainer) -> JobSpec:
    return JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe", overrides=dict(torch_dtype="float32")),
                                  trainer=dict(tp=1, **trainer), inference=dict(tp=1, engines=2)))


@pytest.mark.parametrize("make, trainer, match", [
    (lambda: job(pp=2), "megatron", "trainer.pp=2"),
    (lambda: JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1), inference=dict(tp=1))),
     "megatron", "torch_dtype: float32"),
    (lambda: job(), "synthetic", "--trainer megatron"),
])
def test_a_grpo_run_refuses_what_it_cannot_train(make, trainer, match):
    with pytest.raises(ValueError, match=match):
        check_grpo_job(make(), GRPOSettings(), trainer)


def test_every_engine_needs_a_prompt_group():
    with pytest.raises(ValueError, match="raise --prompts"):
        check_grpo_job(job(), GRPOSettings(prompts=1), "megatron")
