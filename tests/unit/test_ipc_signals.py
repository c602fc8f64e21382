"""The CUDA IPC channels' round signals: shared-memory mailboxes between two real processes (no GPU needed)."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest
import torch.distributed as dist

from planners.errors import SyncTimeout
from sync.channels.ipc import IpcSignals, _sequence


def _writer(path: str, prefix: str) -> None:
    store = dist.FileStore(path, 2)
    signals = IpcSignals(store, prefix, 0, 30, 2)
    signals.signal("lent", _sequence(1, 1), 0, 1, value=7)  # its value, read by the other
    signals.wait("pulled", _sequence(1, 1), 1, 0)  # the other's answer
    signals.signal("ready", _sequence(1, 1, 3), 0, 1)
    signals.signal("ready", _sequence(1, 1, 4), 0, 1)  # a later round before the reader looked
    signals.wait("done", _sequence(1, 1, 4), 0, 1)  # written by the reader, for the pair 0 -> 1
    store.set(f"{prefix}/finished", b"1")


def test_signals_pass_values_and_order_between_processes(tmp_path):
    path, prefix = str(tmp_path / "store"), "ipc-test"
    writer = mp.get_context("spawn").Process(target=_writer, args=(path, prefix))
    writer.start()
    try:
        store = dist.FileStore(path, 2)
        signals = IpcSignals(store, prefix, 1, 30, 2)
        assert signals.wait("lent", _sequence(1, 1), 0, 1) == 7
        signals.signal("pulled", _sequence(1, 1), 1, 0)
        assert signals.wait("ready", _sequence(1, 1, 4), 0, 1) == 1
        assert signals.wait("ready", _sequence(1, 1, 3), 0, 1) == 1  # passed already: returns at once
        signals.signal("done", _sequence(1, 1, 4), 0, 1)
        store.wait([f"{prefix}/finished"])
        signals.timeout_s = 0.2
        t0 = time.monotonic()
        with pytest.raises(SyncTimeout, match="no 'ready' .* from process 0 to 1"):
            signals.wait("ready", _sequence(2, 1, 0), 0, 1)  # the next sync's: never sent
        assert time.monotonic() - t0 < 5
    finally:
        writer.join(30)
    assert writer.exitcode == 0


def test_a_signal_names_its_own_pair_and_a_small_value():
    store = dist.HashStore()
    signals = IpcSignals(store, "ipc-test", 0, 1, 3)
    with pytest.raises(ValueError, match="signals only its own pairs"):
        signals.signal("ready", 1, 1, 2)
    with pytest.raises(ValueError, match=r"value must lie in \[0, 16777216\)"):
        signals.signal("lent", 1, 0, 1, value=1 << 24)
    with pytest.raises(ValueError, match="at most 2\\*\\*14 rounds"):
        _sequence(1, 1, 1 << 14)
