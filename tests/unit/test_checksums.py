"""Batched checksums: RunSums' tile tables, replayed on the CPU, give the chunk-by-chunk checksums."""

from __future__ import annotations

import ctypes
from importlib.util import find_spec

import numpy as np
import pytest
import torch

from conftest import triton_kernels_run
from planners.schedule.runs import RUN_DTYPE
from sync.verify.batched import RunSums
from sync.verify.checksums import MIX_K1, MIX_K2, checksum_block, wrap_int64

_NP = {torch.int8: np.uint8, torch.int16: np.uint16, torch.int32: np.uint32}  # the elements as unsigned words


def _read(addr: int, count: int, dtype) -> np.ndarray:
    size = np.dtype(dtype).itemsize
    return np.frombuffer((ctypes.c_char * (count * size)).from_address(addr), dtype=dtype).astype(np.int64)


def _replay(sums: RunSums) -> np.ndarray:
    """What the two kernels and the final index_add do, element by element in numpy (int64 wraps the same way)."""
    total = np.zeros((sums.num_dst, 2), dtype=np.int64)
    with np.errstate(over="ignore"):
        for kind, base, table, start, dst, width in sums.launches:
            if isinstance(base, np.ndarray):  # the CPU's view over the ends' address range
                dt, size, address = base.dtype.type, base.itemsize, base.ctypes.data  # already unsigned
            else:
                dt, size, address = _NP[base.dtype], base.element_size(), base.data_ptr()
            for row, first, d in zip(np.asarray(table), start.numpy(), dst.numpy()):
                if kind == "flat":  # in units of the launch's alignment (width) on CUDA
                    src, n = (int(v) * (width if sums.kernels == "triton" else 1) for v in row)
                    x, pos = _read(address + int(src) * size, int(n), dt), np.arange(n, dtype=np.int64)
                else:
                    src, rows, width, ss, ds = (int(v) for v in row)
                    x = np.concatenate([_read(address + (src + r * ss) * size, width, dt) for r in range(rows)])
                    pos = (np.arange(rows, dtype=np.int64)[:, None] * ds + np.arange(width)).reshape(-1)
                h = (x * np.int64(MIX_K1) + x * x * np.int64(MIX_K2)) & 0xFFFFFFFF
                a, w = h.sum(), (h * pos).sum()
                total[d] += [a, np.int64(first) * a + w]
    return total


