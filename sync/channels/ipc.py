"""CUDA IPC between processes on one GPU (a trainer process and an engine process, colocated).

NCCL cannot put two processes of one GPU in a communicator, and a trip through host memory would
cost two PCIe crossings. Two channels, both over handles and signals passed through the sync
group's store (:class:`IpcSignals`):

- :class:`IpcArena`: each process shares its send arena (the two round halves of flat buckets) once;
  a receiver maps it and unpacks straight from the sender's memory. Per round the sender says
  *ready* once its packing kernels have finished, and the receiver says *done* once its unpacking
  kernels have finished, after which the sender may pack into that half again. Two copies.
- :class:`IpcDirect`: a sender shares the tensors that others read (torch shares their CUDA
  allocation blocks: a Megatron trainer's parameters sit in a few flat buffers), again after each
  rebinding; per stage it says *lent* (with its binding's generation), the reader copies straight
  from them into its own tensors and says *pulled*. One copy.
"""

from __future__ import annotations

import pickle
import sys
import time
import weakref
from datetime import timedelta
from multiprocessing import resource_tracker, shared_memory
from typing import Any

import numpy as np
import torch

from planners.errors import SyncTimeout
from sync.channels.base import Channel, Message

__all__ = ["IpcSignals", "IpcArena", "IpcDirect"]


# the signals a process writes, one kind per row of its mailbox (a column per peer process)
_KINDS = ("ready", "done", "lent", "pulled")
_VALUE_BITS = 24  # a mailbox word: the signal's sequence number above, its value (e.g. a generation) below
_YIELD_S = 0.02  # how long a wait yields the core before it sleeps between looks (see IpcSignals.wait)


class IpcSignals:
    """Handles and round signals between this process (``me``) and the others on its GPU.

    Handles pass once per binding through the sync group's store. Round signals, several per sync,
    go through shared host memory instead (a store round trip costs tens of microseconds, about what a
    small round's copies take): each process writes its signals into its own mailbox, one 64-bit word
    per (kind, peer) holding the latest signal's sequence number and value in one store, so a reader
    never sees half a signal. Sequence numbers grow within an executor (each has its own mailboxes);
    a wait returns once the word reaches its number, since a writer that moved on has passed it."""

    def __init__(self, store, prefix: str, me: int, timeout_s: float, processes: int) -> None:
        if store is None:
            raise ValueError("CUDA IPC needs the sync group's store to pass handles and signals")
        self.store, self.prefix, self.me, self.timeout_s, self.processes = store, prefix, me, timeout_s, processes
        self._outbox, memory = _mailbox(processes)
        self._memories = [memory]
        self._finalizer = weakref.finalize(self, _release, self._memories, memory.name)
        self.store.set(f"{self.prefix}/mailbox/{me}", memory.name.encode())
        self._inboxes: dict[int, np.ndarray] = {}

    @property
    def timeout(self) -> timedelta:
        """``timeout_s``, as the store's waits take it."""
        return timedelta(seconds=self.timeout_s)

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

    def signal(self, what: str, seq: int, src: int, dst: int, value: int = 1) -> None:
        """Signal number ``seq`` (positive, growing) of kind ``what`` between ``src`` and ``dst``, one of
        them this process, with a ``value`` below 2**24."""
        if not 0 <= value < 1 << _VALUE_BITS:
            raise ValueError(f"an IPC signal's value must lie in [0, {1 << _VALUE_BITS}), got {value}")
        self._outbox[_KINDS.index(what), self._peer(src, dst)] = (seq << _VALUE_BITS) | value

    def wait(self, what: str, seq: int, src: int, dst: int) -> int:
        """Wait for signal ``seq`` of kind ``what`` from the other process of ``src`` and ``dst``; returns its value."""
        peer = self._peer(src, dst)
        word = self._inbox(peer)[_KINDS.index(what)]
        started, spins = None, 0
        while True:
            got = int(word[self.me])
            if got >> _VALUE_BITS >= seq:
                return got & ((1 << _VALUE_BITS) - 1)
            spins += 1
            if spins < 2000:  # spin first: the signal is usually microseconds away
                continue
            now = time.monotonic()
            started = started or now
            if now > started + self.timeout_s:
                raise SyncTimeout(f"CUDA IPC: no '{what}' for round {seq:#x} from process {peer} to {self.me} "
                                  f"within {self.timeout_s:.0f} s")
            # yielding, not sleeping, for as long as a refresh's copy takes: a 50 us sleep let a lender
            # hear that its reader is done 40 us late (on a 2 ms CUDA IPC refresh of a 1.7B model)
            time.sleep(0 if now < started + _YIELD_S else 50e-6)

    def _peer(self, src: int, dst: int) -> int:
        if self.me not in (src, dst):
            raise ValueError(f"process {self.me} signals only its own pairs, not {src}->{dst}")
        return dst if src == self.me else src

    def _inbox(self, peer: int) -> np.ndarray:
        """Process ``peer``'s mailbox, mapped once (waits until it is published)."""
        if peer not in self._inboxes:
            key = f"{self.prefix}/mailbox/{peer}"
            try:
                self.store.wait([key], self.timeout)
            except RuntimeError as e:
                raise SyncTimeout(f"CUDA IPC: process {peer} published no mailbox: {e}") from e
            memory = _attach(self.store.get(key).decode())
            self._memories.append(memory)
            self._inboxes[peer] = np.ndarray((len(_KINDS), self.processes), dtype=np.int64, buffer=memory.buf)
        return self._inboxes[peer]


