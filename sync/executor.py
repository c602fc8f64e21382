"""Run a sync plan over torch.distributed: bounded buckets, batched async send/recv, verification.

Every process builds a :class:`PlanExecutor` from the same plan for the plan ranks it hosts (one
trainer or inference rank; or, colocated in one process, a trainer rank and the engine rank on its
GPU; or every rank, on one device) and calls :meth:`PlanExecutor.sync`. Stage 1 then stage 2.
Chunks between two hosted ranks are device-local copies: no transport, no host round trip. The rest
travels in rounds: bucket ``k`` of every pair in round ``k``, all sends and receives of a round
posted together and waited with a deadline; round k+1 is packed while round k is on the wire, into
the other half of a persistent two-round arena. Large contiguous chunks go straight from and into
the tensors. Copies (local, pack, unpack) are run tables (``planners.schedule.runs``) bound once to
the tensors: one Triton launch per alignment class on CUDA, one ``_foreach_copy_`` elsewhere
(``sync.copier``); ``copies="slices"`` keeps one ``copy_`` per slice, the unbatched baseline.

The executor schedules rounds and runs copies; the bytes between processes move on channels
(``sync.channels``): the wire (torch point-to-point over the sync group: gloo on CPU tensors, NCCL on
GPUs), and between processes on one GPU the CUDA-IPC arena or direct channel. A fault armed on the
executor (``fault``) wraps the wire.
"""

from __future__ import annotations

import gc
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import torch
import torch.distributed as dist

from planners.errors import VerificationError
from planners.plan import SyncPlan
from planners.quant import FP8, is_internal
from planners.schedule.buckets import ALIGN, Bucket, bucketize
from planners.schedule.runs import BUFFER, chunk_runs
from sync.addresses import Addresses
from sync.channels import Channel, IpcArena, IpcDirect, IpcSignals, Message, TorchP2P, wait_all
from sync.channels.faulty import Fault, Faulty
from sync.copier import CopyProgram, PinnedTables, triton_available
from sync.fp8 import QuantizeProgram
from sync.ends.base import check_locals, end_locals
from sync.tensors import TORCH_DTYPES, block
from sync.transport import Transport
from sync.verify.verifier import Verifier

# Below these sizes a contiguous chunk is packed into a bucket rather than sent as a message of its
# own. Gloo copies on the CPU, so it skips the copy early. On GPUs packing and unpacking run at
# device-copy speed (~1.4 TB/s on an H100) while each NCCL message in a group call costs tens of
# microseconds: on 2 H100s, 794 messages (1 MB expert chunks sent one by one) took 6x the raw NCCL
# time for 1.5 GB, six messages (chunks of 4 MB or more direct) 1.15-1.4x (results/multi_gpu_*).
DIRECT_BYTES = {"gloo": 1 << 18, "nccl": 32 << 20, "solo": 1 << 18}

__all__ = ["PlanExecutor", "SyncStats", "finish_sync", "versioned_sync", "DIRECT_BYTES"]


@dataclass
class SyncStats:
    rank: int
    seconds: float = 0.0  # this rank, both stages
    stage_seconds: dict[int, float] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_copied: int = 0  # between hosted ranks (device-local)
    sent_to: dict[int, int] = field(default_factory=dict)  # tensor bytes this rank sent to each peer
    peak_buffer_bytes: int = 0  # the bucket arena: two rounds in flight, each at most bucket_bytes
    peak_extra_bytes: int | None = None  # measured, where a launcher asks (sync.memory.PeakMemory)
    pack_seconds: float = 0.0  # copying into send buckets and local copies (launch time on CUDA)
    bind_seconds: float = 0.0  # validating the endpoints' tensors and building copy programs (first sync)
    check_seconds: float = 0.0  # checking that the endpoints' tensors are still where the programs were bound
    wait_seconds: float = 0.0  # waiting for the network (or, over CUDA IPC, for the peers on this GPU)
    unpack_seconds: float = 0.0  # copying out of receive buckets (or, over CUDA IPC direct, the peers' tensors)
    verified: bool | None = None
    verify_seconds: float = 0.0  # this rank's checksums and their exchange, after the bytes moved (not in seconds)
    mismatched: list[str] = field(default_factory=list)
    global_seconds: float = 0.0  # slowest rank


def finish_sync(stats: SyncStats, flats, verifier: Verifier | None, transport: Transport, wait, device,
                targets: dict | None = None, plan: SyncPlan | None = None) -> None:
    """After the bytes moved: verify (when asked) and learn the slowest rank's time, on every rank.
    Engine ``targets`` ({plan rank: target}) then get their engine's expert placement in ``plan`` -- unless verification failed: an
    engine whose weights did not all arrive must not route tokens by the new slots (a staged engine
    keeps serving its old weights, and they belong to the old placement)."""
    if verifier is not None:
        t0 = time.perf_counter()
        stats.mismatched, _ = verifier.check(flats, transport, wait, agree=False)
        stats.verify_seconds = time.perf_counter() - t0
    # the slowest rank's time and the most mismatches any process found, in one exchange (any -> all fail)
    # on the group's own device: gloo reduces host memory, so a CUDA tensor here would cost two copies
    # and two waits for the GPU (about half a millisecond of a 2 ms CUDA IPC refresh on the H200)
    gathered = torch.tensor([stats.seconds, float(len(stats.mismatched))], dtype=torch.float64,
                            device=getattr(transport, "collective_device", device))
    wait(transport.all_reduce(gathered, dist.ReduceOp.MAX), "gathering sync times and verdicts")
    stats.global_seconds = float(gathered[0].item())
    if verifier is not None:
        stats.verified = bool(gathered[1].item() == 0)
    if plan is not None and plan.placement is not None and stats.verified is not False:
        for rank, t in (targets or {}).items():
            if t is not None and hasattr(t, "set_placement"):
                t.set_placement(plan.placement_of(rank))


def versioned_sync(target, version: int, body, written, strict: bool = False) -> SyncStats:
    """Run ``body()`` (a sync); a versioned target (``begin``/``commit``/``abort``) learns how it ended:
    committed when verified (or unverified by choice), aborted -- naming ``written()`` -- otherwise.
    ``strict``: a failed verification raises :class:`VerificationError` (on every rank: the count of
    mismatches is global) instead of only being reported in the stats."""
    versioned = target is not None and hasattr(target, "begin")
    if versioned:
        target.begin(version)
    try:
        stats = body()
    except BaseException as e:
        if versioned:
            target.abort(str(e), written())
        raise
    if versioned:
        if stats.verified is False:
            target.abort(f"verification failed: {stats.mismatched[:5]}", stats.mismatched)
        else:
            target.commit(version)
    if strict and stats.verified is False:
        mine = f"; here (rank {stats.rank}): {', '.join(stats.mismatched[:5])}" if stats.mismatched else ""
        more = f" and {len(stats.mismatched) - 5} more" if len(stats.mismatched) > 5 else ""
        raise VerificationError(f"version {version}: engine tensors differ from what the trainer sent{mine}{more}")
    return stats


class _EveryTarget:
    """The versioned targets of several hosted engine ranks, told together."""

    def __init__(self, targets) -> None:
        self.targets = targets

    def begin(self, version: int) -> None:
        for t in self.targets:
            t.begin(version)

    def commit(self, version: int) -> None:
        for t in self.targets:
            t.commit(version)

    def abort(self, reason: str, written) -> None:
        for t in self.targets:
            t.abort(reason, written)


