"""What the RL loop learns: a task with a verifiable reward, its prompts, GRPO's group advantages.

The task is small enough for a tiny random model to learn in tens of iterations, and its reward lies in
[0, 1]: the share of completion tokens that fall in a target set (every ``every``-th token id; a random
policy scores about ``1 / every``). Pure numpy: the driver computes rewards and advantages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["GRPOSettings", "TargetTokens", "group_advantages", "prompt_groups"]


@dataclass(frozen=True)
class GRPOSettings:
    """One GRPO iteration: ``prompts`` prompts of ``prompt_tokens`` tokens, ``group`` completions each of
    ``completion_tokens`` tokens sampled at ``temperature``; Adam at ``lr``; ``kl_coef`` weighs the KL
    to the initial policy (k3 estimator; 0 leaves it out)."""

    prompts: int = 8
    group: int = 4
    prompt_tokens: int = 4
    completion_tokens: int = 6
    temperature: float = 1.0
    lr: float = 1e-2
    kl_coef: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for field in ("prompts", "group", "prompt_tokens", "completion_tokens"):
            if getattr(self, field) < 1:
                raise ValueError(f"GRPOSettings.{field}={getattr(self, field)} must be at least 1")
        if self.group < 2:
            raise ValueError(f"GRPOSettings.group={self.group}: group-relative advantages need 2 or more completions")
        if self.temperature <= 0:
            raise ValueError(f"GRPOSettings.temperature={self.temperature} must be > 0 (sampling, not greedy)")

    @property
    def sequences(self) -> int:
        return self.prompts * self.group


@dataclass(frozen=True)
class TargetTokens:
    """Reward: the share of completion tokens whose id is a multiple of ``every``."""

    vocab_size: int
    every: int = 8

    def prompts(self, settings: GRPOSettings, iteration: int) -> np.ndarray:
        """``[prompts, prompt_tokens]`` seeded by (seed, iteration)."""
        rng = np.random.default_rng([settings.seed, iteration])
        return rng.integers(0, self.vocab_size, (settings.prompts, settings.prompt_tokens))

    def reward(self, completions: np.ndarray) -> np.ndarray:
        """``[sequences]`` in [0, 1] for ``completions [sequences, completion_tokens]``."""
        return (np.asarray(completions) % self.every == 0).mean(axis=-1)


def prompt_groups(prompts: np.ndarray, group: int) -> np.ndarray:
    """Every prompt repeated ``group`` times, a group's sequences adjacent: ``[prompts * group, tokens]``."""
    return np.repeat(prompts, group, axis=0)


def group_advantages(rewards: np.ndarray, group: int, eps: float = 1e-6) -> np.ndarray:
    """GRPO's advantages: each reward less its group's mean, over the group's standard deviation
    (a group whose completions all scored alike teaches nothing: zeros)."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, group)
    centered = r - r.mean(axis=1, keepdims=True)
    return (centered / (r.std(axis=1, keepdims=True) + eps)).reshape(-1)
