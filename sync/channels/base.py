"""The channel interface: how one round's bytes travel between this process and others.

The executor schedules a sync as stages of rounds and runs every copy; channels only move bytes and
say when they have. ``begin(sync)`` starts a sync; per stage it calls ``start(stage)``; per round
``k``: ``before_pack(stage, k)`` (the channel's buffers may be reused), packs, ``post(stage, k,
messages)``, then -- while round k+1 is packed and posted -- ``wait(pending)`` with the sync's
deadline, unpacks, ``after_unpack(stage, k)``; ``posted(stage)`` once the last round is posted;
``end(stage)``; ``close()`` when the executor is done. A channel that reads its peer's memory in place (CUDA IPC) also gives the
executor the buffers it unpacks from (``recv_buffer``) and the tensors it copies from (``borrowed``).
Every hook but ``post``/``wait`` is a no-op by default.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from planners.errors import SyncError, SyncTimeout

__all__ = ["Message", "Channel", "wait_all"]


@dataclass
class Message:
    """Bytes to send to (or receive from) process ``peer`` in one round."""

    send: bool
    buffer: torch.Tensor  # uint8: a bucket's packed bytes, or a contiguous chunk straight from / into a tensor
    peer: int  # the peer's process (transport rank)
    label: str  # what a failure names: stage, direction, bucket, rank


class Channel:
    """One way bytes travel (see the module docstring)."""

    name = "channel"

    def begin(self, sync: int) -> None:
        pass

    def start(self, stage: int) -> None:
        pass

    def before_pack(self, stage: int, k: int) -> None:
        pass

    def post(self, stage: int, k: int, messages: list[Message]) -> Any:
        """Start moving one round's messages; returns what :meth:`wait` waits for."""
        raise NotImplementedError

    def wait(self, pending: Any, timeout_s: float) -> None:
        raise NotImplementedError

    def after_unpack(self, stage: int, k: int) -> None:
        pass

    def posted(self, stage: int) -> None:
        """Every round of the stage has been posted (the last may still be in flight)."""

    def end(self, stage: int) -> None:
        pass

    def close(self) -> None:
        pass


def wait_all(works: list, what: list[str], timeout_s: float) -> None:
    """Wait for every work item; a timeout or peer failure becomes a SyncError naming ``what[i]``."""
    deadline = time.monotonic() + timeout_s
    for work, label in zip(works, what):
        remaining = max(deadline - time.monotonic(), 0.001)
        try:
            ok = work.wait(timeout=timedelta(seconds=remaining))
        except RuntimeError as e:
            kind = SyncTimeout if "imeout" in str(e) or "imed out" in str(e) else SyncError
            said = re.sub(r"\[/\S+\] ", "", str(e))  # gloo prefixes its source path
            raise kind(f"{label}: {'no answer within ' + f'{timeout_s:g} s' if kind is SyncTimeout else said}") from e
        if ok is False:
            raise SyncTimeout(f"{label}: no answer within {timeout_s:g} s")
