"""The per-sync check that no endpoint tensor moved: from Python, and in C++ (built here with torch's
extension builder: tens of seconds the first time, so an integration test)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import OrderedDict

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


def test_a_later_process_imports_the_build_at_its_first_check(native):
    # what spawned workers do: the module at once, without torch's builder (seconds of imports,
    # hashing and ninja, which slowed the syncs running beside it)
    probe = """
import time, torch.utils.cpp_extension as builder
def refuse(*args, **kwargs):
    raise AssertionError("built again")
builder.load_inline = refuse
from sync.addresses import native_check
t0 = time.perf_counter()
module = native_check.get()
assert module is not None and native_check._thread is None, native_check.error
print(time.perf_counter() - t0)
"""
    env = dict(os.environ, RLSYNC_NATIVE_CHECK="1")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert float(done.stdout) < 1.0


def test_a_build_killed_midway_leaves_nothing_that_stops_the_next(tmp_path):
    # torch's builder leaves its lock file behind when killed, and its next build waits on it forever
    env = dict(os.environ, RLSYNC_NATIVE_CHECK="1", RLSYNC_CACHE_DIR=str(tmp_path))
    build = "from sync.addresses import native_check; print(native_check.wait(600) is not None, native_check.error)"
    killed = subprocess.Popen([sys.executable, "-c", build], env=env)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob("*/build/lock")) and time.monotonic() < deadline:  # compiling now
        time.sleep(0.05)
    killed.kill()
    killed.wait()
    assert list(tmp_path.glob("*/build/lock")), "the first build never started"
    done = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=600)
    assert done.stdout.split()[0] == "True", done.stdout + done.stderr


def _dicts() -> list[dict]:
    base = torch.arange(64, dtype=torch.float32)
    # a view at an offset and an empty tensor: their addresses as data_ptr() gives them; a dict
    # subclass, whose values are read through values()
    return [{"w": torch.randn(8), "view": base[16:24], "empty": torch.empty(0)},
            OrderedDict(norm=torch.zeros(3, 4, dtype=torch.bfloat16), base=base)]


def _watch(dicts, native: bool) -> Addresses:
    tensors = [t for d in dicts for t in d.values()]
    watch = Addresses(tensors, list(map(torch.Tensor.data_ptr, tensors)), native=native)
    assert not watch.moved(dicts)
    assert (watch._native is not None) == native  # the path under test is the one taken
    return watch


@pytest.mark.parametrize("in_cpp", [True, False])
def test_every_way_a_tensor_moves_is_seen(in_cpp, native):
    dicts = _dicts()
    watch = _watch(dicts, in_cpp)
    dicts[0]["w"].data = torch.randn(8)  # new storage under the same object
    assert watch.moved(dicts)

    dicts = _dicts()
    watch = _watch(dicts, in_cpp)
    dicts[1]["norm"] = dicts[1]["norm"].clone()  # a new tensor under an old name
    assert watch.moved(dicts)

    dicts = _dicts()
    watch = _watch(dicts, in_cpp)
    assert watch.moved(dicts[:1])  # fewer tensors
    assert watch.moved([dicts[0], dict(dicts[1], extra=torch.zeros(1))])  # more

    dicts = _dicts()
    watch = _watch(dicts, in_cpp)
    norm = dicts[1]["norm"]
    before, storage = norm.data_ptr(), norm.untyped_storage()
    size = storage.nbytes()
    storage.resize_(0)  # freed and allocated again, as offloading does
    storage.resize_(size)
    assert watch.moved(dicts) == (norm.data_ptr() != before)


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
