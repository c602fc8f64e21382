"""The Triton copy kernels themselves (``sync.copy_kernel``), run by Triton's CPU interpreter where there
is no GPU: copy programs move exactly their runs (``test_copier`` replays the same tables without Triton;
``test_checksums`` runs the checksum kernels the same way)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import triton_kernels_run
from expected import random_runs
from planners.schedule.runs import apply_runs
from sync.copier import CopyProgram

pytestmark = pytest.mark.skipif(not triton_kernels_run(), reason="needs Triton (compiled on CUDA or interpreted)")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seed", [0, 1])
def test_the_copy_kernels_move_exactly_the_runs(seed):
    rng = np.random.default_rng(seed)
    sizes = [1 << 16, (1 << 16) + 3, 3 << 16]
    runs = random_runs(rng, sizes, 60)
    runs = runs[runs["nbytes"] * runs["rows"] <= 1 << 15]  # the interpreter runs each program in numpy
    assert (runs["rows"] > 1).any() and (runs["rows"] == 1).any()
    g = torch.Generator().manual_seed(seed)
    src = {i + 100: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to(_device()) for i, n in enumerate(sizes)}
    dst = {i + 200: torch.full((n,), 0xA5, dtype=torch.uint8, device=_device()) for i, n in enumerate(sizes)}
    want = {k: v.cpu().numpy().copy() for k, v in {**src, **dst}.items()}
    apply_runs(runs, want)
    program = CopyProgram(runs, {**src, **dst}, tile_bytes=4096, use_triton=True)
    assert {k for k, *_ in program.launches} == {"flat", "rows"}
    program()
    for k, t in dst.items():
        np.testing.assert_array_equal(t.cpu().numpy(), want[k], err_msg=f"tensor {k}")