def _mailbox(processes: int) -> tuple[np.ndarray, shared_memory.SharedMemory]:
    memory = shared_memory.SharedMemory(create=True, size=8 * len(_KINDS) * processes)
    words = np.ndarray((len(_KINDS), processes), dtype=np.int64, buffer=memory.buf)
    words[:] = 0
    return words, memory


def _attach(name: str) -> shared_memory.SharedMemory:
    """Map another process's mailbox without adopting it: before Python 3.13 the resource tracker
    would unlink it when this process exits, under the process that still writes it."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    memory = shared_memory.SharedMemory(name=name)
    resource_tracker.unregister(memory._name, "shared_memory")  # noqa: SLF001 (what track=False does)
    return memory


def _release(memories: list, own: str) -> None:
    """Unmap every mailbox; unlink this process's own (the one named ``own``)."""
    for memory in memories:
        try:
            memory.close()
        except BufferError:  # a numpy view still maps it: the mapping goes with the process
            pass
        if memory.name == own:
            try:
                memory.unlink()
            except FileNotFoundError:
                pass


def _sequence(sync: int, stage: int, k: int = 0) -> int:
    """Round ``k`` of ``stage`` of the executor's sync number ``sync``, as one growing number."""
    if not 0 <= k < 1 << 14 or not 0 < sync < 1 << 24:
        raise ValueError(f"CUDA IPC signals number at most 2**14 rounds a stage and 2**24 syncs an executor "
                         f"(round {k} of sync {sync}): raise sync.bucket_mb, or build a new executor")
    return (sync << 16) | (stage << 14) | k


def _synchronize(device: torch.device) -> None:
    """The current stream's kernels on ``device`` have finished (what the peer reads or overwrites)."""
    torch.cuda.current_stream(device).synchronize()


class IpcArena(Channel):
    """Buckets between processes on one GPU, read by the receiver straight from the sender's arena.

    ``sends[(stage, k)]``: the processes this one packs IPC buckets for in that round; ``receives``
    likewise the processes it unpacks from. :meth:`open` shares this process's send arena (where each
    of its IPC buckets sits: ``offsets[q]``) and maps the senders'."""

    name = "cuda-ipc-arena"

    def __init__(self, signals: IpcSignals, sends: dict[tuple[int, int], set[int]],
                 receives: dict[tuple[int, int], set[int]]) -> None:
        self.signals, self.sends, self.receives = signals, sends, receives
        self.device: torch.device | None = None
        self.sync = 0
        self._pending_done: dict[int, set[tuple[int, int]]] = {0: set(), 1: set()}  # arena half -> (round, receiver)
        self.arenas: dict[int, tuple[torch.Tensor, dict]] = {}  # sending process -> (its arena, offsets)
        self.opened = False

    def open(self, arena: torch.Tensor, offsets: dict[int, dict]) -> dict[int, tuple[torch.Tensor, dict]]:
        """Share ``arena`` with the processes it packs for; map (once) the arenas of those sending here."""
        if not self.opened:  # the arena is kept for the executor's life: shared and mapped once
            self.opened, self.device = True, arena.device
            for q, where in offsets.items():
                self.signals.share(arena, q, where)
            senders = sorted({p for ps in self.receives.values() for p in ps})
            self.arenas = {p: self.signals.open(p) for p in senders}
        return self.arenas

    def begin(self, sync: int) -> None:
        self.sync = sync

    def _seq(self, stage: int, k: int) -> int:
        return _sequence(self.sync, stage, k)

    def before_pack(self, stage: int, k: int) -> None:
        if self.sends.get((stage, k)):
            self._await_done(k % 2)  # the receivers of two rounds ago have read this half

    def post(self, stage: int, k: int, messages: list[Message]) -> Any:
        to = self.sends.get((stage, k))
        if to:
            _synchronize(self.device)  # packed before the receivers read
            for q in sorted(to):
                self.signals.signal("ready", self._seq(stage, k), self.signals.me, q)
                self._pending_done[k % 2].add((self._seq(stage, k), q))
        return stage, k

    def wait(self, pending: Any, timeout_s: float) -> None:
        stage, k = pending
        for p in sorted(self.receives.get((stage, k), ())):
            self.signals.wait("ready", self._seq(stage, k), p, self.signals.me)

    def after_unpack(self, stage: int, k: int) -> None:
        frm = self.receives.get((stage, k))
        if frm:
            _synchronize(self.device)  # read before the sender packs again
            for p in sorted(frm):
                self.signals.signal("done", self._seq(stage, k), p, self.signals.me)

    def end(self, stage: int) -> None:
        for half in (0, 1):  # receivers are done with the arena before the next stage reuses it
            self._await_done(half)

    def _await_done(self, half: int) -> None:
        for seq, q in sorted(self._pending_done[half]):
            self.signals.wait("done", seq, self.signals.me, q)
        self._pending_done[half] = set()