@pytest.mark.parametrize("kernels", ["c", "numba", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_kernels_run(), reason="needs Triton (compiled on CUDA or interpreted)"))])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float8_e4m3fn])
@pytest.mark.parametrize("tile_elems", [1024, 1 << 15])
def test_tile_sums_equal_block_checksums(dtype, kernels, tile_elems):
    """RunSums' tables, replayed element by element, and its kernels (C, numba; Triton compiled on CUDA,
    interpreted on the CPU) give the checksums of each block at its destination positions; large tiles
    take the Triton kernels several steps of their lanes (the position weights by running sums)."""
    if kernels == "numba" and find_spec("numba") is None:
        pytest.skip("needs numba")
    if kernels == "c" and _c_kernels() is None:
        pytest.skip("needs a C compiler")
    g = torch.Generator().manual_seed(0)
    src = torch.randn(1 << 16, generator=g).to(dtype)
    size = src.element_size()
    # (src element offset, rows, width, src stride, destination, dst element offset, dst stride)
    blocks = [(0, 1, 5000, 5000, 0, 7, 5000), (100, 3, 64, 200, 1, 0, 64), (9000, 8, 4100, 4200, 1, 500, 9000),
              (300, 40, 33, 50, 2, 11, 40), (60000, 1, 1, 1, 2, 3, 1)]
    runs = np.zeros(len(blocks), dtype=RUN_DTYPE)
    for i, (so, rows, width, ss, d, do, ds) in enumerate(blocks):
        runs[i] = (0, so * size, d, do * size, width * size, rows, ss * size, ds * size)
    if kernels == "triton" and torch.cuda.is_available():
        src = src.cuda()
    sums = RunSums(runs, np.full(len(runs), size), runs["dst"], 3, {0: src}, tile_elems=tile_elems, kernels=kernels)
    assert {k for k, *_ in sums.launches} == {"flat", "rows"}
    if kernels == "triton":  # 16-byte aligned tiles in whole vectors, the rest element by element
        assert {w for k, *_, w in sums.launches if k == "flat"} == {1, 16 // size}
    want = np.zeros((3, 2), dtype=np.int64)
    for so, rows, width, ss, d, do, ds in blocks:
        want[d] += _by_position(torch.as_strided(src, (rows, width), (ss, 1), so), do, ds)
    if not src.is_cuda:
        np.testing.assert_array_equal(_replay(sums), want)
    np.testing.assert_array_equal(sums().cpu().numpy(), want)  # the kernels


def _c_kernels():
    from sync.verify.c_kernel import library

    return library.get()


def _by_position(x: torch.Tensor, first: int, stride: int) -> tuple[int, int]:
    """(S0, S1) of rows landing ``stride`` elements apart from position ``first``, element by element."""
    size = x.element_size()
    bits = x.cpu().contiguous().view({1: torch.int8, 2: torch.int16, 4: torch.int32}[size]).to(torch.int64) & ((1 << 8 * size) - 1)
    rows, width = bits.shape
    pos = first + torch.arange(rows)[:, None] * stride + torch.arange(width)
    h = (bits * MIX_K1 + bits * bits * MIX_K2) & 0xFFFFFFFF
    return int(h.sum()), int((h * pos).sum())


def test_the_position_reference_agrees_with_block_checksums():
    x = torch.randn(6, 10).to(torch.bfloat16)
    # a [6, 1, 10] block whose rows land 30 apart from position 4 (split dimension of 3, index 0)
    assert _by_position(x, 4, 30) == checksum_block(x.reshape(6, 1, 10), 4, 3, 0)


def _synced(seed: int = 0):
    """A tiny MoE plan synced in one process (every rank hosted), verified, and every hosted tensor by local id."""
    from expected import endpoints
    from planners import JobSpec, build_plan
    from sync.executor import PlanExecutor
    from sync.transport import SoloTransport

    plan = build_plan(JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                                             inference=dict(tp=2, dp=2, enable_ep=True))))
    ranks = list(range(plan.num_ranks))
    sources, targets = endpoints(plan, ranks, version=seed + 1)
    executor = PlanExecutor(plan, ranks, SoloTransport())
    assert executor.sync(sources, targets, verify=True).verified
    flats = {}
    for r in ranks:
        tensors = (sources if r < plan.num_trainer else targets)[r].local_tensors()
        flats.update({int(lid): tensors[plan.local_name[lid]].view(-1) for lid in plan.locals_of(r)})
    return plan, executor, flats


def _mismatches(executor, flats) -> int:
    from sync.transport import SoloTransport

    return executor.verifier.check(flats, SoloTransport(), lambda work, label: None)[1]


@pytest.mark.parametrize("tamper", ["one byte", "two equal chunks swapped", "a range shifted by one element",
                                    "two neighbouring elements swapped"])
def test_verification_fails_for_each_kind_of_misplaced_byte(tamper):
    """After a verified sync, an engine tensor changed in place as a broken transfer would leave it:
    one flipped byte, two equal-size ranges exchanged, a range moved one element over, and two elements
    of one checksum word exchanged (the bf16 tensor is read as 4-byte words)."""
    plan, executor, flats = _synced()
    assert _mismatches(executor, flats) == 0
    victim = max((lid for lid in flats if lid >= executor.verifier.inf_first), key=lambda lid: flats[lid].numel())
    assert flats[victim].element_size() == 2 and executor.verifier.word[victim] == 4
    data = flats[victim].view(torch.uint8)
    size = flats[victim].element_size()
    n = data.numel() // 4
    if tamper == "one byte":
        data[n + 3] ^= 0x10
    elif tamper == "two equal chunks swapped":
        first, second = data[:n].clone(), data[2 * n: 3 * n].clone()
        data[:n], data[2 * n: 3 * n] = second, first
    elif tamper == "a range shifted by one element":
        data[size: n + size] = data[:n].clone()
    else:
        elements = flats[victim].view(torch.int16)
        k = next(i for i in range(0, elements.numel(), 2) if elements[i] != elements[i + 1])
        elements[k], elements[k + 1] = elements[k + 1].clone(), elements[k].clone()
    assert _mismatches(executor, flats) == 1


