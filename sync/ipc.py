"""CUDA IPC between processes on one GPU (a trainer process and an engine process, colocated).

NCCL cannot put two processes of one GPU in a communicator, and a trip through host memory would
cost two PCIe crossings. Two ways, both over handles passed through the rendezvous store:

- *arena*: each process shares its send arena (the two round halves of flat buckets) once; a
  receiver maps it and unpacks straight from the sender's memory. Per round the sender says
  *ready* once its packing kernels have finished, and the receiver says *done* once its unpacking
  kernels have finished, after which the sender may pack into that half again. Two copies.
- *direct*: a sender shares the tensors that others read (torch shares their CUDA allocation
  blocks: a Megatron trainer's parameters sit in a few flat buffers), again after each rebinding;
  per stage it says *lent* (with its binding's generation), the reader copies straight from them
  into its own tensors and says *pulled*. One copy.
"""

from __future__ import annotations

import pickle
from datetime import timedelta

import torch

__all__ = ["IpcChannels"]


class IpcChannels:
    """Handles and round signals between this process (``me``) and the others on its GPU."""

    def __init__(self, store, prefix: str, me: int, timeout_s: float) -> None:
        if store is None:
            raise ValueError("CUDA IPC needs the sync group's store to pass handles and signals")
        self.store, self.prefix, self.me, self.timeout = store, prefix, me, timedelta(seconds=timeout_s)

    def share(self, arena: torch.Tensor, to: int, offsets: dict) -> None:
        """Publish ``arena`` (a CUDA tensor this process keeps alive) and where each bucket sits in it."""
        from torch.multiprocessing.reductions import reduce_tensor

        if arena.device.type != "cuda":
            raise ValueError("CUDA IPC shares CUDA tensors only; run colocated CPU ranks in one process instead")
        self.store.set(f"{self.prefix}/arena/{self.me}->{to}", pickle.dumps((reduce_tensor(arena), offsets)))

    def open(self, frm: int) -> tuple[torch.Tensor, dict]:
        """Map the arena process ``frm`` shares with this one (waits until it is published)."""
        key = f"{self.prefix}/arena/{frm}->{self.me}"
        self.store.wait([key], self.timeout)
        (rebuild, args), offsets = pickle.loads(self.store.get(key))
        return rebuild(*args), offsets

    def share_tensors(self, tensors: dict[int, torch.Tensor], to: int, generation: int) -> None:
        """Publish tensors for process ``to`` to read in place. Torch shares each tensor's CUDA
        allocation block (a reader opens each block once, however many tensors it holds)."""
        from torch.multiprocessing.reductions import reduce_tensor

        shared = {lid: reduce_tensor(t) for lid, t in tensors.items()}
        self.store.set(f"{self.prefix}/tensors/{generation}/{self.me}->{to}", pickle.dumps(shared))

    def open_tensors(self, frm: int, generation: int) -> dict[int, torch.Tensor]:
        key = f"{self.prefix}/tensors/{generation}/{frm}->{self.me}"
        self.store.wait([key], self.timeout)
        return {lid: rebuild(*args) for lid, (rebuild, args) in pickle.loads(self.store.get(key)).items()}

    def signal(self, what: str, seq: str, src: int, dst: int, value: bytes = b"1") -> None:
        self.store.set(f"{self.prefix}/{what}/{seq}/{src}->{dst}", value)

    def wait(self, what: str, seq: str, src: int, dst: int) -> bytes:
        """Wait for a signal; returns its value."""
        key = f"{self.prefix}/{what}/{seq}/{src}->{dst}"
        try:
            self.store.wait([key], self.timeout)
        except RuntimeError as e:
            from sync.executor import SyncTimeout

            raise SyncTimeout(f"CUDA IPC: no '{what}' for round {seq} from process {src} to {dst}: {e}") from e
        value = self.store.get(key)
        self.store.delete_key(key)
        return value
