"""FP8 engines over gloo: trainer ranks quantize their own slices (or engines what a cut block brings in full
precision), the bytes move as FP8 values and scales, and every engine tensor is bit-identical to the
planner's numpy reference quantizer of the same weights; checksums verify every sync."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from planners import JobSpec, build_plan
from planners.eplb.stats import synthetic_load
from planners.quant import is_derived_tensor
from sync.ends.synthetic import synthetic_tensor
from sync.run.local import LocalRun, run_local
from fp8_cases import CASES


def expected(plan, version: int) -> dict[int, dict[str, np.ndarray]]:
    """``plan.simulate`` of the synthetic weights of ``version`` (bfloat16 values, given as float32), as
    the bit patterns the engines hold."""
    held = {t.name: synthetic_tensor(t, i, 0, version).float().numpy() for i, t in enumerate(plan.tensors)
            if not is_derived_tensor(t.name)}
    out = {}
    for rank, tensors in plan.simulate(held).items():
        bits = {}
        for i in plan.locals_of(rank):
            name, dtype = plan.local_name[i], plan.local_dtype[i]
            if ":" in name:
                continue
            value = tensors[name]
            if dtype == "float8_e4m3fn":
                bits[name] = value.view(np.int8)
            elif dtype == "float32":
                bits[name] = value.view(np.int32)
            else:  # bfloat16 values held as float32 by the simulation
                bits[name] = torch.from_numpy(np.ascontiguousarray(value)).to(torch.bfloat16).view(torch.int16).numpy()
        out[rank] = bits
    return out


@pytest.mark.parametrize("name", ["moe ep eplb", "mla tp2", "dense colocated"])
def test_fp8_syncs_are_bit_exact_and_verified(name):
    job = JobSpec.from_dict({**CASES[name], "sync": dict(bucket_mb=0.05, timeout_s=60)})
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.3, seed=2) if job.eplb.enabled else None
    plan = build_plan(job, load).validate()
    versions = [1, 2]
    results, _ = run_local(plan, LocalRun(versions=versions, bucket_bytes=64 << 10, timeout_s=60, return_tensors=True))
    for i, version in enumerate(versions):
        for rank, want in expected(plan, version).items():
            got = results[rank]["tensors"][i]
            assert sorted(got) == sorted(want), rank
            for tensor, w in want.items():
                np.testing.assert_array_equal(got[tensor], w, err_msg=f"v{version} rank {rank} {tensor}")
    for rank, r in results.items():
        assert all(s.verified for s in r["stats"]["plan"]), rank


def test_rlsync_run_refreshes_fp8_engines_and_their_logits_match(tmp_path):
    """``rlsync run`` with block-FP8 engines: every iteration verified by checksums and by the engines'
    logits against Hugging Face holding the trainer's weights through the reference quantizer."""
    ray = pytest.importorskip("ray")
    from sync.run.loop import run_job

    job = JobSpec.from_yaml("examples/tiny_moe_fp8.yaml")
    try:
        report = run_job(job, iterations=2, trainer="synthetic", step="seeded")
    finally:
        ray.shutdown()
    rows = report["iterations"]
    assert all(r["verified"] and not r["errors"] for r in rows), [r["errors"] for r in rows]
    assert all(r["logits_gap"] and all(g is None for g in r["logits_gap"].values()) for r in rows)


def _api_rank(rank: int, port: int):
    from sync.api import Synchronizer
    from sync.ends.synthetic import BufferTarget, SyntheticSource
    from sync.tensors import as_bits

    job = JobSpec.from_dict({**CASES["moe ep eplb"], "sync": dict(timeout_s=60, bucket_mb=0.05)})
    sync = Synchronizer.from_job(job, rank, port=port, store_on_rank0=False)
    target = None
    if rank < job.trainer.world_size:
        sync.source = SyntheticSource(build_plan(job), rank, version=1)  # the whole plan's geometry: the same tensors
    else:
        sync.target = target = BufferTarget(sync.plan, rank)
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.3, seed=4)
    report = sync.sync(1, expert_load=load)
    tensors = {k: as_bits(v).numpy() for k, v in target.tensors.items()} if target is not None else None
    return report.verified, tensors, report.placement.phy2log.tolist()


def test_synchronizer_ranks_sync_fp8_engines_by_their_own_part_of_the_plan():
    """Each rank plans its own part (PlanBuilder.rank_plan) of an FP8 job for a new placement, trainer ranks
    quantize, and every engine tensor is the reference quantizer's of the same weights."""
    from planners.build import PlanBuilder
    from planners.eplb.placement import placement_from_phy2log
    from sync.run.local import host_store, spawn_ranks

    job = JobSpec.from_dict(CASES["moe ep eplb"])
    store = host_store()
    results, _ = spawn_ranks(job.trainer.world_size + job.inference.world_size, _api_rank, (store.port,), timeout_s=120)
    phy2log = results[0][2]
    plan = PlanBuilder.for_job(job).plan(placement_from_phy2log(phy2log))
    want = expected(plan, 1)
    for rank, (verified, tensors, placed) in results.items():
        assert verified and placed == phy2log, rank
        if tensors is not None:
            assert sorted(tensors) == sorted(want[rank])
            for name, w in want[rank].items():
                np.testing.assert_array_equal(tensors[name], w, err_msg=f"rank {rank} {name}")