@pytest.mark.parametrize("job", [
    dict(trainer=dict(tp=2, ep=2), inference=dict(tp=2, dp=2, enable_ep=True, engines=2), eplb=dict(num_redundant_experts=4)),
    dict(trainer=dict(tp=2, pp=2), inference=dict(tp=1, engines=3), deployment=dict(gpus_per_node=4)),
    dict(trainer=dict(tp=2), inference=dict(tp=2, engines=2), deployment=dict(mode="disaggregated", gpus_per_node=2)),
], ids=["eplb, two engines", "three engines", "two engines on nodes of their own"])
def test_batched_expected_sums_equal_chunk_by_chunk_ones(job):
    """Each trainer rank's expected contributions, batched (chunks shifted from the sums of one reading the
    same bytes where they land in the same block shape: stage-2 chunks from their origin, stage-1 chunks
    of one source region to several engines from the first), equal the chunk-by-chunk checksums of every
    item; and the batched ones read each source region once."""
    from expected import endpoints
    from planners import JobSpec, build_plan
    from planners.eplb.stats import synthetic_load
    from sync.verify.verifier import Verifier

    spec = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), **job))
    load = synthetic_load(len(spec.model.moe_layers), spec.model.num_experts, 1.3, seed=1) if spec.eplb.enabled else None
    plan = build_plan(spec, load)
    sources, _ = endpoints(plan, range(plan.num_trainer), version=3)
    c = plan.chunks
    fanned = 0
    for r in range(plan.num_trainer):
        tensors = sources[r].local_tensors()
        flats = {int(lid): tensors[plan.local_name[lid]].view(-1) for lid in plan.locals_of(r)}
        verifier = Verifier(plan, r)
        read = []  # the runs the batched sums read
        summed = verifier._sums
        verifier._sums = lambda flats, runs, per_run=False: read.append(runs.copy()) or summed(flats, runs, per_run)
        assert torch.equal(verifier.expected(flats), verifier._expected_slices(flats, verifier.work))
        mine = (c["src"] == r) & (c["stage"] == 1)
        regions = {tuple(key): n for *key, n in zip(*(c[f][mine].tolist() for f in ("src_local", "src_base", "src_off",
                                                                                     "lo", "hi", "nbytes")))}
        fanned += len(verifier.work) - len(regions)  # chunks whose bytes another chunk's sums carry
        assert sum(int((runs["nbytes"] * runs["rows"]).sum()) for runs in read) == sum(regions.values())
    assert fanned > 0  # the fan-out the shift serves is there


@pytest.mark.parametrize("kernels", ["c", "numba", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_kernels_run(), reason="needs Triton (compiled on CUDA or interpreted)"))])
@pytest.mark.parametrize("skew", [0, 1], ids=["aligned", "a view one element in"])
def test_word_sums_of_two_byte_elements(kernels, skew):
    """bf16 data read as 4-byte words (two elements each, at word positions) by every kernel equals the
    block checksums of those words; a source view that starts mid-word (its address 2 bytes off) is read
    unaligned on the CPU and from an aligned copy by Triton."""
    if kernels == "numba" and find_spec("numba") is None:
        pytest.skip("needs numba")
    if kernels == "c" and _c_kernels() is None:
        pytest.skip("needs a C compiler")
    g = torch.Generator().manual_seed(1)
    whole = torch.randn((1 << 17) + 2, generator=g).to(torch.bfloat16)
    if kernels == "triton" and torch.cuda.is_available():
        whole = whole.cuda()
    src = whole[skew: skew + (1 << 17)]
    assert src.data_ptr() % 4 == 2 * skew
    words = src.clone().view(torch.int32)  # what the kernels must read, from aligned memory
    # (src word offset, rows, width, src stride, destination, dst word offset, dst stride), in words
    blocks = [(0, 1, 5000, 5000, 0, 7, 5000), (100, 3, 64, 200, 1, 0, 64), (9000, 8, 4100, 4200, 1, 500, 9000),
              (300, 40, 33, 50, 2, 11, 40), (60000, 1, 1, 1, 2, 3, 1)]
    runs = np.zeros(len(blocks), dtype=RUN_DTYPE)
    for i, (so, rows, width, ss, d, do, ds) in enumerate(blocks):
        runs[i] = (0, so * 4, d, do * 4, width * 4, rows, ss * 4, ds * 4)
    sums = RunSums(runs, np.full(len(runs), 4), runs["dst"], 3, {0: src}, tile_elems=1024, kernels=kernels)
    want = np.zeros((3, 2), dtype=np.int64)
    for so, rows, width, ss, d, do, ds in blocks:
        want[d] += _by_position(torch.as_strided(words, (rows, width), (ss, 1), so), do, ds)
    np.testing.assert_array_equal(sums().cpu().numpy(), want)
    whole[skew + 2 * 9000 + 1] += 1  # one element inside a word that a block reads: the next call sees it
    assert not np.array_equal(sums().cpu().numpy(), want)


