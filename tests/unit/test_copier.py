"""Copy programs: the foreach path and the Triton tile tables (replayed on the CPU) copy exactly the runs."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
import torch

from expected import random_runs
from planners.schedule.runs import RUN_DTYPE, apply_runs
from sync.copier import CopyProgram


def _ends(sizes, seed):
    g = torch.Generator().manual_seed(seed)
    src = {i + 100: torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g) for i, n in enumerate(sizes)}
    dst = {i + 200: torch.full((n,), 0xA5, dtype=torch.uint8) for i, n in enumerate(sizes)}
    return src, dst


def _replay(program: CopyProgram) -> None:
    """What the two Triton kernels do with each tile, by memmove at the tables' addresses."""
    for kind, base, table, vec, _, _ in program.launches:
        unit = base.element_size() * vec
        addr = base.data_ptr()
        for row in table.numpy().tolist():
            if kind == "flat":
                s, d, n = row
                ctypes.memmove(addr + d * unit, addr + s * unit, n * unit)
            else:
                s, d, rows, width, ss, ds = row
                for r in range(rows):
                    ctypes.memmove(addr + (d + r * ds) * unit, addr + (s + r * ss) * unit, width * unit)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("path", ["foreach", "tiles"])
def test_programs_copy_exactly_the_runs(seed, path):
    rng = np.random.default_rng(seed)
    sizes = [1 << 20, (1 << 20) + 3, 5 << 20]
    runs = random_runs(rng, sizes, 300)
    assert (runs["rows"] > 1).any() and (runs["rows"] == 1).any()
    src, dst = _ends(sizes, seed)
    want = {k: v.numpy().copy() for k, v in {**src, **dst}.items()}
    apply_runs(runs, want)
    for tile in (4096, 65536):
        for t in dst.values():
            t.fill_(0xA5)
        program = CopyProgram(runs, {**src, **dst}, tile_bytes=tile, use_triton=path == "tiles")
        if path == "tiles":
            assert program.launches and {k for k, *_ in program.launches} == {"flat", "rows"}
            _replay(program)
        else:
            program()
        for k, t in dst.items():
            np.testing.assert_array_equal(t.numpy(), want[k], err_msg=f"tensor {k}, tile {tile}")
        assert program.nbytes == int((runs["nbytes"] * runs["rows"]).sum())


def test_a_run_outside_its_tensor_is_refused():
    runs = np.array([(0, 10, 1, 0, 8, 1, 8, 8)], dtype=RUN_DTYPE)
    with pytest.raises(ValueError, match="outside its src"):
        CopyProgram(runs, {0: torch.zeros(16, dtype=torch.uint8), 1: torch.zeros(16, dtype=torch.uint8)})


def test_parts_over_one_base_merge_into_one_program_copying_the_same():
    """``CopyProgram.merged``: the moving chunks' parts of a first sync after a new placement become one
    program (one launch per kind of tile) for the syncs after; it copies exactly what the parts copy."""
    from sync.copier import WIDE_ROW
    from sync.copy_tables import run_tiles

    rng = np.random.default_rng(5)
    sizes = [1 << 20, (1 << 20) + 3, 5 << 20]
    runs = random_runs(rng, sizes, 300)
    src, dst = _ends(sizes, 5)
    ends = {**src, **dst}
    want = {k: v.numpy().copy() for k, v in ends.items()}
    apply_runs(runs, want)
    base = torch.empty(16, dtype=torch.uint8)
    at = lambda side: np.array([ends[int(i)].data_ptr() for i in runs[side]]) + runs[f"{side}_off"] - base.data_ptr()  # noqa: E731
    table = np.stack([at("src"), at("dst"), runs["nbytes"], runs["rows"], runs["src_stride"], runs["dst_stride"]], axis=1)
    parts = []
    for rows in np.array_split(np.arange(len(table)), 4):
        part = table[rows]
        strided = part[(part[:, 3] > 1) & (part[:, 2] < WIDE_ROW)]
        parts.append(CopyProgram.of_tiles(base, (run_tiles(part, 4096), strided, int((part[:, 2] * part[:, 3]).sum()),
                                                 len(part)), 4096))
    merged = CopyProgram.merged(parts)
    assert len(merged.launches) < sum(len(p.launches) for p in parts)
    assert (merged.nbytes, merged.num_runs) == (int((runs["nbytes"] * runs["rows"]).sum()), len(runs))
    _replay(merged)
    for k, t in dst.items():
        np.testing.assert_array_equal(t.numpy(), want[k], err_msg=f"tensor {k}")
    with pytest.raises(ValueError, match="one base"):
        CopyProgram.merged([parts[0], CopyProgram(runs, ends, 4096, use_triton=True)])
