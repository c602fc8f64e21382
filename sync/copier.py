"""Batched byte copies on one device: a table of runs (``planners.schedule.runs``) in a few launches.

Copying tens of thousands of small slices one ``copy_`` at a time is bound by launch overhead, not
memory bandwidth. :class:`CopyProgram` binds a run table to the tensors at its ends once; on CUDA
with Triton it cuts the runs into tiles and copies them all with one kernel launch per alignment
class, driven by per-tile (source, destination, length) tables that live on the device. Elsewhere
(CPU, or no Triton) it is one ``torch._foreach_copy_`` over byte views built at bind time. A
program stays valid while the tensors stay where they are.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["CopyProgram", "PinnedTables", "expand", "triton_available"]

CLASSES = (16, 8, 4, 2, 1)  # alignment (bytes) shared by a run's source, destination and length
WIDE_ROW = 8 << 10  # bytes: a strided run's rows at least this long are copied as contiguous runs
_WORD = {16: (torch.int32, 4), 8: (torch.int32, 2), 4: (torch.int32, 1), 2: (torch.int16, 1), 1: (torch.uint8, 1)}


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


class PinnedTables:
    """Pinned host memory that copy programs' tables are uploaded from, without waiting: an upload from
    pageable memory waits for every copy already queued on the stream, and pinning a block per upload
    cost ~2.7 ms each on an H200's host (seven of them in the first sync after a new placement). One
    buffer, filled from its start again at each :meth:`begin` (once the uploads from it have been read),
    grown when a batch of uploads needs more."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffer: torch.Tensor | None = None
        self._used = 0
        self._restart = False
        self._read = torch.cuda.Event()  # recorded after the last upload

    def begin(self) -> None:
        """Start a batch of uploads (a bind, a sync): from the buffer's start, once the last batch's are
        read (waited for at the batch's first upload: a sync that uploads nothing does not wait)."""
        self._restart = True

    def upload(self, table: np.ndarray) -> torch.Tensor:
        if self._restart:
            self._read.synchronize()
            self._used, self._restart = 0, False
        table = np.ascontiguousarray(table, dtype=np.int64)
        n = table.size
        if self._buffer is None or self._used + n > len(self._buffer):
            # a new buffer; the old one is kept by torch's host allocator until the uploads from it are read
            size = max(2 * (len(self._buffer) if self._buffer is not None else 0), n, 1 << 16)
            self._buffer, self._used = torch.empty(size, dtype=torch.int64, pin_memory=True), 0
        staged = self._buffer[self._used: self._used + n]
        staged.numpy()[:] = table.reshape(-1)
        self._used += n
        out = staged.view(table.shape).to(self.device, non_blocking=True)
        self._read.record()
        return out


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class CopyProgram:
    """``runs`` (``planners.schedule.runs.RUN_DTYPE``) between ``ends`` (id -> contiguous tensor, one device)."""

    def __init__(self, runs: np.ndarray, ends: dict[int, torch.Tensor], tile_bytes: int = 64 << 10,
                 use_triton: bool | None = None, table=None, staging: PinnedTables | None = None) -> None:
        """``table``: the ends' addresses and sizes by id (``sync.executor.EndTable``, one device), so that
        binding looks up arrays instead of tensors. ``staging``: where the tile tables are uploaded from
        (default: a pinned block each)."""
        self._staging = staging
        # the fields as contiguous columns, read many times below (a structured array's fields are strided)
        cols = {k: np.ascontiguousarray(runs[k]) for k in runs.dtype.names}
        self.nbytes = int((cols["nbytes"] * cols["rows"]).sum()) if len(runs) else 0
        self.num_runs = len(runs)
        self.launches: list[tuple] = []
        self.pairs: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
        if table is not None:  # look every run's ends up in the table: no set of ends to build
            ids = None
            for side in ("src", "dst"):
                end = cols[side]
                outside = (end < 0) | (end >= len(table.nbytes))
                bad = end[outside] if outside.any() else end[table.nbytes[end] < 0]
                if len(bad):
                    raise ValueError(f"runs reach ends {bad[:5].tolist()} the program was not given")
            self.device = table.device
        else:
            # the ends the runs use: a binding hands over every tensor it holds (tens of thousands)
            ids = np.unique(np.concatenate([cols["src"], cols["dst"]])) if len(runs) else np.zeros(0, np.int64)
            missing = [i for i in ids.tolist() if i not in ends]
            if missing:
                raise ValueError(f"runs reach ends {missing[:5]} the program was not given")
            devices = {ends[i].device for i in ids.tolist()} if len(ids) else {t.device for t in list(ends.values())[:1]}
            if len(devices) > 1:
                raise ValueError(f"a copy program works on one device, got {sorted(map(str, devices))}")
            self.device = devices.pop() if devices else torch.device("cpu")
        if use_triton is None:
            use_triton = self.device.type == "cuda" and triton_available()
        if not len(runs):
            return
        for side in ("src", "dst"):
            last = cols[f"{side}_off"] + (cols["rows"] - 1) * cols[f"{side}_stride"] + cols["nbytes"]
            size = table.nbytes[cols[side]] if table is not None else \
                np.array([ends[i].numel() * ends[i].element_size() for i in ids.tolist()], dtype=np.int64)[
                    np.searchsorted(ids, cols[side])]
            if (last > size).any() or (cols[f"{side}_off"] < 0).any():
                raise ValueError(f"a run reaches outside its {side} tensor")
        if use_triton:
            if table is not None:
                src, dst = table.ptr[cols["src"]], table.ptr[cols["dst"]]
            else:
                ptr = np.array([ends[i].data_ptr() for i in ids.tolist()], dtype=np.int64)
                src, dst = ptr[np.searchsorted(ids, cols["src"])], ptr[np.searchsorted(ids, cols["dst"])]
            self._tiles(cols, src, dst, tile_bytes)
        else:
            used = np.unique(np.concatenate([cols["src"], cols["dst"]])).tolist() if ids is None else ids.tolist()
            flat = {k: _bytes(ends[k]) for k in used}
            # as_strided counts its offset from the storage's start, not the view's
            view = lambda t, off, rows, n, stride: (t[off: off + n] if rows == 1  # noqa: E731
                                                    else t.as_strided((rows, n), (stride, 1), t.storage_offset() + off))
            self.pairs = tuple([view(flat[int(r[side])], int(r[f"{side}_off"]), int(r["rows"]), int(r["nbytes"]),
                                     int(r[f"{side}_stride"])) for r in runs] for side in ("dst", "src"))

    def _tiles(self, runs: dict[str, np.ndarray], src_ptr: np.ndarray, dst_ptr: np.ndarray, tile_bytes: int) -> None:
        """``runs``: the run table's fields; ``src_ptr``/``dst_ptr``: the address of each run's source and
        destination tensor."""
        self._base = torch.empty(16, dtype=torch.uint8, device=self.device)  # every address is an offset from here
        base = self._base.data_ptr()
        self._cut(np.stack([src_ptr + runs["src_off"] - base, dst_ptr + runs["dst_off"] - base, runs["nbytes"],
                            runs["rows"], runs["src_stride"], runs["dst_stride"]], axis=1), tile_bytes)

    @classmethod
    def of_chunks(cls, chunks: np.ndarray, rows: np.ndarray, shapes: np.ndarray, ends, tile_bytes: int = 64 << 10,
                  staging: PinnedTables | None = None) -> "CopyProgram":
        """The Triton program of whole chunks ``chunks[rows]`` (a plan's ``CHUNK_DTYPE`` records) between the
        tensors bound in ``ends`` (``sync.executor.EndTable``, one CUDA device): the tiles of
        ``CopyProgram(chunk_runs(plan, rows), table=ends)``, from one compiled pass over the chunks
        (``sync.copy_tables``) instead of array passes over their fields. ``shapes``: ``(itemsize, outer,
        inner)`` of every tensor of the plan, side by side."""
        from sync.copy_tables import chunk_tiles

        base = torch.empty(16, dtype=torch.uint8, device=ends.device)
        tiles = chunk_tiles(chunks, rows, shapes, ends.packed, base.data_ptr(), tile_bytes)
        return cls.of_tiles(base, tiles, tile_bytes, staging)

    @classmethod
    def of_tiles(cls, base: torch.Tensor, tiles: tuple, tile_bytes: int, staging: PinnedTables | None = None
                 ) -> "CopyProgram":
        """The program of ``tiles`` (what ``sync.copy_tables.chunk_tiles`` gives, addresses counted from
        ``base``'s), which may have been cut on another thread."""
        self = cls.__new__(cls)
        self.device, self.launches, self.pairs, self._staging, self._base = base.device, [], ([], []), staging, base
        tables, strided, self.nbytes, self.num_runs = tiles
        self._launch_tiles(tables, strided, tile_bytes)
        return self

    @classmethod
    def merged(cls, programs: list["CopyProgram"]) -> "CopyProgram":
        """One program copying what ``programs`` copy (Triton ones over one base, as ``of_tiles`` makes
        them), with one launch per kind of tile: their tables joined on the device. Parts built while
        copies ran (see ``sync.executor``) cost a launch each in every later sync, this one launch."""
        base = programs[0]._base
        if any(p._base is not base or p.pairs[0] for p in programs):
            raise ValueError("only Triton programs over one base merge")
        self = cls.__new__(cls)
        self.device, self.pairs, self._staging, self._base = base.device, ([], []), None, base
        self.nbytes, self.num_runs = sum(p.nbytes for p in programs), sum(p.num_runs for p in programs)
        groups: dict[tuple, list] = {}  # (kind, word, vec, block) -> the launches' (view, table, tiles)
        for p in programs:
            for kind, view, table, vec, block, tiles in p.launches:
                groups.setdefault((kind, view.dtype, vec, block), []).append((view, table, tiles))
        self.launches = [(kind, items[0][0], torch.cat([t for _, t, _ in items]) if len(items) > 1 else items[0][1],
                          vec, block, sum(n for _, _, n in items)) for (kind, _, vec, block), items in groups.items()]
        return self

    def _cut(self, runs: np.ndarray, tile_bytes: int) -> None:
        """Tiles of ``runs`` (``[runs, 6]``: source and destination from ``_base``, bytes, rows, source and
        destination stride). Rows long enough to fill tiles on their own become contiguous runs, one per row."""
        from sync.copy_tables import run_tiles

        self._launch_tiles(run_tiles(runs, tile_bytes), runs[(runs[:, 3] > 1) & (runs[:, 2] < WIDE_ROW)], tile_bytes)

    def _launch_tiles(self, tables: list[np.ndarray], strided: np.ndarray, tile_bytes: int) -> None:
        """One launch per class of contiguous tiles (``tables``, by ``CLASSES``), then the row tiles of
        ``strided`` (runs as in :meth:`_cut`)."""
        for k, table in zip(CLASSES, tables):
            if len(table):
                word, vec = _WORD[k]
                self.launches.append(("flat", self._base.view(word), self._upload(table), vec, 0, len(table)))
        if len(strided):
            self._strided(*(np.ascontiguousarray(strided[:, j]) for j in range(6)), tile_bytes)

    def _strided(self, src, dst, n, rows, s_stride, d_stride, tile_bytes: int) -> None:
        align = _align(src | dst | n | s_stride | d_stride)
        for k in CLASSES:
            m = align == k
            if not m.any():
                continue
            word, vec = _WORD[k]
            width = n[m] // k  # units per row
            cb = 1 << np.ceil(np.log2(width * vec)).astype(np.int64)  # words per row, padded to a power of two
            per_tile = np.maximum(tile_bytes // n[m], 1)  # rows per tile
            for block in np.unique(cb):
                sel = np.flatnonzero(cb == block)
                count = -(-rows[m][sel] // per_tile[sel])
                run, first = expand(count, sel)
                first = first * per_tile[run]
                ss, ds = s_stride[m][run] // k, d_stride[m][run] // k
                table = np.stack([src[m][run] // k + first * ss, dst[m][run] // k + first * ds,
                                  np.minimum(rows[m][run] - first, per_tile[run]), width[run], ss, ds], axis=1)
                self.launches.append(("rows", self._base.view(word), self._upload(table), vec, int(block), len(run)))

    def _upload(self, table: np.ndarray) -> torch.Tensor:
        if self._staging is not None and self.device.type == "cuda":
            return self._staging.upload(table)
        host = torch.from_numpy(np.ascontiguousarray(table, dtype=np.int64))
        if self.device.type != "cuda":
            return host.to(self.device)
        # from pinned memory without waiting: a program built while other copies run (the moved experts'
        # after a new placement) must not stall the host behind them. The copy is ordered before the
        # kernels that read the table on this stream, and torch keeps the pinned block until it is done.
        return host.pin_memory().to(self.device, non_blocking=True)

    def __call__(self, config=None) -> None:
        """Copy. ``config``: the Triton kernel's knobs (``sync.copy_kernel.KernelConfig``), its default if None."""
        if self.launches:
            from sync.copy_kernel import DEFAULT, copy_rows, copy_tiles

            config = config or DEFAULT
            for kind, base, table, vec, block, tiles in self.launches:
                if kind == "flat":
                    copy_tiles(base, table, vec, tiles, config)
                else:
                    copy_rows(base, table, vec, block, tiles, config)
        elif self.pairs[0]:
            torch._foreach_copy_(*self.pairs)


def expand(counts: np.ndarray, items: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Item ``i`` repeated ``counts[i]`` times: (the item of each entry, its index 0..count-1 within the item).
    ``items`` names the items (default ``0..len(counts)-1``)."""
    owner = np.repeat(np.arange(len(counts)), counts)
    index = np.arange(len(owner)) - np.repeat(np.cumsum(counts) - counts, counts)
    return (owner if items is None else np.asarray(items)[owner]), index


def _align(bits: np.ndarray) -> np.ndarray:
    """The widest unit (of 16, 8, 4, 2, 1 bytes) that divides every value: its lowest set bit."""
    return np.minimum(bits & -bits, 16)
