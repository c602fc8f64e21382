"""End-to-end verification of a sync by checksums (see ``sync.tensors``).

Trainer ranks add, for every chunk whose bytes they originate (stage 1, and the stage-2 chunks fed
by it), what those bytes contribute to the destination tensor's checksum, and send each process the
sums of its engine tensors, point to point; every engine rank compares each of its tensors with them,
and the caller's exchange of sync times (or one more all-reduce) makes every rank agree on the verdict.
It checks what arrived, however it was moved.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from planners.schedule.buckets import stage2_origin
from planners.plan import SyncPlan
from planners.schedule.runs import RUN_DTYPE, block_runs
from sync.tensors import TORCH_DTYPES, block
from sync.verify.checksums import CHECKSUM_BYTES_PER_ELEMENT, block_pieces, wrap_int64, checksum_block, checksum_flat
from sync.verify.words import word_bytes

__all__ = ["Routes", "Verifier"]


class Verifier:
    def __init__(self, plan: SyncPlan, rank, budget_bytes: int | None = None, process_of=None) -> None:
        """``rank``: the plan rank this process checks, or a list of them (hosted together);
        ``budget_bytes``: about the most temporary memory the checksums may hold (CPU path);
        ``process_of[r]``: the transport rank of the process hosting plan rank ``r`` (default: ``r``)."""
        self.plan = plan
        self.most = None if budget_bytes is None else max(budget_bytes // CHECKSUM_BYTES_PER_ELEMENT, 1 << 10)
        ranks = [int(rank)] if np.ndim(rank) == 0 else [int(r) for r in rank]
        c = plan.chunks
        self.inf_first = int(np.searchsorted(plan.local_rank, plan.num_trainer))
        origin = stage2_origin(plan)
        mine = np.flatnonzero((c["stage"] == 1) & np.isin(c["src"], ranks))
        fed = np.flatnonzero(np.isin(origin, mine))
        # (chunk whose destination gets the bytes, chunk whose source holds them)
        self.work = [(r, r) for r in mine.tolist()] + [(r, int(origin[r])) for r in fed.tolist()]
        self.process_of = np.arange(plan.num_ranks) if process_of is None else np.array(process_of, dtype=np.int64)
        self.process_of[ranks] = self.process_of[ranks[0]]  # the ranks checked here share this process
        # a rank's part of the plan (plan.scope) holds the stage-2 chunks its own sends feed but not the
        # stage-1 chunks that fed those it receives: it knows whom it sends sums, and learns from whom
        # it hears at its first check (Routes.receive_from None until then)
        self.routes = _routes(plan, origin, self.process_of, int(self.process_of[ranks[0]]), self.inf_first)
        self._prepared: dict | None = None
        self._early: tuple | None = None  # (flats, thread, result) of start_expected
        self.word = word_bytes(plan)  # what each tensor's checksum reads as one word (both ends alike)
        # a rank's part of the plan sees only some chunks into a tensor: its words are agreed at the first check
        self._words_agreed = plan.scope is None
        self._wide, self._set_aside = True, {}  # read_words: the other choice's prepared programs
        # an engine's locals quantized on arrival (planners.quant) hold what it computed, not what was sent:
        # what was sent is checked where it arrived (the full-precision buffer they are computed from)
        self.computed = set(plan.derived["local"][plan.local_rank[plan.derived["local"]] >= plan.num_trainer].tolist())

    def read_words(self, wide: bool) -> None:
        """Checksums in 4-byte words where the plan allows (the default), or (``wide=False``) in elements;
        every rank of a sync must choose alike. For side-by-side benchmarks."""
        if wide == self._wide:
            return
        # each choice keeps its words (agreed or not) and its programs (built once)
        self._set_aside[self._wide] = (self.word, self._words_agreed, self._prepared)
        self._wide = wide
        fresh = (word_bytes(self.plan, wide), self.plan.scope is None or not wide, None)  # elements need no agreeing
        self.word, self._words_agreed, self._prepared = self._set_aside.pop(wide, fresh)

    def start_expected(self, flats: dict[int, torch.Tensor]) -> None:
        """Begin this rank's expected sums in a thread while the bytes move (CPU tensors: the C and numba
        kernels let go of the GIL while the executor waits on the network). What a trainer sends is
        fixed for the length of a sync; :meth:`check` of the same ``flats`` takes the result."""
        self._early = None
        if not self._words_agreed or not self.work or not flats or next(iter(flats.values())).device.type != "cpu" or not _batched(flats):
            return
        self._prepare(flats)  # here, not in the thread: check() builds from the same cache
        box: dict = {}

        def compute() -> None:
            try:
                box["sums"] = self.expected(flats)
            except BaseException as e:  # raised again by check(), on the caller's thread
                box["error"] = e

        thread = threading.Thread(target=compute, name="rlsync-expected-sums", daemon=True)
        self._early = (flats, thread, box)
        thread.start()

    def _take_expected(self, flats: dict[int, torch.Tensor]) -> torch.Tensor:
        early, self._early = self._early, None
        if early is None or early[0] is not flats:  # not started, or the endpoints were bound anew since
            if early is not None:
                early[1].join()
            return self.expected(flats)
        early[1].join()
        if "error" in early[2]:
            raise early[2]["error"]
        return early[2]["sums"]

    def expected(self, flats: dict[int, torch.Tensor]) -> torch.Tensor:
        """[engine locals, 2] this rank's contributions to every engine tensor's (S0, S1)."""
        if not _batched(flats):
            return self._expected_slices(flats, self.work)
        prepared = self._prepare(flats)
        out = prepared["sent"]() if prepared["sent"] is not None else self._zeros(flats)
        if prepared["cast"]:  # wider sources: cast chunk by chunk, as the engine receives them
            out += self._expected_slices(flats, prepared["cast"]).to(out.device)
        return out

    def _zeros(self, flats) -> torch.Tensor:
        device = next(iter(flats.values())).device
        return torch.zeros((len(self.plan.local_name) - self.inf_first, 2), dtype=torch.int64, device=device)

    def _expected_slices(self, flats: dict[int, torch.Tensor], work) -> torch.Tensor:
        plan = self.plan
        out = torch.zeros((len(plan.local_name) - self.inf_first, 2), dtype=torch.int64)
        rows = np.array([r for r, _ in work], dtype=np.int64)
        origins = np.array([o for _, o in work], dtype=np.int64)
        for chunk in _from_origin(plan.chunks, rows, origins):
            t = plan.tensors[chunk["tensor"]]
            lo, hi = int(chunk["lo"]), int(chunk["hi"])
            data = block(flats[int(chunk["src_local"])], int(chunk["src_base"]), t.outer, int(chunk["src_dim"]),
                         t.inner, int(chunk["src_off"]), hi - lo)
            s0 = s1 = 0
            dst_base, dst_dim, dst_off = int(chunk["dst_base"]), int(chunk["dst_dim"]), int(chunk["dst_off"])
            wire = TORCH_DTYPES[t.dtype]
            word = int(self.word[chunk["dst_local"]])
            for piece, base, off in block_pieces(data, dst_base, dst_dim, dst_off, self.most or data.numel(),
                                                 max(word // wire.itemsize, 1)):
                piece = piece.to(wire)  # what the engine receives (a wider source is cast)
                a, b = checksum_block(piece, base, dst_dim, off, word=word)
                s0, s1 = s0 + a, s1 + b
            out[int(chunk["dst_local"]) - self.inf_first] += torch.tensor([wrap_int64(s0), wrap_int64(s1)])
        return out

    def _prepare(self, flats: dict[int, torch.Tensor]) -> dict:
        """Batched checksum programs over these tensors (built once per set of tensors)."""
        if self._prepared is not None and self._prepared["flats"] is flats:
            return self._prepared
        plan, c = self.plan, self.plan.chunks
        rows = np.array([r for r, _ in self.work], dtype=np.int64)
        origins = np.array([o for _, o in self.work], dtype=np.int64)
        wire = np.array([TORCH_DTYPES[plan.tensors[t].dtype] for t in c["tensor"][rows]], dtype=object)
        have = np.array([flats[int(l)].dtype for l in c["src_local"][origins]], dtype=object)
        cast = wire != have
        self._prepared = dict(flats=flats, sent=self._sent(flats, rows, origins, cast),
                              cast=[w for w, k in zip(self.work, cast) if k])
        engine = np.array(sorted(lid for lid in flats if lid >= self.inf_first and lid not in self.computed),
                          dtype=np.int64)
        whole = np.zeros(len(engine), dtype=RUN_DTYPE)  # each engine tensor, summed where it is
        whole["src"] = whole["dst"] = engine
        whole["nbytes"] = whole["src_stride"] = whole["dst_stride"] = [flats[int(i)].numel() * flats[int(i)].element_size()
                                                                        for i in engine]
        whole["rows"] = 1
        self._prepared.update(engine=engine, held=self._sums(flats, whole) if len(whole) else None)
        return self._prepared

    def _sums(self, flats, runs, per_run: bool = False):
        """RunSums of ``runs`` into each engine local, or (``per_run``) into one row per run."""
        from sync.verify.batched import RunSums

        plan = self.plan
        dst = np.arange(len(runs)) if per_run else runs["dst"] - self.inf_first
        return RunSums(runs, self.word[runs["dst"]], dst, len(runs) if per_run else len(plan.local_name) - self.inf_first,
                       {int(i): flats[int(i)] for i in np.unique(runs["src"])})

    def _sent(self, flats, rows: np.ndarray, origins: np.ndarray, cast: np.ndarray):
        """What the work items not cast add to the engine locals' sums, as one callable (None: nothing).

        Bytes landing in the same block shape (the same index range, and the same split-dimension length
        if the block has several rows) at another place have their positions shifted by one number, so
        their sums are the first's with ``S1 + shift * S0``: each source region is read once, however
        many destinations it reaches -- a stage-2 chunk carries the bytes of its stage-1 origin, and a
        trainer byte sent to several engines travels in one stage-1 chunk for each."""
        plan, c = self.plan, self.plan.chunks
        mine = rows[(rows == origins) & ~cast]  # the stage-1 chunks this rank sends (ascending)
        read, read_of_mine = self._read_once(mine)
        fed = self._fed_alike(rows, origins, cast, mine)
        elsewhere = (rows != origins) & ~cast & ~fed  # stage-2 chunks summed from their origin's source
        read_runs = block_runs(plan, c[read], merge=False)  # one run per chunk read: its sums feed the shifted ones
        assert len(read_runs) == len(read), "a chunk without bytes"
        read_sums = self._sums(flats, read_runs, per_run=True) if len(read) else None
        elsewhere_runs = block_runs(plan, _from_origin(c, rows[elsewhere], origins[elsewhere]))
        elsewhere_sums = self._sums(flats, elsewhere_runs) if len(elsewhere_runs) else None
        if read_sums is None and elsewhere_sums is None:
            return None
        # shifted from a chunk read: mine not read, and the stage-2 chunks they (or those read) feed
        copies = mine[~np.isin(mine, read)]
        shifted = np.concatenate([copies, rows[fed]])
        source = read[read_of_mine[np.searchsorted(mine, np.concatenate([copies, origins[fed]]))]]
        device = next(iter(flats.values())).device
        up = lambda x: torch.from_numpy(np.ascontiguousarray(x, dtype=np.int64)).to(device)  # noqa: E731
        read_dst = up(c["dst_local"][read] - self.inf_first)
        shifted_from, shifted_dst = up(np.searchsorted(read, source)), up(c["dst_local"][shifted] - self.inf_first)
        shift = up(self._word_shift(shifted, source))
        n_dst = len(plan.local_name) - self.inf_first

        def sent() -> torch.Tensor:
            total = (elsewhere_sums() if elsewhere_sums is not None
                     else torch.zeros((n_dst, 2), dtype=torch.int64, device=device))
            if read_sums is not None:
                each = read_sums()
                total.index_add_(0, read_dst, each)
                moved = each[shifted_from]
                total.index_add_(0, shifted_dst, torch.stack([moved[:, 0], moved[:, 1] + shift * moved[:, 0]], dim=1))
            return total

        return sent

    def _read_once(self, mine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Of the stage-1 chunks ``mine`` (ascending): those read for their sums (the first of each group
        reading the same source region into the same block shape, in the same words), and for each of
        ``mine`` the index of the one read in its group."""
        if not len(mine):
            return mine, np.zeros(0, dtype=np.int64)
        plan, c = self.plan, self.plan.chunks
        split = plan.table.outer[c["tensor"][mine]] > 1  # blocks of several rows: their row length matters
        keys = np.stack([c["src_local"][mine], c["src_base"][mine], c["src_dim"][mine], c["src_off"][mine],
                         c["lo"][mine], c["hi"][mine], np.where(split, c["dst_dim"][mine], -1),
                         self.word[c["dst_local"][mine]]], axis=1).astype(np.int64)
        _, first, group = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        read = mine[np.sort(first)]
        return read, np.searchsorted(read, mine[first[group.reshape(-1)]])

    def _fed_alike(self, rows: np.ndarray, origins: np.ndarray, cast: np.ndarray, mine: np.ndarray) -> np.ndarray:
        """Which work items are stage-2 chunks fed by one of ``mine`` in its block shape and words (their
        sums: their origin's, shifted)."""
        if not len(mine):
            return np.zeros(len(rows), dtype=bool)
        plan, c = self.plan, self.plan.chunks
        same_shape = ((c["lo"][rows] == c["lo"][origins]) & (c["hi"][rows] == c["hi"][origins])
                      & ((plan.table.outer[c["tensor"][rows]] == 1) | (c["dst_dim"][rows] == c["dst_dim"][origins])))
        same_shape &= self.word[c["dst_local"][rows]] == self.word[c["dst_local"][origins]]  # sums in the same words
        at = np.minimum(np.searchsorted(mine, origins), len(mine) - 1)
        return (rows != origins) & ~cast & same_shape & (mine[at] == origins)

    def _word_shift(self, shifted: np.ndarray, source: np.ndarray) -> np.ndarray:
        """How many of the destination's words (their positions: whole words, by the rule of
        ``sync.verify.words``) each chunk of ``shifted`` lands after the chunk ``source`` it is summed from."""
        plan, c = self.plan, self.plan.chunks
        first = lambda r: c["dst_base"][r] + c["dst_off"][r] * plan.table.inner[c["tensor"][r]]  # noqa: E731
        per_word = self.word[c["dst_local"][shifted]] // plan.table.itemsize[c["tensor"][shifted]]
        return (first(shifted) - first(source)) // np.maximum(per_word, 1)

    def check(self, flats: dict[int, torch.Tensor], transport, wait, agree: bool = True) -> tuple[list[str], int | None]:
        """Names of this rank's engine tensors whose checksum differs; ``wait(work, label)`` waits
        with the caller's deadline. Returns (local mismatches, total mismatches over all ranks); with
        ``agree=False`` the total is left to the caller (None), who folds the count into a collective
        of its own (``sync.executor.finish_sync``: one exchange fewer)."""
        device = next(iter(flats.values())).device if flats else torch.device("cpu")
        if not self._words_agreed:
            self._agree_words(transport, wait, device)
        held = None
        if _batched(flats):  # what this rank holds, summed before the exchange: engines sum while trainers do
            prepared = self._prepare(flats)
            if prepared["held"] is not None:
                held = prepared["held"]()
        expected = self._exchange(self._take_expected(flats).to(device), transport, wait)
        bad = []
        if held is not None:
            rows = torch.from_numpy(prepared["engine"] - self.inf_first).to(device)
            differ = (held[rows] != expected[rows]).any(dim=1).cpu().numpy()
            bad = [self.plan.local_name[int(lid)] for lid in prepared["engine"][differ]]
        elif not _batched(flats):
            want = expected.cpu()
            for lid, flat in flats.items():
                if lid < self.inf_first or lid in self.computed:
                    continue
                if tuple(want[lid - self.inf_first].tolist()) != checksum_flat(flat, self.most or 1 << 22,
                                                                               int(self.word[lid])):
                    bad.append(self.plan.local_name[lid])
        if not agree:
            return bad, None
        count = torch.tensor([len(bad)], dtype=torch.int64, device=device)
        wait(transport.all_reduce(count), "agreeing on verification")
        return bad, int(count.item())

    def _exchange(self, expected: torch.Tensor, transport, wait) -> torch.Tensor:
        """``expected`` with this process's engine rows summed over every process that sends them bytes
        (the other rows: this process's own contributions alone)."""
        routes = self.routes
        if routes.receive_from is None:
            routes = self.routes = self._learn_senders(routes, transport, wait, expected.device)
        if not routes.send_to and not routes.receive_from:
            return expected
        # messages where the group moves them (gloo: host memory, even for CUDA tensors' sums)
        wire = getattr(transport, "collective_device", expected.device)
        on_wire = expected.to(wire)
        ops, inbox = [], []
        for q, rows in sorted(routes.send_to.items()):
            ops.append((True, on_wire[torch.from_numpy(rows).to(wire)].contiguous(), q))
        for p in routes.receive_from:
            inbox.append(torch.empty((len(routes.mine), 2), dtype=torch.int64, device=wire))
            ops.append((False, inbox[-1], p))
        for work in transport.batch(ops):
            wait(work, "sharing checksums")
        if inbox:
            mine = torch.from_numpy(routes.mine).to(expected.device)
            expected = expected.clone()
            expected[mine] += torch.stack(inbox).sum(dim=0).to(expected.device)
        return expected

    def _agree_words(self, transport, wait, device) -> None:
        """Every process's words, made the smallest any process found: each chunk is in the part of
        the plan of its sender and of its receiver, so the smallest is the whole plan's rule."""
        words = torch.from_numpy(self.word.astype(np.int32)).to(getattr(transport, "collective_device", device))
        wait(transport.all_reduce(words, dist.ReduceOp.MIN), "agreeing on checksum words")
        self.word = words.cpu().numpy().astype(np.int64)
        self._words_agreed, self._prepared = True, None

    def _learn_senders(self, routes: "Routes", transport, wait, device) -> "Routes":
        """``routes`` with ``receive_from`` from every process's ``send_to`` (one all-reduce of a
        processes x processes table, once per plan: a rank's part of the plan cannot name them)."""
        processes = int(self.process_of.max()) + 1
        table = torch.zeros((processes, processes), dtype=torch.int32,
                            device=getattr(transport, "collective_device", device))
        for q in routes.send_to:
            table[routes.me, q] = 1
        wait(transport.all_reduce(table), "learning who sends checksums")
        senders = torch.nonzero(table[:, routes.me]).flatten().cpu().tolist()
        return replace(routes, receive_from=[int(p) for p in senders if p != routes.me])


