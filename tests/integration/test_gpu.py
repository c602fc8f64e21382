"""GPU paths: Triton run copies, CUDA syncs bit-exact, CUDA IPC between processes on one GPU.

Skipped without CUDA (CI has none); run on the lent GPU machine: ``python -m pytest tests/test_gpu.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expected import endpoints, random_runs, source_shards
from planners import JobSpec, build_plan
from planners.schedule.runs import apply_runs
from sync.copier import CopyProgram, triton_available
from sync.ends.synthetic import BufferTarget, SyntheticSource
from sync.executor import PlanExecutor
from sync.tensors import as_bits
from sync.transport import SoloTransport

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

JOB = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2), inference=dict(tp=2, dp=2, enable_ep=True),
           deployment=dict(mode="colocated", gpus_per_node=4), eplb=dict(num_redundant_experts=4))


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_triton_program_equals_reference_on_random_runs(seed):
    rng = np.random.default_rng(seed)
    sizes = [1 << 20, (1 << 20) + 3, 5 << 20]
    src = {i + 100: torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda") for i, n in enumerate(sizes)}
    dst = {i + 200: torch.full((n,), 0xA5, dtype=torch.uint8, device="cuda") for i, n in enumerate(sizes)}
    runs = random_runs(rng, sizes, 400)
    assert (runs["rows"] > 1).any()
    want = {k: v.cpu().numpy().copy() for k, v in {**src, **dst}.items()}
    apply_runs(runs, want)
    for tile in (4096, 65536):
        for t in dst.values():
            t.fill_(0xA5)
        program = CopyProgram(runs, {**src, **dst}, tile_bytes=tile)
        assert program.launches, "Triton path expected on CUDA"
        program()
        torch.cuda.synchronize()
        for k, t in dst.items():
            np.testing.assert_array_equal(t.cpu().numpy(), want[k], err_msg=f"tensor {k}, tile {tile}")


@pytest.mark.parametrize("copies", ["auto", "foreach", "slices"])
def test_cuda_sync_hosting_every_rank_is_bit_exact(copies):
    plan = build_plan(JobSpec.from_dict(JOB)).validate()
    ex = PlanExecutor(plan, range(plan.num_ranks), SoloTransport(), copies=copies)
    for version in (1, 2):
        sources, targets = endpoints(plan, range(plan.num_ranks), version, "cuda")
        stats = ex.sync(sources, targets)
        assert stats.verified
        for r, target in targets.items():
            for name, want in source_shards(plan, r, version).items():
                assert torch.equal(as_bits(target.tensors[name].cpu()), as_bits(want)), (r, name)


def test_batched_checksums_equal_chunk_by_chunk_ones_and_catch_a_flipped_byte():
    plan = build_plan(JobSpec.from_dict(JOB)).validate()
    ex = PlanExecutor(plan, range(plan.num_ranks), SoloTransport())
    sources, targets = endpoints(plan, range(plan.num_ranks), 1, "cuda")
    assert ex.sync(sources, targets).verified
    flats = ex._binding.flats
    batched = ex.verifier.expected(flats)
    assert torch.equal(batched.cpu(), ex.verifier._expected_slices(flats, ex.verifier.work))
    rank, target = next(iter(targets.items()))
    name = sorted(target.tensors)[3]
    target.tensors[name].view(-1).view(torch.uint8)[5] ^= 0x10
    bad, total = ex.verifier.check(flats, SoloTransport(), lambda work, label: work.wait())
    assert bad == [name] and total == 1


def test_cuda_sync_rebinds_when_a_tensor_moved_between_syncs():
    plan = build_plan(JobSpec.from_dict(JOB)).validate()
    ex = PlanExecutor(plan, range(plan.num_ranks), SoloTransport())
    sources, targets = endpoints(plan, range(plan.num_ranks), 1, "cuda")
    assert ex.sync(sources, targets).verified
    rank, target = next(iter(targets.items()))
    name = next(iter(target.tensors))
    target.tensors[name] = torch.zeros_like(target.tensors[name])  # the engine reallocated one weight
    for s in sources.values():
        s.set_version(2)
    assert ex.sync(sources, targets).verified
    want = source_shards(plan, rank, 2)[name]
    assert torch.equal(as_bits(target.tensors[name].cpu()), as_bits(want))


@pytest.mark.skipif(not triton_available(), reason="needs Triton")
def test_programs_uploaded_from_one_reused_pinned_buffer_copy_exactly():
    from sync.copier import PinnedTables

    rng = np.random.default_rng(7)
    sizes = [1 << 20, 3 << 20]
    src = {i + 100: torch.randint(0, 256, (n,), dtype=torch.uint8, device="cuda") for i, n in enumerate(sizes)}
    dst = {i + 200: torch.full((n,), 0xA5, dtype=torch.uint8, device="cuda") for i, n in enumerate(sizes)}
    staging = PinnedTables(torch.device("cuda"))
    batches = []
    for _ in range(3):  # each batch refills the buffer from its start, growing it on the way
        staging.begin()
        batches.append([(runs, CopyProgram(runs, {**src, **dst}, tile_bytes=4096, staging=staging))
                        for runs in (random_runs(rng, sizes, 200) for _ in range(4))])
    for batch in batches:  # the first batches' tables were uploaded before the buffer was reused
        for runs, program in batch:
            want = {k: v.cpu().numpy().copy() for k, v in {**src, **dst}.items()}
            apply_runs(runs, want)
            program()
            torch.cuda.synchronize()
            for k, t in dst.items():
                np.testing.assert_array_equal(t.cpu().numpy(), want[k], err_msg=f"tensor {k}")


def test_cuda_syncs_after_new_placements_are_bit_exact(monkeypatch):
    """The first sync after each new placement programs its moving chunks in parts while copying; the
    next runs them merged into one program."""
    import sync.executor as executor
    from planners.build import PlanBuilder
    from planners.eplb.stats import synthetic_load
    from sync.session import Session

    monkeypatch.setattr(executor, "_FIRST_PENDING", 3)  # parts of 3, 6, 12, ... chunks
    job = JobSpec.from_dict({**JOB, "eplb": dict(enabled=True, num_redundant_experts=4)})
    builder = PlanBuilder.for_job(job)
    load = lambda seed: synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.5, seed=seed)  # noqa: E731
    plan = builder.plan(job.placement(load(10)))
    sources, targets = endpoints(plan, range(plan.num_ranks), 1, "cuda")
    session = Session.open(plan, range(plan.num_ranks), SoloTransport(), sources, targets)
    assert session.sync(version=1).verified
    for seed in range(3):
        new = builder.plan(job.placement(load(seed)))
        assert not np.array_equal(new.placement.phy2log, session.plan.placement.phy2log)
        session.replan(new)
        for version in (2 * seed + 2, 2 * seed + 3):  # programmed in parts, then run merged
            for s in sources.values():
                s.set_version(version)
            assert session.sync(version=version).verified
            for r, target in targets.items():
                for name, want in source_shards(new, r, version).items():
                    assert torch.equal(as_bits(target.tensors[name].cpu()), as_bits(want)), (version, r, name)


def _ipc_rank(rank: int, plan, port: int, versions: list[int], mode: str):
    from sync.transport import standalone_transport

    torch.cuda.set_device(0)
    transport = standalone_transport(rank, 2, "127.0.0.1", port, 60, store_on_rank0=False)
    ex = PlanExecutor(plan, rank, transport, bucket_bytes=1 << 16, timeout_s=60, ipc=mode)
    source = SyntheticSource(plan, rank, device="cuda") if rank < plan.num_trainer else None
    target = BufferTarget(plan, rank, device="cuda") if rank >= plan.num_trainer else None
    out = []
    for i, v in enumerate(versions):
        if source is not None:
            source.set_version(v)
            if i == 2:  # the trainer reallocated one weight: the engine must read the new one, not the old
                name = next(iter(source.tensors))
                old = source.tensors[name]
                source.tensors[name] = old.clone()
                old.fill_(7)
        stats = ex.sync(source, target)
        graphed = ex._pull is not None and any(g is not None for g in ex._pull[3].values())  # direct: replayed pulls
        out.append((stats.verified, stats.bytes_sent, stats.bytes_received,
                    None if target is None else {k: as_bits(t.cpu()).numpy() for k, t in target.tensors.items()},
                    graphed))
    return out


@pytest.mark.parametrize("mode", ["arena", "direct"])
def test_cuda_ipc_between_a_trainer_and_an_engine_process_on_one_gpu(mode):
    from sync.run.local import host_store, spawn_ranks

    job = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1), inference=dict(tp=1),
               deployment=dict(mode="colocated"))
    plan = build_plan(JobSpec.from_dict(job)).validate()
    assert plan.num_ranks == 2 and plan.devices[0] == plan.devices[1]
    store = host_store()
    # direct: the engine pulls as launched (sync 1), then replays them as a CUDA graph (2); the trainer's
    # reallocation makes it launch anew (3) and replay again (4, 5)
    versions = [1, 2, 3, 4, 5]
    results, _ = spawn_ranks(2, _ipc_rank, (plan, store.port, versions, mode), timeout_s=180)
    if mode == "direct":
        assert [r[4] for r in results[1]] == [False, True, False, True, True]
    for i, v in enumerate(versions):
        assert results[0][i][0] and results[1][i][0]
        assert results[0][i][1] == results[1][i][2] > 0  # bytes the trainer shared = bytes the engine read
        for name, want in source_shards(plan, 1, v).items():
            np.testing.assert_array_equal(results[1][i][3][name], as_bits(want).numpy(), err_msg=f"v{v} {name}")

