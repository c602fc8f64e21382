"""The Triton copy and checksum kernels themselves (``sync.copy_kernel``, ``sync.verify.kernel``), run by
Triton's CPU interpreter where there is no GPU: copy programs move exactly their runs, and tile sums equal
the numba kernels' and the chunk-by-chunk checksums. (``test_copier`` and ``test_checksums`` replay the
same tables without Triton.)"""

from __future__ import annotations

from importlib.util import find_spec

import numpy as np
import pytest
import torch

from conftest import triton_kernels_run
from expected import random_runs
from planners.schedule.runs import RUN_DTYPE, apply_runs
from sync.copier import CopyProgram
from sync.verify.checksums import checksum_block

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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
def test_the_checksum_kernels_equal_the_numba_ones_and_block_checksums(dtype):
    from sync.verify.batched import RunSums

    g = torch.Generator().manual_seed(0)
    src = torch.randn(1 << 14, generator=g).to(dtype)
    size = src.element_size()
    # (src element offset, rows, width, src stride, destination, dst element offset, dst stride)
    blocks = [(0, 1, 3000, 3000, 0, 7, 3000), (100, 3, 64, 200, 1, 0, 64), (5000, 4, 1500, 1600, 1, 500, 9000),
              (300, 20, 33, 50, 2, 11, 40), (16000, 1, 1, 1, 2, 3, 1)]
    runs = np.zeros(len(blocks), dtype=RUN_DTYPE)
    for i, (so, rows, width, ss, d, do, ds) in enumerate(blocks):
        runs[i] = (0, so * size, d, do * size, width * size, rows, ss * size, ds * size)
    want = np.zeros((3, 2), dtype=np.int64)
    for so, rows, width, ss, d, do, ds in blocks:  # each row a [1, 1, width] block at its destination position
        for r in range(rows):
            row = src[so + r * ss: so + r * ss + width].reshape(1, 1, width)
            a, b = checksum_block(row, do + r * ds, 1, 0)
            want[d] += [a, b]
    # Triton compiled on CUDA, interpreted on the CPU; numba where it is installed (not on the lent GPU machine)
    for kernels in ("numba", "triton") if find_spec("numba") else ("triton",):
        ends = {0: src.to(_device()) if kernels == "triton" else src}
        sums = RunSums(runs, np.full(len(runs), size), runs["dst"], 3, ends, tile_elems=1024, kernels=kernels)
        assert {k for k, *_ in sums.launches} == {"flat", "rows"}
        np.testing.assert_array_equal(sums().cpu().numpy(), want, err_msg=kernels)
