"""Fault injection for tests and chaos runs: kill, stall or corrupt one rank at a chosen point of a sync,
as a channel that wraps the wire (:class:`Faulty`).

A fault is written ``KIND:RANK:STAGE:SYNC[:BUCKET]`` (``rlsync run --fault``, ``run_local_sync.py
--fault``): in sync number SYNC (the version, or the iteration of ``rlsync run``), plan rank RANK

- ``kill``: exits (code 17) when stage STAGE starts, or as it posts bucket round BUCKET of the stage;
- ``stall``: stops answering at that point (sleeps far past the sync timeout);
- ``corrupt``: flips a byte of the first bucket it sends in the stage (or in round BUCKET); the
  checksums catch it.

A rank with fewer rounds than BUCKET in that stage fires when the stage's rounds end.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from typing import Any

from planners.errors import RLSyncError
from sync.channels.base import Channel, Message

__all__ = ["Fault", "FaultError", "Faulty", "KILL_EXIT_CODE"]

KINDS = ("kill", "stall", "corrupt")
KILL_EXIT_CODE = 17


class FaultError(RLSyncError, ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    rank: int
    stage: int
    sync: int
    bucket: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise FaultError(f"fault kind must be one of {KINDS}, got {self.kind!r}")
        if self.stage not in (1, 2):
            raise FaultError(f"fault stage must be 1 or 2, got {self.stage}")
        if self.rank < 0 or self.sync < 0 or (self.bucket is not None and self.bucket < 0):
            raise FaultError("fault rank, sync and bucket must not be negative")

    @classmethod
    def parse(cls, text: str) -> "Fault":
        parts = text.split(":")
        try:
            if len(parts) not in (4, 5):
                raise ValueError
            kind, nums = parts[0], [int(p) for p in parts[1:]]
        except ValueError:
            raise FaultError(f"fault {text!r}: write KIND:RANK:STAGE:SYNC[:BUCKET], e.g. kill:1:2:3 "
                             f"(kind one of {', '.join(KINDS)})") from None
        return cls(kind, nums[0], nums[1], nums[2], nums[3] if len(nums) == 5 else None)

    def at(self, stage: int, bucket: int | None) -> bool:
        """Does a kill or stall fire here (``bucket`` None: the stage's start)?"""
        return self.kind != "corrupt" and self.stage == stage and self.bucket == bucket

    def fire(self, timeout_s: float) -> None:
        if self.kind == "kill":
            os._exit(KILL_EXIT_CODE)
        time.sleep(max(timeout_s, 1.0) * 20)  # a hung peer: the others give up long before this


class Faulty(Channel):
    """The wire with one fault armed: it fires once, in the next sync, where the fault says."""

    name = "faulty"

    def __init__(self, inner: Channel, fault: Fault, timeout_s: float) -> None:
        self.inner, self.fault, self.timeout_s = inner, fault, timeout_s

    def _fire(self, stage: int, bucket: int | None) -> None:
        if self.fault is not None and self.fault.at(stage, bucket):
            fault, self.fault = self.fault, None
            fault.fire(self.timeout_s)

    def start(self, stage: int) -> None:
        self._fire(stage, None)
        self.inner.start(stage)

    def before_pack(self, stage: int, k: int) -> None:
        self.inner.before_pack(stage, k)

    def post(self, stage: int, k: int, messages: list[Message]) -> Any:
        self._fire(stage, k)
        f = self.fault
        if f is not None and f.kind == "corrupt" and f.stage == stage and f.bucket in (None, k):
            for i, m in enumerate(messages):
                if m.send:  # a copy: the fault corrupts the message, never the trainer's weights
                    wrong = m.buffer.clone()
                    wrong[0] ^= 0xFF
                    messages = messages[:i] + [Message(True, wrong, m.peer, m.label)] + messages[i + 1:]
                    self.fault = None
                    break
        return self.inner.post(stage, k, messages)

    def wait(self, pending: Any, timeout_s: float) -> None:
        self.inner.wait(pending, timeout_s)

    def after_unpack(self, stage: int, k: int) -> None:
        self.inner.after_unpack(stage, k)

    def posted(self, stage: int) -> None:
        """Every round of the stage is posted: a fault at a round this rank does not have fires now."""
        if self.fault is not None:
            self._fire(stage, self.fault.bucket)
        self.inner.posted(stage)

    def end(self, stage: int) -> None:
        self.inner.end(stage)

    def close(self) -> None:
        self.inner.close()