def test_word_checksums_of_a_block_equal_those_of_its_words():
    """checksum_block in 4-byte words (a [outer, n, inner] bf16 block at word positions) equals the
    element checksums of the same bytes viewed as int32, row by row at their landing positions."""
    x = torch.randn(3, 8, 6).to(torch.bfloat16)  # rows of 8 * 6 elements = 24 words
    base, dim, off = 40, 20, 4  # elements: base and off * inner even, dim * inner even
    got = checksum_block(x, base, dim, off, word=4)
    want = [0, 0]
    for o in range(3):
        words = x[o].reshape(1, -1).contiguous().view(torch.int32)
        first = (base + (o * dim + off) * 6) // 2
        a, b = _by_position(words, first, 0)
        want = [want[0] + a, want[1] + b]
    assert got == tuple(wrap_int64(v) for v in want)
    assert checksum_block(x, base, dim, off, max_elements=50, word=4) == got  # in pieces of whole words
    with pytest.raises(ValueError, match="whole 4-byte words"):
        checksum_block(x[:, :7, :5], base, dim, off, word=4)  # rows of 7 * 5 elements: not whole words


def test_expected_sums_started_during_the_transfer_are_those_of_the_sent_bytes():
    """start_expected's thread gives check() what expected() gives; sums begun on endpoints that were
    bound anew before the check are recomputed from the new ones; a failure in the thread is raised
    by check() on the caller's thread."""
    from sync.transport import SoloTransport
    from sync.verify.verifier import Verifier

    plan, executor, flats = _synced(seed=2)
    trainer = plan.num_trainer - 1
    mine = {lid: t for lid, t in flats.items() if plan.local_rank[lid] == trainer}
    verifier = Verifier(plan, trainer)
    want = verifier.expected(mine)
    verifier.start_expected(mine)
    assert verifier._early is not None
    assert torch.equal(verifier._take_expected(mine), want)
    verifier.start_expected(mine)
    moved = {lid: t.clone() for lid, t in mine.items()}  # new endpoint tensors, other bytes
    for t in moved.values():
        t.view(torch.uint8)[0] ^= 1
    got = verifier._take_expected(moved)
    assert not torch.equal(got, want) and torch.equal(got, Verifier(plan, trainer).expected(moved))
    broken = dict(mine)
    verifier.start_expected(broken)
    verifier._early[1].join()
    verifier._early[2].update(error=RuntimeError("checksum thread failed"), sums=None)
    with pytest.raises(RuntimeError, match="checksum thread failed"):
        verifier.check(broken, SoloTransport(), lambda work, label: None)


def test_checksums_read_element_by_element_verify_too_and_keep_their_programs():
    """read_words(False) (benchmarks' side-by-side) reads every tensor by its elements: a sync still
    verifies and a tampered word still fails; switching back reuses the programs built for 4-byte words."""
    plan, executor, flats = _synced(seed=3)
    verifier = executor.verifier
    assert _mismatches(executor, flats) == 0
    words = verifier._prepared
    verifier.read_words(False)
    assert (verifier.word[verifier.inf_first:] <= 2).all() and verifier._prepared is None
    assert _mismatches(executor, flats) == 0
    victim = max((lid for lid in flats if lid >= verifier.inf_first), key=lambda lid: flats[lid].numel())
    flats[victim].view(torch.uint8)[5] ^= 1
    assert _mismatches(executor, flats) == 1
    verifier.read_words(True)
    assert verifier._prepared is words and _mismatches(executor, flats) == 1