@dataclass(frozen=True)
class Routes:
    """Who sends whom expected sums: each process sends the processes whose engine tensors its bytes
    reach (directly, or through a stage-2 hop from a chunk it sent) their rows alone, and hears from
    those whose bytes reach its own -- one message per pair that shares bytes, instead of an all-reduce
    of every engine tensor's sums over every process."""

    me: int  # this process
    send_to: dict[int, np.ndarray]  # process -> its engine locals' rows (local id - first engine local)
    receive_from: list[int] | None  # None: not yet known (a rank's part of the plan; learned at the first check)
    mine: np.ndarray  # rows of this process's engine locals


def _routes(plan: SyncPlan, origin: np.ndarray, process_of: np.ndarray, me: int, inf_first: int) -> Routes:
    """The :class:`Routes` of process ``me``, from the plan alone (every process derives everyone's alike)."""
    c = plan.chunks
    source_chunk = np.where(c["stage"] == 1, np.arange(len(c)), origin)  # the chunk whose source sent the bytes
    fed = source_chunk >= 0
    senders = process_of[c["src"][source_chunk[fed]]]
    receivers = process_of[c["dst"][fed]]
    row_process = process_of[plan.local_rank[inf_first:]]  # the process hosting each engine local
    send_to = {int(q): np.flatnonzero(row_process == q) for q in np.unique(receivers[(senders == me) & (receivers != me)])}
    receive_from = None if plan.scope is not None else np.unique(senders[(receivers == me) & (senders != me)]).tolist()
    return Routes(me, send_to, receive_from, np.flatnonzero(row_process == me))


def _from_origin(chunks: np.ndarray, rows: np.ndarray, origins: np.ndarray) -> np.ndarray:
    """Records of the chunks ``rows``, each reading its bytes where its origin chunk's source holds them."""
    records = chunks[rows].copy()
    origin = chunks[origins]
    for field in ("src_local", "src_base", "src_dim"):
        records[field] = origin[field]
    records["src_off"] = origin["src_off"] + records["lo"] - origin["lo"]
    return records


def _batched(flats: dict[int, torch.Tensor]) -> bool:
    """Checksums by :class:`sync.verify.batched.RunSums` (Triton on CUDA, numba on the CPU), where they run."""
    from sync.verify.batched import available

    return bool(flats) and available(next(iter(flats.values())).device)