class SliceCopies:
    """One ``copy_`` per slice through strided views: casts a wider source; the unbatched baseline."""

    def __init__(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.pairs = pairs
        self.nbytes = sum(d.numel() * d.element_size() for d, _ in pairs)

    def __call__(self) -> None:
        for dst, src in self.pairs:
            dst.copy_(src)


@dataclass
class _Round:
    """One round of a stage: the hosted ranks' buckets and where each packed one sits in the arena."""

    buckets: list[Bucket]
    route: list[str]  # "direct" (from/into the tensors), "packed" (through the arena) or "ipc" (same GPU)
    arena_off: list[int]  # byte offset of each packed bucket in its arena half (sends first, then receives); -1 if none
    send_bytes: int = 0
    recv_bytes: int = 0

    def ipc_key(self, i: int) -> tuple:
        """Names bucket ``i`` the same way in the sending and the receiving process."""
        b = self.buckets[i]
        same = [j for j, o in enumerate(self.buckets) if (o.src, o.dst) == (b.src, b.dst)]
        return (b.stage, b.index, b.src, b.dst, same.index(i))


def _derivations(plan: SyncPlan, hosted: np.ndarray) -> dict[str, list[tuple[int, int, int]]]:
    """The hosted ranks' derived locals as (source, FP8 value, scale) local ids, trainer and engine side:
    on the trainer side only those some chunk sends (a data-parallel replica that sends nothing of a
    weight need not quantize it). The value and the scale are separate logical tensors, so the planner may
    take one from this replica and the other from another: one sent is reason enough, and the kernel
    writes both."""
    out: dict[str, list[tuple[int, int, int]]] = {"trainer": [], "engine": []}
    if not len(plan.derived):
        return out
    by_source: dict[int, dict[str, int]] = {}
    sent = np.zeros(len(plan.local_name), dtype=bool)
    sent[plan.chunks["src_local"]] = True
    for local, source in plan.derived.tolist():
        if hosted[plan.local_rank[source]]:
            by_source.setdefault(source, {})["value" if plan.local_dtype[local] == FP8 else "scale"] = local
    for source, made in sorted(by_source.items()):
        side = "trainer" if plan.local_rank[source] < plan.num_trainer else "engine"
        if side == "engine" or sent[made["value"]] or sent[made["scale"]]:
            out[side].append((source, made["value"], made["scale"]))
    return out


_FIRST_PENDING = 4096  # moving chunks programmed before the first of their copies is launched (then 2x, 4x, ...)
# the parts grow by this: each part's tiles must be cut before the GPU has copied the part before. Cutting
# a chunk took 2.5x less time than copying its bytes on the H200 (DeepSeek-V3-like experts: 54 ns against
# 134 ns), and two workers cut two parts at once
_PART_GROWTH = 2
_TILE_WORKERS = 2
_COMPILED_FROM = 8192  # chunks: smaller tables are read field by field (no numba import or compile for them)


def _chunk_columns(chunks: np.ndarray, expert: np.ndarray) -> dict[str, np.ndarray]:
    """The chunk fields the executor reads chunk by chunk, as contiguous arrays, and ``moving`` (the chunk
    is a routed expert's: a new placement changes it): of a large table all in one compiled pass
    (``sync.copy_tables.chunk_columns``), of a small one each when first read."""
    if len(chunks) >= _COMPILED_FROM:
        from sync.copy_tables import chunk_columns

        return chunk_columns(chunks, expert)
    return _Columns(chunks, expert)


class _Columns(dict):
    def __init__(self, chunks: np.ndarray, expert: np.ndarray) -> None:
        super().__init__()
        self.chunks, self.expert = chunks, expert

    def __missing__(self, name: str) -> np.ndarray:
        if name == "moving":
            column = self.expert[self["tensor"]] >= 0
        else:
            column = np.ascontiguousarray(self.chunks[name])
        self[name] = column
        return column


def _graph_of(programs: list) -> "torch.cuda.CUDAGraph | None":
    """``programs``' launches captured as one CUDA graph (they are compiled already), or None where they
    cannot be captured: they launch as they are then."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            for program in programs:
                program()
    except RuntimeError:
        return None
    return graph


def _bytes_by_peer(peers: np.ndarray, nbytes: np.ndarray) -> dict[int, int]:
    """{peer rank: bytes}, of chunks going to ``peers`` with ``nbytes`` each."""
    out: dict[int, int] = {}
    for peer, n in zip(peers.tolist(), nbytes.tolist()):
        out[peer] = out.get(peer, 0) + int(n)
    return out


def _record_bytes(records: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Records ``records[rows]`` as raw bytes, one row each: a record array's own row gather and comparison
    walk it field by field (~10 ms for the placement-free chunks of a large MoE plan)."""
    return np.take(np.ascontiguousarray(records).view(np.uint8).reshape(len(records), -1), rows, axis=0)


class _Written:
    """The local ids a sync has written so far, named only if it fails: the local copies' tens of thousands
    are kept as the arrays they come in (``ids[rows]``), not turned into Python ints every sync."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.arrays: list[tuple[np.ndarray, np.ndarray | None]] = []

    def update(self, ids) -> None:
        self.ids.update(ids)

    def add_array(self, ids: np.ndarray, rows: np.ndarray | None = None) -> None:
        """``ids``, or ``ids[rows]`` when ``rows`` is given (gathered only if named)."""
        self.arrays.append((ids, rows))

    def __iter__(self):
        arrays = (np.unique(ids if rows is None else ids[rows]).tolist() for ids, rows in self.arrays)
        return iter(self.ids.union(*arrays))


@dataclass
class EndTable:
    """Every bound tensor's device address and size in bytes, by plan local id (-1: not bound here):
    copy programs over many tensors look them up in two arrays, not tens of thousands of tensors."""

    packed: np.ndarray  # [locals, 2]: (address, bytes) side by side, for lookups that read both
    device: torch.device

    @property
    def ptr(self) -> np.ndarray:
        return self.packed[:, 0]

    @property
    def nbytes(self) -> np.ndarray:
        return self.packed[:, 1]

    @classmethod
    def of(cls, flats: dict[int, torch.Tensor], n_locals: int) -> "EndTable":
        packed = np.full((n_locals, 2), -1, np.int64)
        ids = np.fromiter(flats.keys(), dtype=np.int64, count=len(flats))
        packed[ids, 0] = [t.data_ptr() for t in flats.values()]
        packed[ids, 1] = [t.numel() * t.element_size() for t in flats.values()]
        devices = {t.device for t in flats.values()}
        if len(devices) > 1:
            raise ValueError(f"one process's bound tensors must be on one device, got {sorted(map(str, devices))}")
        return cls(packed, devices.pop() if devices else torch.device("cpu"))


@dataclass
class _Binding:
    """Copy programs bound to one set of tensors (rebuilt when the endpoints' tensors move)."""

    key: tuple
    flats: dict[int, torch.Tensor]
    local: dict[int, list]  # stage -> programs
    pack: dict[tuple[int, int], list]  # (stage, round) -> programs
    unpack: dict[tuple[int, int], list]
    device: torch.device
    ipc_unpack: dict[tuple[int, int], list] = field(default_factory=dict)  # (stage, round) -> programs from peers' arenas
    local_fixed: dict[int, list] = field(default_factory=dict)  # stage -> the local programs of placement-free chunks
    cast: np.ndarray | None = None  # by plan local id: the endpoint's tensor is wider than the wire
    held: list = field(default_factory=list)  # the endpoints' dicts, so that their ids stay theirs
    ends: "EndTable | None" = None  # every bound tensor's address and size by plan local id
    pending: dict[int, np.ndarray] = field(default_factory=dict)  # stage -> moving local rows not yet programmed
    quantize: dict[str, QuantizeProgram] = field(default_factory=dict)  # side -> its FP8 derivations, bound
    messages: dict[tuple[int, int], "_Wire"] = field(default_factory=dict)  # (stage, round) -> its wire messages


def _round_robin(messages: list[Message]) -> list[Message]:
    """The messages taking turns between peers (each peer's in their order, which both ends share):
    posting a message costs tens of microseconds here, so posting one peer's dozens first leaves the
    others idle meanwhile (8 gloo processes, 53 messages a pair: 4-30% slower than taking turns)."""
    by_peer: dict[tuple[bool, int], list[Message]] = {}
    for m in messages:
        by_peer.setdefault((m.send, m.peer), []).append(m)
    turns = [(i, j, m) for j, queue in enumerate(by_peer.values()) for i, m in enumerate(queue)]
    return [m for _, _, m in sorted(turns, key=lambda t: (t[0], t[1]))]


@dataclass
class _Wire:
    """One round's messages on the wire for one binding, and the bytes they move."""

    messages: list[Message]
    direct_dst: set[int]  # destination local ids received into directly
    casts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # (wider source, sent copy)
    sent: int = 0
    received: int = 0
    sent_to: dict[int, int] = field(default_factory=dict)  # peer rank -> payload bytes


class PlanExecutor:
    def __init__(self, plan: SyncPlan, rank, transport: Transport | None = None,
                 bucket_bytes: int = 256 << 20, timeout_s: float = 120.0, direct_bytes: int | None = None,
                 process_of=None, copies: str = "auto", tile_bytes: int = 64 << 10, moving_tile_bytes: int = 256 << 10,
                 ipc: bool | str = False,
                 recheck: bool = True, fan: dict[int, np.ndarray] | None = None, collect_during_sync: bool = False,
                 previous: "PlanExecutor | None" = None) -> None:
        """``rank``: the plan rank this process hosts, or a list of them (colocated in one process).
        ``process_of[r]``: the transport rank of the process hosting plan rank ``r`` (default: ``r``).
        ``direct_bytes``: contiguous chunks at least this large skip the bucket copy and travel as
        messages of their own (default: ``DIRECT_BYTES`` of the transport's backend).
        ``copies``: how local, pack and unpack copies run: "auto" (batched: Triton kernels on CUDA
        when Triton is there, else ``_foreach_copy_``), "foreach", or "slices" (one ``copy_`` per slice).
        ``tile_bytes``: the most bytes a GPU copy program's tile moves; ``moving_tile_bytes``: the same for
        the local copies of routed experts' chunks, which every new expert placement programs again
        while the sync waits: a quarter of the tiles to cut and upload at 256 KB (the copy kernel moved the
        DeepSeek-V3-like case's programs as fast with them: 0.952 against 0.948 of a flat copy at 64 KB).
        ``ipc``: chunks between processes on one GPU (``plan.devices``) travel by CUDA IPC instead of
        the wire (``sync.channels.ipc``): ``True`` or "arena" packs them into the sender's shared send
        arena and the receiver unpacks (two copies); "direct" lets the receiver map the sender's
        tensors (their allocation blocks) and copy straight from them into its own (one copy).
        ``recheck``: each sync checks that the endpoints' tensors are still where the copy programs
        were bound (one pass over every tensor, while the first local copies run on the GPU) and
        rebinds if not; with False, a binding is reused while the endpoints hand over the same dict
        objects (for endpoints whose tensors never move).
        ``fan``: every process's fan-out (``planners.schedule.buckets.fanout``), needed where the plan is
        some ranks' part only (``plan.scope``; ``sync.session`` gathers it).
        ``collect_during_sync``: let Python's cyclic garbage collector run during a sync. By default it
        is paused for the sync and resumed after: a full collection walks every object the process
        holds (tens of thousands of tensors here) and, started by whatever allocation crosses its
        threshold, would stall the sync for tens of milliseconds. A sync makes no cyclic garbage.
        ``previous``: this process's executor of the plan before (a new expert placement), adopted
        (:meth:`adopt`). Where it is, this plan's tables are read at the next sync, not here: that sync
        first launches the adopted copies of the placement-free chunks, which this plan leaves as they
        were, so the GPU copies while the host reads the new placement's chunks."""
        if copies not in ("auto", "foreach", "slices"):
            raise ValueError(f"copies must be 'auto', 'foreach' or 'slices', got {copies!r}")
        self.plan = plan
        self.ranks = [int(rank)] if np.ndim(rank) == 0 else sorted(int(r) for r in rank)
        self.rank = self.ranks[0]
        self.transport = transport or Transport()
        self.timeout_s = timeout_s
        self.copies, self.tile_bytes, self.moving_tile_bytes, self.recheck = copies, tile_bytes, moving_tile_bytes, recheck
        self.collect_during_sync = collect_during_sync
        self.process_of = np.arange(plan.num_ranks) if process_of is None else np.asarray(process_of)
        self.hosted = np.zeros(plan.num_ranks, dtype=bool)
        self.hosted[self.ranks] = True
        self.me = int(self.process_of[self.rank])
        if ipc not in (False, True, "arena", "direct"):
            raise ValueError(f"ipc must be False, True, 'arena' or 'direct', got {ipc!r}")
        self.ipc = "arena" if ipc is True else ipc
        self._chunks = plan.chunks
        self._direct_bytes = DIRECT_BYTES.get(self.transport.backend, DIRECT_BYTES["gloo"]) if direct_bytes is None \
            else direct_bytes
        self._fan = fan
        self._previous: PlanExecutor | None = None
        self._bucket_bytes = bucket_bytes
        self._verifier: Verifier | None = None
        self._internal: dict[int, torch.Tensor] | None = None
        self._binding: _Binding | None = None
        self._arena: dict[str, torch.Tensor] = {}
        self._written = _Written()
        self._syncs = 0
        self._pull: tuple | None = None  # (binding, borrowed generations, programs by stage, their CUDA graphs)
        # the channels bytes between processes move on: the wire, and CUDA IPC between processes of one GPU
        self.wire: Channel = TorchP2P(self.transport)
        self.arena_ipc: IpcArena | None = None
        self.direct_ipc: IpcDirect | None = None
        self._tiles_on: bool | None = None  # whether local programs are Triton ones (known at the first bind)
        self._staging: PinnedTables | None = None  # where copy programs' tables are uploaded from, on CUDA
        self._tensor_shapes: tuple | None = None  # (the plan's tensor table, its shapes side by side)
        self._fixed_record_bytes: dict[int, np.ndarray] = {}  # stage -> its local placement-free chunks, as bytes
        self._tile_worker: ThreadPoolExecutor | None = None
        self.fault: Fault | None = None  # fault injection (sync.channels.faulty): fires once, in the next sync
        self._laid_out = False
        self.adopt(previous)
        if self._previous is None or self.ipc:  # IPC channels meet their peers at once, not at a sync
            self._lay_out()

    # attributes :meth:`_lay_out` sets: read before it ran (a deferred layout, see ``previous``), they run it
    _LAYOUT = frozenset({"_columns", "pulled_rows", "_lent_rows", "_lent_locals", "local_rows", "buckets", "_moving",
                         "rounds", "_derivations", "_pulled_totals", "_lent_totals"})

    def __getattr__(self, name: str):
        # reached only for attributes not set yet
        if name in PlanExecutor._LAYOUT and not self.__dict__.get("_laid_out", True):
            self._lay_out()
            return getattr(self, name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def _lay_out(self) -> None:
        """Read the plan's tables: which chunks this process copies locally, sends and receives, its
        buckets and rounds, and the IPC channels they need."""
        if self._laid_out:
            return
        self._laid_out = True
        plan, c = self.plan, self._chunks
        # the columns read here and at every bind, contiguous, in one pass over the packed records
        self._columns = columns = _chunk_columns(c, plan.table.expert)
        src, dst, stage = columns["src"], columns["dst"], columns["stage"]
        in_stage = {s: stage == s for s in (1, 2)}
        pulled, lent = np.zeros(len(c), dtype=bool), np.zeros(len(c), dtype=bool)
        if self.ipc == "direct":
            shared_gpu = (plan.devices[src] == plan.devices[dst]) & (self.process_of[src] != self.process_of[dst])
            pulled, lent = shared_gpu & self.hosted[dst], shared_gpu & self.hosted[src]
        self.pulled_rows = {s: np.flatnonzero(pulled & in_stage[s]) for s in (1, 2)}  # read from a lender's memory
        self._lent_rows = {s: np.flatnonzero(lent & in_stage[s]) for s in (1, 2)}  # others read from us
        # what each stage's pulls write and move, and what the lent chunks send to whom: counted every sync
        self._pulled_totals = {s: (np.unique(columns["dst_local"][rows]), int(c["nbytes"][rows].sum()))
                               for s, rows in self.pulled_rows.items()}
        self._lent_totals = {s: _bytes_by_peer(dst[rows], c["nbytes"][rows]) for s, rows in self._lent_rows.items()}
        lent_to = {s: sorted(set(self.process_of[dst[rows]].tolist())) for s, rows in self._lent_rows.items()}
        self._lent_locals = {q: sorted(set(columns["src_local"][lent & (self.process_of[dst] == q)].tolist()))
                             for q in set(lent_to[1]) | set(lent_to[2])}
        if self.hosted.all():  # one process hosts every rank: every chunk is a local copy
            self.local_rows = {s: np.flatnonzero(in_stage[s]) for s in (1, 2)}
            crossing = np.zeros(0, dtype=np.int64)
        else:
            hosted_src, hosted_dst = self.hosted[src], self.hosted[dst]
            self.local_rows = {s: np.flatnonzero(hosted_src & hosted_dst & in_stage[s]) for s in (1, 2)}
            crossing = np.flatnonzero(hosted_src != hosted_dst)
        self.buckets = bucketize(plan, self._bucket_bytes, self.ranks, self._direct_bytes, skip=pulled | lent,
                                 process_of=self.process_of, fan=self._fan, rows=crossing)
        # chunks of routed experts: the only ones a new expert placement changes (see adopt)
        self._moving = columns["moving"]
        self.rounds = self._rounds()
        self._derivations = _derivations(plan, self.hosted)
        uses_arena = any(r == "ipc" for rnd in self.rounds.values() for r in rnd.route)
        if uses_arena or pulled.any() or lent.any():
            store = self.transport.store or dist.distributed_c10d._get_default_store()
            signals = IpcSignals(store, f"rlsync-ipc/{self.transport.tag()}", self.me, self.timeout_s,
                                 int(self.process_of.max()) + 1)
            if uses_arena:
                self.arena_ipc = IpcArena(signals, *self._ipc_peers())
            else:
                lenders = {s: sorted(set(self.process_of[c["src"][rows]].tolist())) for s, rows in self.pulled_rows.items()}
                self.direct_ipc = IpcDirect(signals, lent_to, lenders)

    @property
    def verifier(self) -> Verifier:
        """The checksums of this plan (built at the first verified sync: a rebind that is not verified
        does not pay for them)."""
        if self._verifier is None:
            self._verifier = Verifier(self.plan, self.ranks, self._bucket_bytes, self.process_of)
        return self._verifier

    @property
    def channels(self) -> list[Channel]:
        """The channels of the next sync, in the order their stage hooks run."""
        wire = self.wire if self.fault is None else Faulty(self.wire, self.fault, self.timeout_s)
        return [ch for ch in (wire, self.arena_ipc, self.direct_ipc) if ch is not None]

    def _route(self, b: Bucket) -> str:
        same_gpu = self.plan.devices[b.src] == self.plan.devices[b.dst]
        if self.ipc == "arena" and same_gpu and self.process_of[b.src] != self.process_of[b.dst]:
            return "ipc"
        # a chunk travelling from its source is sent as it lies and received into the arena; one
        # travelling to its destination is packed and received into the tensor
        alone = b.from_source if self.hosted[b.src] else b.to_destination
        return "direct" if b.direct or alone else "packed"

    def _rounds(self) -> dict[tuple[int, int], _Round]:
        out: dict[tuple[int, int], _Round] = {}
        for b in self.buckets:
            r = out.setdefault((b.stage, b.index), _Round([], [], []))
            r.buckets.append(b)
            r.route.append(self._route(b))
            if r.route[-1] == "direct" or (r.route[-1] == "ipc" and not self.hosted[b.src]):
                r.arena_off.append(-1)  # a receiver of IPC reads the sender's arena
            elif self.hosted[b.src]:
                r.arena_off.append(r.send_bytes)
                r.send_bytes += -(-b.nbytes // ALIGN) * ALIGN
            else:
                r.arena_off.append(r.recv_bytes)
                r.recv_bytes += -(-b.nbytes // ALIGN) * ALIGN
        for r in out.values():  # one arena: a round's receive buckets follow its send buckets
            r.arena_off = [o + r.send_bytes if o >= 0 and not self.hosted[b.src] else o
                           for b, o in zip(r.buckets, r.arena_off)]
        return out

    def _ipc_peers(self) -> tuple[dict, dict]:
        """Per (stage, round): the processes this one packs IPC buckets for, and those it unpacks from."""
        sends: dict[tuple[int, int], set[int]] = {}
        receives: dict[tuple[int, int], set[int]] = {}
        for key, rnd in self.rounds.items():
            for b, route in zip(rnd.buckets, rnd.route):
                if route == "ipc" and self.hosted[b.src]:
                    sends.setdefault(key, set()).add(int(self.process_of[b.dst]))
                elif route == "ipc":
                    receives.setdefault(key, set()).add(int(self.process_of[b.src]))
        return sends, receives

    # -- binding tensors and copy programs -------------------------------------------------
    def _endpoint_tensors(self, sources, targets) -> list[tuple[int, dict[str, torch.Tensor], str]]:
        out = []
        for r in self.ranks:
            trainer = r < self.plan.num_trainer
            ends = sources if trainer else targets
            ep = ends.get(r) if isinstance(ends, dict) else ends
            if ep is None:
                raise ValueError(f"rank {r} needs a {'source' if trainer else 'target'} to sync")
            out.append((r, ep.local_tensors(), "source" if trainer else "target"))
        return out

    @staticmethod
    def _key(given) -> tuple:
        """Which dicts the endpoints handed over, where their tensors are, and those tensors to check again."""
        tensors = list(chain.from_iterable(d.values() for _, d, _ in given))
        addresses = list(map(torch.Tensor.data_ptr, tensors))
        return [id(d) for _, d, _ in given], addresses, Addresses(tensors, addresses)

    @staticmethod
    def _moved(given, key: tuple) -> bool:
        """Whether any tensor of the same dicts is another, or no longer where ``key`` says."""
        return key[2].moved([d for _, d, _ in given])

    def adopt(self, previous: "PlanExecutor | None") -> None:
        """Take over what ``previous`` (this process's executor of the plan before, e.g. before a new
        expert placement) bound and that this plan leaves as it was: the endpoints' checked views, and
        the local copy programs of the placement-free chunks, where those chunks are the same. Used by
        the next bind, if the endpoints' tensors are still where ``previous`` bound them."""
        if previous is not None and previous._binding is not None and previous.ranks == self.ranks \
                and previous.copies == self.copies and previous.tile_bytes == self.tile_bytes \
                and previous.moving_tile_bytes == self.moving_tile_bytes \
                and self.plan.same_locals(previous.plan):
            self._previous = previous
            self._internal = previous._internal  # the same locals: the same buffers, which its programs use
            self._staging = previous._staging  # pinned once, not again at every new placement
            self._tensor_shapes = previous._tensor_shapes
            self._tile_worker = previous._tile_worker

    def _launch_kept(self, given) -> dict[int, list]:
        """Before a deferred layout (see ``previous``): launch the adopted executor's local copies of
        placement-free chunks, where this plan holds those chunks as they were (one builder's) and the
        endpoints hand over the same dicts, so that the GPU copies while this plan's tables are read:
        stage 1's, and stage 2's too where one process hosts every rank (no byte arrives from another
        process, so stage 2's placement-free copies read only what stage 1's wrote; moving chunks write
        routed experts' tensors alone). The sync's check that no tensor moved covers them as it covers
        every copy it launches. Returns the programs launched by stage (the bind takes them over)."""
        previous = self._previous
        # a plan with FP8 derivations copies values the sync derives first: those wait for the layout
        if previous is None or self.fault is not None or len(self.plan.derived) \
                or not self.plan.same_fixed_part(previous.plan) or self._carried_key(given) is None:
            return {}
        kept = previous._binding.local_fixed
        launched = {stage: kept.get(stage, []) for stage in ((1, 2) if self.hosted.all() else (1,))}
        for programs in launched.values():
            for program in programs:
                program()
        return launched

    def _carried_key(self, given) -> tuple | None:
        """The adopted executor's key, where its endpoints hand over the same dicts: the sync binds on it
        and checks, while the first copies run, that their tensors are still where it says (as every
        sync by an unchanged plan does), instead of listing tens of thousands of addresses first."""
        previous = self._previous
        old = previous._binding if previous is not None else None
        if old is not None and old.key[0] == [id(d) for _, d, _ in given]:
            return old.key
        return None

    def _reusable(self, key: tuple) -> "tuple[PlanExecutor, _Binding] | None":
        previous, self._previous = self._previous, None  # once: the old executor is let go after this bind
        if previous is None:
            return None
        old = previous._binding
        if old is None or not (old.key is key or (old.key[0] == key[0] and old.key[1] == key[1])):
            return None  # other endpoints, or their tensors moved: bind from scratch
        return previous, old

    def _local_programs(self, flats, stage: int, cast, reuse, ends) -> tuple[list, np.ndarray]:
        """(the local programs of ``stage``'s placement-free chunks, the rows of its moving ones): the
        former taken from ``reuse`` where its placement-free chunks are exactly these. The moving rows
        are programmed when the stage runs, while the placement-free copies are under way."""
        rows = self.local_rows[stage]
        moves = self._moving[rows]
        fixed, moving = rows[~moves], rows[moves]
        kept = None
        if reuse is not None:
            previous, old = reuse
            # one builder's placement-free chunks are alike by construction; others', compared as bytes
            if self.plan.same_fixed_part(previous.plan) or (
                    self._chunks.dtype == previous._chunks.dtype
                    and np.array_equal(previous._fixed_bytes(stage), self._fixed_bytes(stage))):
                kept = old.local_fixed.get(stage, [])
        fixed_programs = self._programs(flats, fixed, None, None, cast, ends=ends) if kept is None else kept
        return fixed_programs, moving

    def _fixed_bytes(self, stage: int) -> np.ndarray:
        """The local placement-free chunks of ``stage``, as bytes (kept: the next placement's executor
        compares its own with them)."""
        if stage not in self._fixed_record_bytes:
            rows = self.local_rows[stage]
            self._fixed_record_bytes[stage] = _record_bytes(self._chunks, rows[~self._moving[rows]])
        return self._fixed_record_bytes[stage]

    def _bind(self, given, key: tuple, stats: SyncStats) -> _Binding:
        """Views of the hosted ranks' tensors by plan local id, and the copy programs over them."""
        t0 = time.perf_counter()
        plan = self.plan
        reuse = self._reusable(key)
        if reuse is not None:  # the same tensors, already checked against the same local tables: the same casts
            flats, cast = reuse[1].flats, reuse[1].cast
        else:
            flats = {}
            for r, tensors, side in given:
                ids = end_locals(plan, r)
                flats.update({int(i): t.view(-1) for i, t in zip(ids, check_locals(plan, r, tensors, side))})
            flats.update(self._internal_buffers(next(iter(flats.values())).device if flats else torch.device("cpu")))
            wire = {lid: TORCH_DTYPES[plan.local_dtype[lid]] for lid in flats}
            cast = np.array([lid in flats and flats[lid].dtype != wire[lid] for lid in range(len(plan.local_name))])
        device = next(iter(flats.values())).device if flats else torch.device("cpu")
        if device.type == "cuda" and (self._staging is None or self._staging.device != device):
            self._staging = PinnedTables(device)
        if (self.arena_ipc or self.direct_ipc) and device.type != "cuda":
            raise ValueError(f"ipc={self.ipc!r} moves CUDA tensors between processes on one GPU, but rank "
                             f"{self.rank}'s tensors are on {device}: pass ipc=False, or host those ranks in one process")
        arena = self._arena.get("send")
        if arena is not None and arena.device != device:
            raise ValueError(f"the endpoints' tensors moved from {arena.device} to {device}; build a new executor")
        if arena is None:  # two rounds in flight, each its send then its receive buckets
            size = max((r.send_bytes + r.recv_bytes for r in self.rounds.values()), default=0)
            self._arena["send"] = self._arena["recv"] = torch.empty((2, size), dtype=torch.uint8, device=device)
        peer_arenas = self.arena_ipc.open(self._arena["send"], self._ipc_offsets()) if self.arena_ipc else {}
        if self.direct_ipc is not None:  # the tensors that processes on this GPU read directly, as they are now
            self.direct_ipc.share({q: {lid: flats[lid] for lid in lids} for q, lids in self._lent_locals.items()}, device)
        ends = reuse[1].ends if reuse is not None else EndTable.of(flats, len(plan.local_name))
        binding = _Binding(key, flats, {}, {}, {}, device, held=[d for _, d, _ in given], cast=cast, ends=ends)
        for s in self.local_rows:
            fixed_programs, binding.pending[s] = self._local_programs(flats, s, cast, reuse, ends)
            binding.local[s], binding.local_fixed[s] = list(fixed_programs), fixed_programs
        for (s, k), rnd in self.rounds.items():
            rows, lo, hi, off = self._items(rnd, sending=True)
            binding.pack[(s, k)] = self._programs(flats, rows, lo, hi, cast, ("dst", self._arena["send"][k % 2]), off,
                                                  ends)
            rows, lo, hi, off = self._items(rnd, sending=False)
            binding.unpack[(s, k)] = self._programs(flats, rows, lo, hi, cast, ("src", self._arena["recv"][k % 2]), off,
                                                    ends)
            for p, (peer_arena, offsets) in peer_arenas.items():
                rows, lo, hi, off = self._ipc_items(rnd, p, offsets)
                if len(rows):
                    binding.ipc_unpack.setdefault((s, k), []).extend(
                        self._programs(flats, rows, lo, hi, cast, ("src", peer_arena[k % 2]), off))
        self._binding = binding
        stats.bind_seconds = time.perf_counter() - t0
        return binding

    def _ipc_offsets(self) -> dict[int, dict]:
        """For each process this one packs IPC buckets for: where each of them sits in the send arena."""
        out: dict[int, dict] = {}
        for rnd in self.rounds.values():
            for i, (b, route) in enumerate(zip(rnd.buckets, rnd.route)):
                if route == "ipc" and self.hosted[b.src]:
                    out.setdefault(int(self.process_of[b.dst]), {})[rnd.ipc_key(i)] = rnd.arena_off[i]
        return out

    def _items(self, rnd: _Round, sending: bool):
        """(chunk rows, lo, hi, arena offsets) of the round's packed buckets this process sends or receives."""
        picked = [(b, base) for b, base in zip(rnd.buckets, rnd.arena_off)
                  if base >= 0 and bool(self.hosted[b.src]) == sending]
        return self._cat(picked)

    def _ipc_items(self, rnd: _Round, process: int, offsets: dict):
        """Like :meth:`_items` for the buckets this process reads from ``process``'s shared arena."""
        picked = [(b, offsets[rnd.ipc_key(i)]) for i, (b, route) in enumerate(zip(rnd.buckets, rnd.route))
                  if route == "ipc" and not self.hosted[b.src] and self.process_of[b.src] == process]
        return self._cat(picked)

    @staticmethod
    def _cat(picked):
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0, dtype=np.int64)  # noqa: E731
        return (cat([b.chunk for b, _ in picked]), cat([b.lo for b, _ in picked]), cat([b.hi for b, _ in picked]),
                cat([b.offset + base for b, base in picked]))

    def _programs(self, flats, rows, lo, hi, cast, buffer=None, off=None, ends: "EndTable | None" = None,
                  tile_bytes: int | None = None) -> list:
        """Copies for chunk items: one batched program, plus one ``copy_`` per item whose source is
        wider than the wire (a cast) or for every item when unbatched. ``buffer``: (the end that is
        a flat buffer, "src" or "dst"; the buffer); ``off``: each item's byte offset in it."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        tile_bytes = tile_bytes or self.tile_bytes
        c = self._chunks
        slices = cast[self._columns["src_local"][rows]] | (self.copies == "slices")
        m = ~slices
        # whole chunks between bound tensors, on the GPU: tiles straight from the chunk records
        compiled = (m.any() and lo is None and hi is None and buffer is None and ends is not None
                    and self._compiled_tables(ends.device))
        if not compiled or slices.any():
            lo = c["lo"][rows] if lo is None else lo
            hi = c["hi"][rows] if hi is None else hi
        out: list = []
        if compiled:
            out.append(CopyProgram.of_chunks(c, rows[m], self._shapes(), ends, tile_bytes, self._staging))
        elif m.any():
            kw = {f"{buffer[0]}_buffer": off[m]} if buffer is not None else {}
            runs = chunk_runs(self.plan, rows[m], lo[m], hi[m], **kw)
            tensors = flats if buffer is None else {**flats, BUFFER: buffer[1]}
            table = ends if buffer is None else None  # a buffer end is not in the table
            out.append(CopyProgram(runs, tensors, tile_bytes, use_triton=False if self.copies == "foreach" else None,
                                   table=table, staging=self._staging))
        if slices.any():
            def end(side: str, row: int, a: int, b: int, o: int) -> torch.Tensor:
                if buffer is not None and buffer[0] == side:
                    return self._buffer_view(buffer[1], row, a, b, o)
                return self._view(flats, side, row, a, b)

            offsets = off[slices] if off is not None else np.zeros(int(slices.sum()), dtype=np.int64)
            pairs = [(end("dst", *item), end("src", *item)) for item in
                     zip(rows[slices].tolist(), lo[slices].tolist(), hi[slices].tolist(), offsets.tolist())]
            out.append(SliceCopies(pairs))
        return out

    def _shapes(self) -> np.ndarray:
        """``(itemsize, outer, inner)`` of every tensor of the plan, side by side (kept over a new placement:
        the same tensors)."""
        table = self.plan.table
        if self._tensor_shapes is None or self._tensor_shapes[0] is not table:
            self._tensor_shapes = (table, np.stack([table.itemsize, table.outer, table.inner], axis=1))
        return self._tensor_shapes[1]

    def _compiled_tables(self, device: torch.device) -> bool:
        """Whether batched copies on ``device`` are Triton programs, whose tables ``sync.copy_tables`` builds."""
        if self._tiles_on is None:
            self._tiles_on = self.copies == "auto" and device.type == "cuda" and triton_available()
        return self._tiles_on

    def _buffer_view(self, buf: torch.Tensor, row: int, lo: int, hi: int, off: int) -> torch.Tensor:
        t = self.plan.tensors[self._chunks["tensor"][row]]
        dt = TORCH_DTYPES[t.dtype]
        n = hi - lo
        return buf[off: off + t.outer * n * t.inner * dt.itemsize].view(dt).view(t.outer, n, t.inner)

    def _view(self, flats, side: str, row: int, lo: int, hi: int) -> torch.Tensor:
        c = self._chunks[row]
        t = self.plan.tensors[c["tensor"]]
        off = int(c[f"{side}_off"]) + lo - int(c["lo"])
        return block(flats[int(c[f"{side}_local"])], int(c[f"{side}_base"]), t.outer, int(c[f"{side}_dim"]), t.inner,
                     off, hi - lo)

    # -- the sync -----------------------------------------------------------------------
    def sync(self, source=None, target=None, verify: bool = True, version: int = 0, strict: bool = False) -> SyncStats:
        """Move the hosted ranks' part of the plan; with ``verify``, check every engine tensor's checksum
        (``strict``: a mismatch anywhere raises :class:`VerificationError` on every rank).
        ``source``/``target``: the endpoint of the hosted rank, or ``{plan rank: endpoint}``.

        A versioned target (``begin``/``commit``/``abort``) is told how the sync ended: committed only
        when verified (or when verification is off), aborted -- naming what was written -- otherwise."""
        written = _Written()
        targets = list(target.values()) if isinstance(target, dict) else [target]
        versioned = [t for t in targets if t is not None and hasattr(t, "begin")]
        told = targets[0] if len(targets) == 1 else (_EveryTarget(versioned) if versioned else None)
        paused = gc.isenabled() and not self.collect_during_sync
        if paused:
            gc.disable()
        try:
            return versioned_sync(told, version, lambda: self._sync(source, target, verify, written),
                                  lambda: sorted(self.plan.local_name[i] for i in written), strict and verify)
        finally:
            if paused:
                gc.enable()

    def _sync(self, source, target, verify: bool, written: _Written) -> SyncStats:
        stats = SyncStats(self.rank)
        self._written = written
        self._syncs += 1
        channels = self.channels
        self.fault = None  # armed for this sync only
        for ch in channels:
            ch.begin(self._syncs)
        t_start = time.perf_counter()
        if self._staging is not None:
            self._staging.begin()
        given = self._endpoint_tensors(source, target)
        early = self._launch_kept(given) if not self._laid_out else {}
        self._lay_out()
        binding = self._binding
        carried = self._carried_key(given) if binding is None else None
        if carried is not None:  # a new plan for the same endpoints: bind on the adopted key, check it meanwhile
            binding = self._bind(given, carried, stats)
            unchecked = self.recheck
        elif binding is None or binding.key[0] != [id(d) for _, d, _ in given]:  # new endpoints: bind first
            binding = self._bind(given, self._key(given), stats)
            unchecked = False
        else:  # the same dicts: check their tensors while the local copies run (one pass over them all)
            unchecked = self.recheck
        self._derive(binding, "trainer")  # FP8 values and scales from the trainer's own slices, first
        if verify:  # what the trainer sends is fixed from here: its checksums run while the bytes move
            self.verifier.start_expected(binding.flats)
        launched: list[int] = []
        settled = False  # all this sync launched has finished: the last stage ended waiting for it
        for stage in (1, 2):
            t0 = time.perf_counter()
            bound = binding
            channels[0].start(stage)  # the wire first: a fault at the stage's start fires before any copy
            self._local_copies(binding, stage, stats, early.get(stage, ()))
            launched.append(stage)
            remote = any(s == stage for s, _ in self.rounds)
            pulls, lends = len(self.pulled_rows[stage]) > 0, len(self._lent_rows[stage]) > 0
            # before anything is sent or lent, or once all copies are launched (or the pulls, checked as they run)
            if unchecked and (remote or lends or (stage == 2 and not pulls)):
                unchecked = False
                binding = self._recheck(given, binding, launched, stats)
            for ch in channels[1:]:
                ch.start(stage)
            self._count_lent(stage, stats)
            if pulls:  # checked while the first pulls run, and pulled again before the lenders hear of it
                binding = self._pull_from_lenders(binding, stage, stats, given if unchecked else None, launched)
                unchecked = False
            self._run_rounds(binding, stage, channels, stats)
            t_end = time.perf_counter()
            for ch in channels:
                ch.end(stage)
            stats.wait_seconds += time.perf_counter() - t_end  # for the peers reading our tensors or arena
            # local copies alone run on into stage 2; a stage 2 that launched nothing, after a stage 1 that
            # waited for its own work (for its rounds; its pulls; or, lending, before the readers read) waits
            # for nothing
            idle = not (remote or pulls or len(self.local_rows[stage])) and binding is bound
            if binding.device.type == "cuda" and (remote or stage == 2) and not (settled and idle):
                torch.cuda.synchronize(binding.device)
            settled = remote or pulls or lends
            stats.stage_seconds[stage] = time.perf_counter() - t0
        self._derive(binding, "engine")  # what arrived in full precision, quantized where the plan says
        stats.seconds = time.perf_counter() - t_start
        stats.peak_buffer_bytes = self._arena["send"].numel() if self._arena else 0
        finish_sync(stats, binding.flats, self.verifier if verify else None, self.transport, self._wait, binding.device,
                    target if isinstance(target, dict) else {r: target for r in self.ranks}, self.plan)
        return stats

    def _count_lent(self, stage: int, stats: SyncStats) -> None:
        """What processes on this GPU read from our tensors this stage counts as sent."""
        for peer, n in self._lent_totals[stage].items():
            stats.bytes_sent += n
            stats.sent_to[peer] = stats.sent_to.get(peer, 0) + n

    def _recheck(self, given, binding: _Binding, launched: list[int], stats: SyncStats) -> _Binding:
        """The binding after checking that no endpoint tensor moved since it was made: itself, or a new
        one for where the tensors are now, with the ``launched`` stages' local copies run again."""
        t_check = time.perf_counter()
        moved = self._moved(given, binding.key)
        stats.check_seconds = time.perf_counter() - t_check
        if not moved:
            return binding
        # those copies went to (or came from) memory the old binding still holds, harmlessly; copy again
        # where the tensors are now, before anything is sent
        binding = self._bind(given, self._key(given), stats)
        for s in launched:
            self._local_copies(binding, s, None)
        return binding

    def _pull_from_lenders(self, binding: _Binding, stage: int, stats: SyncStats, given, launched: list[int]) -> _Binding:
        """Copy this stage's chunks straight out of the tensors of other processes on this GPU; with
        ``given``, check meanwhile that our own tensors have not moved (pulling again if they had)."""
        t0 = time.perf_counter()
        generations, borrowed = self.direct_ipc.borrow(stage)
        t1 = time.perf_counter()
        stats.wait_seconds += t1 - t0  # for the lenders to say their tensors are ready
        self._launch_pulls(binding, stage, generations, borrowed)
        if given is not None:
            checked = self._recheck(given, binding, launched, stats)
            if checked is not binding:  # the pulls wrote where our tensors were: again, where they are
                binding = checked
                self._launch_pulls(binding, stage, generations, borrowed)
        self.direct_ipc.pulled(stage, binding.device)
        stats.unpack_seconds += time.perf_counter() - t1  # the copies, launched and finished
        written, nbytes = self._pulled_totals[stage]
        self._written.add_array(written)
        stats.bytes_received += nbytes
        return binding

    def _launch_pulls(self, binding: _Binding, stage: int, generations: dict, borrowed: dict) -> None:
        """This stage's pulls: launched as they are after a new binding or a lender's new generation (which
        also compiles their kernels), then replayed as one CUDA graph captured from those launches --
        launching the Triton kernel costs the host about 80 us on an H200 machine, on the critical path
        of a 2 ms refresh; a replay, a fraction of that."""
        pull = self._pull
        if pull is None or pull[0] is not binding or pull[1] != generations:
            ends = {**binding.flats, **borrowed}
            programs = {s: self._programs(ends, r, None, None, np.zeros(len(self.plan.local_name), dtype=bool))
                        for s, r in self.pulled_rows.items() if len(r)}
            self._pull = (binding, generations, programs, {})
            for program in programs[stage]:
                program()
            return
        graphs = pull[3]
        if stage not in graphs:
            graphs[stage] = _graph_of(pull[2][stage])
        if graphs[stage] is not None:
            graphs[stage].replay()
        else:
            for program in pull[2][stage]:
                program()

    def _internal_buffers(self, device: torch.device) -> dict[int, torch.Tensor]:
        """The plan's own locals of the hosted ranks (FP8 copies, scales, receiving buffers), kept here."""
        if self._internal is None:
            plan = self.plan
            ids = [i for r in self.ranks for i in plan.locals_of(r) if is_internal(plan.local_name[i])]
            self._internal = {int(i): torch.zeros(plan.local_shape[i], dtype=TORCH_DTYPES[plan.local_dtype[i]],
                                                  device=device).view(-1) for i in ids}
        return self._internal

    def _derive(self, binding: _Binding, side: str) -> None:
        """Quantize the derived locals of the hosted ``side`` ranks from their sources (``plan.derived``)."""
        jobs = self._derivations[side]
        if not jobs:
            return
        program = binding.quantize.get(side)
        if program is None:
            plan, flats = self.plan, binding.flats
            program = binding.quantize[side] = QuantizeProgram(
                [(flats[source], flats[value], flats[scale]) for source, value, scale in jobs],
                [tuple(plan.local_shape[source]) for source, _, _ in jobs])
        program()
        if side == "engine":
            self._written.update(i for _, value, scale in jobs for i in (value, scale))

    def _program_pending(self, binding: _Binding, stage: int):
        """Build the moving chunks' local programs of ``stage`` if not yet built, yielding each as it is
        built: a few thousand chunks first, then parts twice as large each, so that the copies of the
        first run on the GPU while the host builds the next. On the GPU the parts' tiles are cut on
        worker threads (the compiled pass holds no GIL) while this one uploads and launches those cut
        before, and the parts are merged into one program for the syncs after (one launch, not one a part)."""
        pending = binding.pending.pop(stage, None)
        if pending is None:
            return
        parts, start, size = [], 0, _FIRST_PENDING
        while start < len(pending):
            if len(pending) - start - size < _FIRST_PENDING:  # no small last part: one more wait and upload for little
                size = len(pending) - start
            parts.append(pending[start: start + size])
            start, size = start + len(parts[-1]), size * _PART_GROWTH
        ahead = []  # per part: the worker's tiles, or None where it is built here
        base = torch.empty(16, dtype=torch.uint8, device=binding.device)  # every part's addresses count from it
        for part in parts:
            whole = not (binding.cast[self._columns["src_local"][part]].any() or self.copies == "slices")
            if whole and binding.ends is not None and self._compiled_tables(binding.device):
                from sync.copy_tables import chunk_tiles

                ahead.append(self._worker().submit(chunk_tiles, self._chunks, part, self._shapes(), binding.ends.packed,
                                                   base.data_ptr(), self.moving_tile_bytes))
            else:
                ahead.append(None)
        cut = []  # the parts' programs from the worker's tiles
        for part, job in zip(parts, ahead):
            if job is None:
                programs = self._programs(binding.flats, part, None, None, binding.cast, ends=binding.ends,
                                          tile_bytes=self.moving_tile_bytes)
            else:
                programs = [CopyProgram.of_tiles(base, job.result(), self.moving_tile_bytes, self._staging)]
                cut += programs
            for program in programs:
                binding.local[stage].append(program)
                yield program
        if len(cut) > 1:
            parted = {id(p) for p in cut}
            binding.local[stage] = [p for p in binding.local[stage] if id(p) not in parted] + [CopyProgram.merged(cut)]

    def _worker(self) -> ThreadPoolExecutor:
        """The threads that cut moving chunks' tiles while this one launches (one pool per process's executors)."""
        if self._tile_worker is None:
            self._tile_worker = ThreadPoolExecutor(max_workers=_TILE_WORKERS, thread_name_prefix="rlsync-tiles")
        return self._tile_worker

    def bind(self, source=None, target=None) -> float:
        """Bind every copy program to the endpoints now, moving no byte: after a new plan (an expert
        placement known before the trainer's step ends, say), so that the next sync starts copying at
        once. That sync still checks, while its first copies run, that the tensors have not moved.
        Returns the seconds it took."""
        given = self._endpoint_tensors(source, target)
        self._lay_out()
        stats = SyncStats(self.rank)
        if self._staging is not None:
            self._staging.begin()
        carried = self._carried_key(given)
        binding = self._bind(given, carried if carried is not None else self._key(given), stats)
        t0 = time.perf_counter()
        for stage in list(binding.pending):
            for _ in self._program_pending(binding, stage):
                pass
        return stats.bind_seconds + time.perf_counter() - t0

    def _local_copies(self, binding: _Binding, stage: int, stats: SyncStats | None, launched=()) -> None:
        """Copies between hosted ranks (launched first: they overlap the network). After a new expert
        placement the moving chunks' programs are built here, while the GPU runs the others' copies.
        ``launched``: programs of the stage this sync launched already (:meth:`_launch_kept`)."""
        t0 = time.perf_counter()
        started = {id(p) for p in launched}
        for program in binding.local.get(stage, []):
            if id(program) not in started:
                program()
            if stats is not None:
                stats.bytes_copied += program.nbytes
        for program in self._program_pending(binding, stage):
            program()
            if stats is not None:
                stats.bytes_copied += program.nbytes
        self._written.add_array(self._columns["dst_local"], self.local_rows[stage])
        if stats is not None:
            stats.pack_seconds += time.perf_counter() - t0

    def _run_rounds(self, binding: _Binding, stage: int, channels: list[Channel], stats: SyncStats) -> None:
        """Rounds in order, two on the wire at once: round k is packed and posted before round k-1 is
        waited for and unpacked (each uses its own half of the arena), so that the wire does not stop
        while a receiver unpacks."""
        in_flight = None
        for k in sorted(k for s, k in self.rounds if s == stage):
            t0 = time.perf_counter()
            for ch in channels:
                ch.before_pack(stage, k)
            messages, direct_dst = self._prepare(binding, stage, k, stats)
            stats.pack_seconds += time.perf_counter() - t0
            pending = [ch.post(stage, k, messages if ch is channels[0] else []) for ch in channels]
            if in_flight is not None:
                self._finish(binding, *in_flight, channels, stats)
            in_flight = ((stage, k), direct_dst, pending)
        for ch in channels:
            ch.posted(stage)
        if in_flight is not None:
            self._finish(binding, *in_flight, channels, stats)

    def _prepare(self, binding: _Binding, stage: int, k: int, stats: SyncStats) -> tuple[list[Message], set[int]]:
        """Pack round ``k``'s send buckets into the arena; the wire's messages that send and receive it."""
        for program in binding.pack.get((stage, k), []):
            program()
        wire = binding.messages.get((stage, k))
        if wire is None:  # views of the bound tensors and arena: made once per binding (hundreds per sync)
            wire = binding.messages[(stage, k)] = self._messages(binding, stage, k)
        for source, sent in wire.casts:
            sent.copy_(source)
        stats.bytes_sent += wire.sent
        stats.bytes_received += wire.received
        for peer, n in wire.sent_to.items():
            stats.sent_to[peer] = stats.sent_to.get(peer, 0) + n
        return wire.messages, wire.direct_dst

    def _messages(self, binding: _Binding, stage: int, k: int) -> "_Wire":
        rnd = self.rounds[(stage, k)]
        out = _Wire([], set())
        for b, base, route in zip(rnd.buckets, rnd.arena_off, rnd.route):
            sending = bool(self.hosted[b.src])
            peer = b.dst if sending else b.src
            if sending:
                out.sent += b.nbytes
                out.sent_to[peer] = out.sent_to.get(peer, 0) + b.payload
            else:
                out.received += b.nbytes
            if route == "ipc":  # read from the sender's arena (IpcArena), not on the wire
                continue
            if route == "direct":  # one contiguous chunk: straight from the source / into the destination
                buf = self._view(binding.flats, "src" if sending else "dst", int(b.chunk[0]), int(b.lo[0]), int(b.hi[0]))
                dtype = TORCH_DTYPES[self.plan.tensors[self._chunks["tensor"][int(b.chunk[0])]].dtype]
                if sending and buf.dtype != dtype:  # a wider source is cast at every sync, into a buffer of its own
                    out.casts.append((buf, torch.empty(buf.shape, dtype=dtype, device=buf.device)))
                    buf = out.casts[-1][1]
                buf = buf.reshape(-1).view(torch.uint8)
                if not sending:
                    out.direct_dst.add(int(self._chunks["dst_local"][int(b.chunk[0])]))
            else:
                buf = self._arena["send" if sending else "recv"][k % 2][base: base + b.nbytes]
            out.messages.append(Message(sending, buf, int(self.process_of[peer]),
                                        f"stage {stage}: {'sending' if sending else 'receiving'} bucket {k} "
                                        f"{'to' if sending else 'from'} rank {peer}"))
        out.messages = _round_robin(out.messages)
        return out

    def _finish(self, binding: _Binding, key: tuple[int, int], direct_dst: set[int], pending: list,
                channels: list[Channel], stats: SyncStats) -> None:
        t0 = time.perf_counter()
        self._written.update(direct_dst)
        for ch, p in zip(channels, pending):
            ch.wait(p, self.timeout_s)
        t1 = time.perf_counter()
        rnd = self.rounds[key]
        self._written.update(int(self._chunks["dst_local"][r]) for b, route in zip(rnd.buckets, rnd.route)
                             if route != "direct" and self.hosted[b.dst] for r in b.chunk.tolist())
        for program in binding.unpack.get(key, []) + binding.ipc_unpack.get(key, []):
            program()
        for ch in channels:
            ch.after_unpack(*key)
        stats.wait_seconds += t1 - t0
        stats.unpack_seconds += time.perf_counter() - t1

    def _wait(self, work, label: str) -> None:
        wait_all([work], [label], self.timeout_s)
