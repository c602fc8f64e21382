"""Copy programs built from chunk rows by the compiled pass (``CopyProgram.of_chunks``) have exactly the
tables of those built from ``chunk_runs``' runs, on random plans, and refuse what those refuse.
(``test_copier`` replays tables, wide strided rows included, against ``apply_runs`` byte for byte.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planners import build_plan
from planners.eplb.stats import synthetic_load
from planners.schedule.runs import chunk_runs
from strategies import jobs
from sync.copier import CopyProgram
from sync.executor import EndTable
from sync.tensors import TORCH_DTYPES


def _ends(plan, rng) -> EndTable:
    """Every local tensor at a made-up address, some of them only 2 or 4 bytes aligned."""
    nbytes = np.array([int(np.prod(shape)) * TORCH_DTYPES[dtype].itemsize
                       for shape, dtype in zip(plan.local_shape, plan.local_dtype)], dtype=np.int64)
    gaps = rng.choice([0, 2, 4, 16, 4096], size=len(nbytes))
    ptr = (1 << 40) + np.cumsum(nbytes + gaps) - nbytes
    return EndTable(np.stack([ptr.astype(np.int64), nbytes], axis=1), torch.device("cpu"))


def _shapes(plan) -> np.ndarray:
    return np.stack([plan.table.itemsize, plan.table.outer, plan.table.inner], axis=1)


def _absolute(program: CopyProgram) -> list[tuple]:
    """Each launch as (kind, vec, block, its tiles with addresses in bytes, sorted): programs may differ in
    their base and in the order of the tiles of one launch."""
    out = []
    for kind, base, table, vec, block, tiles in program.launches:
        unit = base.element_size() * vec
        rows = table.numpy().copy()
        rows[:, :2] = rows[:, :2] * unit + base.data_ptr()
        if kind == "rows":
            rows[:, 4:] *= unit
        out.append((kind, unit, block, tiles, sorted(rows.tolist())))
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs(), st.integers(0, 2**16), st.sampled_from([256, 4096, 65536]))
def test_compiled_tables_equal_the_reference(job, seed, tile):
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=seed) if job.model.is_moe else None
    plan = build_plan(job, load)
    rng = np.random.default_rng(seed)
    ends = _ends(plan, rng)
    rows = np.sort(rng.choice(len(plan.chunks), size=rng.integers(1, len(plan.chunks) + 1), replace=False))
    want = CopyProgram(chunk_runs(plan, rows), {}, tile, use_triton=True, table=ends)
    got = CopyProgram.of_chunks(plan.chunks, rows, _shapes(plan), ends, tile)
    assert (got.nbytes, got.num_runs) == (want.nbytes, want.num_runs)
    assert _absolute(got) == _absolute(want)


def test_a_chunk_outside_its_tensor_or_at_an_unbound_end_is_refused():
    from planners import JobSpec

    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2), inference=dict(tp=4)))
    plan = build_plan(job)
    ends = _ends(plan, np.random.default_rng(0))
    rows = np.arange(len(plan.chunks))
    small = EndTable(ends.packed.copy(), ends.device)
    small.nbytes[plan.chunks["dst_local"][0]] -= 1
    with pytest.raises(ValueError, match="outside its dst tensor"):
        CopyProgram.of_chunks(plan.chunks, rows, _shapes(plan), small, 4096)
    unbound = EndTable(ends.packed.copy(), ends.device)
    unbound.nbytes[plan.chunks["src_local"][3]] = -1
    with pytest.raises(ValueError, match=rf"ends \[{plan.chunks['src_local'][3]}\]"):
        CopyProgram.of_chunks(plan.chunks, rows, _shapes(plan), unbound, 4096)


def test_strided_runs_and_several_alignment_classes_are_covered():
    from planners import JobSpec

    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2), inference=dict(tp=4)))
    plan = build_plan(job)
    ends = _ends(plan, np.random.default_rng(1))
    rows = np.arange(len(plan.chunks))
    want = CopyProgram(chunk_runs(plan, rows), {}, 4096, use_triton=True, table=ends)
    got = CopyProgram.of_chunks(plan.chunks, rows, _shapes(plan), ends, 4096)
    assert _absolute(got) == _absolute(want)
    kinds = {(kind, unit) for kind, unit, *_ in _absolute(got)}
    assert {"flat", "rows"} <= {k for k, _ in kinds} and len({u for k, u in kinds if k == "flat"}) >= 2, kinds


def test_chunk_columns_are_the_fields():
    from planners import JobSpec
    from sync.copy_tables import COLUMNS, chunk_columns

    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2), inference=dict(tp=4)))
    plan = build_plan(job)
    chunks = plan.chunks
    columns = chunk_columns(chunks, plan.table.expert)
    assert set(columns) == set(COLUMNS) | {"moving"}
    for name in COLUMNS:
        assert columns[name].dtype == chunks.dtype[name] and columns[name].flags.c_contiguous
        np.testing.assert_array_equal(columns[name], chunks[name], err_msg=name)
    moving = plan.table.expert[chunks["tensor"]] >= 0
    assert moving.any() and not moving.all()
    np.testing.assert_array_equal(columns["moving"], moving)


def test_strided_runs_with_rows_long_enough_to_cut_alone():
    from planners import JobSpec
    from sync.copier import WIDE_ROW

    cfg = dict(model_type="llama", hidden_size=4096, num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=256, torch_dtype="float32")
    plan = build_plan(JobSpec.from_dict(dict(model=dict(hf_config=cfg), trainer=dict(tp=1), inference=dict(tp=2))))
    rows = np.arange(len(plan.chunks))
    runs = chunk_runs(plan, rows)
    assert ((runs["rows"] > 1) & (runs["nbytes"] >= WIDE_ROW)).any()
    ends = _ends(plan, np.random.default_rng(2))
    want = CopyProgram(runs, {}, 65536, use_triton=True, table=ends)
    got = CopyProgram.of_chunks(plan.chunks, rows, _shapes(plan), ends, 65536)
    assert (got.nbytes, got.num_runs) == (want.nbytes, want.num_runs)
    assert _absolute(got) == _absolute(want)
