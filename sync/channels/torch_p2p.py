"""The wire: a round's sends and receives posted as one batch of torch.distributed point-to-point
operations over the sync group (gloo between CPU tensors, NCCL between GPUs), waited with a deadline."""

from __future__ import annotations

from typing import Any

from planners.errors import SyncError
from sync.channels.base import Channel, Message, wait_all
from sync.transport import Transport

__all__ = ["TorchP2P"]


class TorchP2P(Channel):
    name = "torch-p2p"

    def __init__(self, transport: Transport) -> None:
        self.transport = transport

    def post(self, stage: int, k: int, messages: list[Message]) -> Any:
        if not messages:
            return [], []
        try:
            works = self.transport.batch([(m.send, m.buffer, m.peer) for m in messages])
        except RuntimeError as e:
            raise SyncError(f"{messages[0].label}: {e}") from e
        return works, [m.label for m in messages]

    def wait(self, pending: Any, timeout_s: float) -> None:
        works, labels = pending
        wait_all(works, labels, timeout_s)
