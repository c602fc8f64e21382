"""One real sync through the vLLM worker extension (stub vLLM modules, gloo, local processes), with the
job's own bucket size and staging: the trainer ranks and the engine take them from the same plan."""

from __future__ import annotations

import numpy as np
import pytest

from expected import expected_engine
from fake_vllm import FakeWorker, expected_maps, fake_vllm_model, layer_views, per_model_state, rebalanced_plan, stub_vllm
from planners import JobSpec
from sync.ends.synthetic import SyntheticSource
from sync.ends import vllm as adapter
from sync.tensors import as_bits

SYNC_JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1),
                inference=dict(tp=1, dp=2, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=4),
                deployment=dict(gpus_per_node=2), sync=dict(bucket_mb=0.01, staging=True, timeout_s=60))


def _sync_rank(rank: int, plan_json: dict, port: int, version: int):
    from sync.session import Session

    plan = adapter.SyncPlan.from_dict(plan_json)
    if rank < plan.num_trainer:  # the job's settings, from the plan, as the extension takes them
        session = Session.join(plan, rank, "127.0.0.1", port, store_on_rank0=False,
                               source=SyntheticSource(plan, rank, version=version))
        return {"verified": session.sync(version).verified}
    mp = pytest.MonkeyPatch()
    coords = JobSpec.from_dict(SYNC_JOB).inference.coords(rank - plan.num_trainer)
    stub_vllm(mp, tp=(coords.tp, 1), dp=(coords.dp, 2))
    L, E, P = 4, 8, 12
    model = fake_vllm_model(plan, rank, routed=True)
    worker = FakeWorker(model, per_model_state(model, L, E, P), tensor_parallel_size=1)
    holder = worker.model_runner.eplb_state.model_states["main-hash"]
    views = layer_views(holder, L)
    assert worker.rlsync_init(plan_json, 0, "127.0.0.1", port, "gloo") == rank
    stats = worker.rlsync_sync(version=version)
    return {"stats": stats,
            "tensors": {ours: as_bits(t).numpy() for ours, t in worker._rlsync_target.tensors.items()},
            "maps": [t.numpy() for t in (holder.physical_to_logical_map, holder.logical_to_physical_map,
                                         holder.logical_replica_count)],
            "views": [(a.numpy(), b.numpy()) for a, b in views]}


def test_a_sync_through_the_extension_fills_the_model_and_installs_the_placement():
    from sync.run.local import host_store, spawn_ranks

    job, plan = rebalanced_plan(SYNC_JOB)
    store = host_store()
    results, _ = spawn_ranks(plan.num_ranks, _sync_rank, (plan.to_dict(), store.port, 2), timeout_s=120)
    want = expected_engine(job, plan, 2)
    p2l, l2p, cnt = expected_maps(plan.placement.phy2log, job.model.num_experts)
    for rank in plan.inference_ranks:
        got = results[rank]
        assert got["stats"]["verified"] and got["stats"]["rank"] == rank and not got["stats"]["mismatched"]
        assert got["stats"]["engine"]["serving"] == 2 and got["stats"]["engine"]["complete"]  # staged, committed
        assert sorted(got["tensors"]) == sorted(want[rank])
        for name, w in want[rank].items():
            np.testing.assert_array_equal(got["tensors"][name], w, err_msg=f"rank {rank} {name}")
        for have, expected in zip(got["maps"], (p2l, l2p, cnt)):
            np.testing.assert_array_equal(have, expected)
        for i, (l2p_row, cnt_row) in enumerate(got["views"]):
            np.testing.assert_array_equal(l2p_row, l2p[i])
            np.testing.assert_array_equal(cnt_row, cnt[i])
    assert results[0]["verified"]


