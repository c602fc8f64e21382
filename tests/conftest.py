"""Tests. ``tests/unit``: one process, no network, under half a minute (``pytest tests/unit``): exact
plans, oracles, properties and fuzzing, job and config errors, copy and checksum programs, the vLLM
adapter on stubs. ``tests/integration``: local processes over gloo, Ray, megatron-core models,
Hugging Face logits, GPUs (skipped without CUDA). The modules beside this one are what both share:
independent oracles (``vllm_reference``, ``megatron_oracle``), expected ends (``expected``), hypothesis
strategies (``strategies``) and a fake vLLM (``fake_vllm``). Here: random full weights and the
simulate-vs-reference check."""

from __future__ import annotations

import os
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from planners import JobSpec, build_plan  # noqa: E402
from planners.models import catalog  # noqa: E402
from vllm_reference import reference_rank  # noqa: E402


def triton_kernels_run() -> bool:
    """Whether Triton kernels run in this process: compiled on a CUDA machine, else in Triton's CPU
    interpreter (switched on below, as this module loads)."""
    import os

    import torch

    if find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def random_weights(job: JobSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in catalog(job.model).tensors}


def assert_plan_exact(job: JobSpec, seed: int = 0, load=None):
    """Build, validate and simulate ``job``; every inference rank must equal the direct slices."""
    return assert_simulates_exactly(job, build_plan(job, load).validate(), seed)


def assert_simulates_exactly(job: JobSpec, plan, seed: int = 0):
    """``plan.simulate`` of random weights gives every inference rank exactly the direct slices."""
    full = random_weights(job, seed)
    got = plan.simulate(full)
    T = job.trainer.world_size
    for r in range(job.inference.world_size):
        placement = plan.placement_of(T + r)  # its engine's own, where engines have their own
        phy2log = placement.phy2log if placement is not None else None
        want = reference_rank(job.model, job.inference, phy2log, r % job.inference.engine_size, full)
        have = got[T + r]
        assert sorted(have) == sorted(want), f"rank {T + r}: names differ: {sorted(set(have) ^ set(want))}"
        for name, w in want.items():
            assert have[name].shape == w.shape, f"rank {T + r} {name}: {have[name].shape} != {w.shape}"
            np.testing.assert_array_equal(have[name], w, err_msg=f"rank {T + r} {name}")
    return plan


@pytest.fixture
def exact():
    return assert_plan_exact


def _has_vllm() -> bool:
    """vLLM installed (not ``tests/vllm``, which ``find_spec`` would take for a namespace package)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        version("vllm")
    except PackageNotFoundError:
        return False
    return True


# tests/vllm runs in the environment scripts/setup_vllm_tests.sh makes (vLLM installed); elsewhere it is left out
collect_ignore = [] if _has_vllm() else ["vllm"]


def _interpret_triton_without_a_gpu() -> None:
    """Without a GPU, Triton's CPU interpreter runs the project's Triton kernels in the tests. Triton reads
    the switch as it loads, and megatron-core imports it when it can, so it is set here, before any test
    module is collected; not beside vLLM, whose own Triton kernels stay as they are."""
    import torch

    if not torch.cuda.is_available() and not _has_vllm() and "triton" not in sys.modules:
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_a_gpu()
