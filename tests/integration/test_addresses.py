"""The per-sync check that no endpoint tensor moved: from Python, and in C++ (built here with torch's
extension builder: tens of seconds the first time, so an integration test)."""

from __future__ import annotations

import pytest
import torch

from expected import endpoints, source_shards
from planners import JobSpec, build_plan
from sync.addresses import Addresses, native_check
from sync.executor import PlanExecutor
from sync.tensors import as_bits
from sync.transport import SoloTransport


@pytest.fixture(scope="module")
def native(request):
    mp = pytest.MonkeyPatch()
    mp.setenv("RLSYNC_NATIVE_CHECK", "1")  # CPU builds too: the check is the same code
    module = native_check.wait(900)
    mp.undo()
    if module is None:
        pytest.skip(f"the C++ address check could not be built here: {native_check.error}")
    return module


def _tensors() -> list[torch.Tensor]:
    base = torch.arange(64, dtype=torch.float32)
    # a view at an offset and an empty tensor: their addresses as data_ptr() gives them
    return [torch.randn(8), base[16:24], torch.empty(0), torch.zeros(3, 4, dtype=torch.bfloat16), base]


def _watch(tensors, native: bool) -> Addresses:
    watch = Addresses(list(tensors), list(map(torch.Tensor.data_ptr, tensors)), native=native)
    assert not watch.moved(list(tensors))
    assert (watch._native is not None) == native  # the path under test is the one taken
    return watch


@pytest.mark.parametrize("in_cpp", [True, False])
def test_every_way_a_tensor_moves_is_seen(in_cpp, native):
    tensors = _tensors()
    watch = _watch(tensors, in_cpp)
    tensors[0].data = torch.randn(8)  # new storage under the same object
    assert watch.moved(tensors)

    tensors = _tensors()
    watch = _watch(tensors, in_cpp)
    replaced = list(tensors)
    replaced[3] = tensors[3].clone()  # a new tensor under an old name
    assert watch.moved(replaced)
    assert watch.moved(tensors[:-1])  # one fewer

    tensors = _tensors()
    watch = _watch(tensors, in_cpp)
    before = tensors[3].data_ptr()
    storage = tensors[3].untyped_storage()
    size = storage.nbytes()
    storage.resize_(0)  # freed and allocated again, as offloading does
    storage.resize_(size)
    assert watch.moved(tensors) == (tensors[3].data_ptr() != before)


def test_a_sync_rebinds_when_a_tensor_moved_under_the_same_object(native):
    job = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2), inference=dict(tp=1),
               deployment=dict(mode="colocated"))
    plan = build_plan(JobSpec.from_dict(job)).validate()
    ex = PlanExecutor(plan, range(plan.num_ranks), SoloTransport())
    sources, targets = endpoints(plan, range(plan.num_ranks), 1)
    ex.sync(sources, targets)
    binding = ex._binding
    ex.sync(sources, targets)  # the check now runs in C++ (the references are taken at the first check)
    assert ex._binding is binding and binding.key[2]._native is not None
    target = next(iter(targets.values()))
    name = max(target.tensors, key=lambda n: target.tensors[n].numel())
    old = target.tensors[name].data
    target.tensors[name].data = torch.zeros_like(old)  # the engine reallocated a weight in place
    for s in sources.values():
        s.set_version(2)
    stats = ex.sync(sources, targets)
    assert ex._binding is not binding and stats.verified
    rank = next(r for r, t in targets.items() if t is target)
    assert torch.equal(as_bits(target.tensors[name]), as_bits(source_shards(plan, rank, 2)[name]))