class IpcDirect(Channel):
    """Chunks between processes on one GPU, copied by the receiver straight from the sender's tensors.

    ``lent_to[stage]``: the processes reading this one's tensors in that stage; ``lenders[stage]`` the
    processes this one reads from. The executor shares its tensors (:meth:`share`, after every binding),
    borrows the lenders' (:meth:`borrow`), copies, and says so (:meth:`pulled`)."""

    name = "cuda-ipc-direct"

    def __init__(self, signals: IpcSignals, lent_to: dict[int, list[int]], lenders: dict[int, list[int]]) -> None:
        self.signals, self.lent_to, self.lenders = signals, lent_to, lenders
        self.device: torch.device | None = None
        self.sync = 0
        self.generation = 0  # bumps whenever this process's lent tensors are bound anew
        self._borrowed: dict[int, tuple[int, dict[int, torch.Tensor]]] = {}  # lender -> (its generation, tensors)

    def share(self, tensors_for: dict[int, dict[int, torch.Tensor]], device: torch.device) -> None:
        """Publish, for each reading process, the tensors (by plan local id) it copies from."""
        self.device = device
        self.generation += 1
        for q, tensors in tensors_for.items():
            self.signals.share_tensors(tensors, q, self.generation)

    def begin(self, sync: int) -> None:
        self.sync = sync

    def start(self, stage: int) -> None:
        """Tell the processes that read this stage's chunks from our tensors that they are ready."""
        if self.lent_to.get(stage):
            _synchronize(self.device)  # whatever wrote them has finished
            for q in self.lent_to[stage]:
                self.signals.signal("lent", _sequence(self.sync, stage), self.signals.me, q, self.generation)

    def borrow(self, stage: int) -> tuple[dict[int, int], dict[int, torch.Tensor]]:
        """(each lender's generation, the lenders' tensors by plan local id) once they are ready."""
        generations = {p: self.signals.wait("lent", _sequence(self.sync, stage), p, self.signals.me)
                       for p in self.lenders.get(stage, [])}
        for p, gen in generations.items():
            if self._borrowed.get(p, (None,))[0] != gen:  # the lender bound anew: map its tensors again
                self._borrowed[p] = (gen, self.signals.open_tensors(p, gen))
        tensors: dict[int, torch.Tensor] = {}
        for _, lent in self._borrowed.values():
            tensors.update(lent)
        return generations, tensors

    def pulled(self, stage: int, device: torch.device) -> None:
        _synchronize(device)  # read before the lenders move on
        for p in self.lenders.get(stage, []):
            self.signals.signal("pulled", _sequence(self.sync, stage), self.signals.me, p)

    def post(self, stage: int, k: int, messages: list[Message]) -> Any:
        return None  # chunks, not rounds: see start / borrow / pulled / end

    def wait(self, pending: Any, timeout_s: float) -> None:
        pass

    def end(self, stage: int) -> None:
        """Our lent tensors may change again once every reader of this stage is done."""
        for q in self.lent_to.get(stage, []):
            self.signals.wait("pulled", _sequence(self.sync, stage), q, self.signals.me)
