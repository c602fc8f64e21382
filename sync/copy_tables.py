"""Copy programs' tables, compiled (numba): chunk rows to byte runs, and runs to tiles, in single passes.

After a new expert placement the first sync programs every moved expert chunk again (about 46,000 in
the DeepSeek-V3-like colocated case) while the GPU waits. Done with numpy, ``chunk_runs`` and the
tile cutting took ~18 ms of host time there (tens of array passes over strided record fields); these
loops take well under one. They compute what ``planners.schedule.runs.chunk_runs`` and
``sync.copier`` define -- tests hold them to those tables exactly -- and add the ends' addresses.

Compiled on first use and cached on disk by numba (``cache=True``); ``warm`` compiles them ahead.
"""

from __future__ import annotations

import numba
import numpy as np

from sync.copier import CLASSES, WIDE_ROW

__all__ = ["chunk_runs_at", "chunk_columns", "flat_tiles", "warm"]

# chunk_runs_at's failures, by code: the message says which end and what to fix
_ERRORS = {1: "runs reach ends {} the program was not given", 2: "a run reaches outside its {} tensor"}


@numba.njit(cache=True, nogil=True)
def _runs(chunks, rows, itemsize, outer, inner, ptr, size, base, out):
    """Runs of whole chunks ``chunks[rows]``, merged where one continues the last at both ends, as
    ``out[:, 0:6]`` = (source, destination as byte offsets from ``base``, bytes, rows, source stride,
    destination stride); ``out[:, 6:8]`` = (source, destination local id). Returns (runs, error code,
    the local id or side at fault)."""
    count = 0
    for i in rows:
        c = chunks[i]
        t = c["tensor"]
        k, o, n = np.int64(itemsize[t]), np.int64(outer[t]), np.int64(inner[t])
        row_bytes = (np.int64(c["hi"]) - np.int64(c["lo"])) * n * k
        src_first = (np.int64(c["src_base"]) + np.int64(c["src_off"]) * n) * k
        dst_first = (np.int64(c["dst_base"]) + np.int64(c["dst_off"]) * n) * k
        src_stride = np.int64(c["src_dim"]) * n * k
        dst_stride = np.int64(c["dst_dim"]) * n * k
        if o == 1 or (src_stride == row_bytes and dst_stride == row_bytes):  # rows that touch: one run
            nbytes, nrows = row_bytes * o, np.int64(1)
            src_stride = dst_stride = nbytes
        else:
            nbytes, nrows = row_bytes, o
        if nbytes <= 0:
            continue
        src, dst = np.int64(c["src_local"]), np.int64(c["dst_local"])
        if src < 0 or src >= len(size) or size[src] < 0:
            return count, 1, src
        if dst < 0 or dst >= len(size) or size[dst] < 0:
            return count, 1, dst
        if src_first < 0 or src_first + (nrows - 1) * src_stride + nbytes > size[src]:
            return count, 2, 0
        if dst_first < 0 or dst_first + (nrows - 1) * dst_stride + nbytes > size[dst]:
            return count, 2, 1
        src_at, dst_at = ptr[src] + src_first - base, ptr[dst] + dst_first - base
        if count and nrows == 1 and out[count - 1, 3] == 1 and out[count - 1, 6] == src and out[count - 1, 7] == dst \
                and out[count - 1, 0] + out[count - 1, 2] == src_at and out[count - 1, 1] + out[count - 1, 2] == dst_at:
            out[count - 1, 2] += nbytes
            out[count - 1, 4] = out[count - 1, 5] = out[count - 1, 2]
            continue
        out[count, 0], out[count, 1], out[count, 2], out[count, 3] = src_at, dst_at, nbytes, nrows
        out[count, 4], out[count, 5], out[count, 6], out[count, 7] = src_stride, dst_stride, src, dst
        count += 1
    return count, 0, 0


def chunk_runs_at(chunks: np.ndarray, rows: np.ndarray, table, ends, base: int) -> np.ndarray:
    """The merged runs of whole chunks ``chunks[rows]`` (``CHUNK_DTYPE``) as ``[runs, 6]`` int64: source
    and destination as byte offsets from address ``base``, bytes, rows, source and destination stride.
    ``table``: the plan's tensor table (``itemsize``, ``outer``, ``inner`` by tensor); ``ends``: the
    bound tensors' addresses and sizes by local id (``sync.executor.EndTable``). A run outside its
    tensor, or at an end not bound, raises ValueError as ``CopyProgram`` does."""
    out = np.empty((len(rows), 8), dtype=np.int64)
    count, error, which = _runs(chunks, np.asarray(rows, dtype=np.int64), table.itemsize, table.outer, table.inner,
                                ends.ptr, ends.nbytes, np.int64(base), out)
    if error == 1:
        raise ValueError(_ERRORS[1].format([int(which)]))
    if error == 2:
        raise ValueError(_ERRORS[2].format(("src", "dst")[which]))
    return out[:count, :6]


@numba.njit(cache=True, nogil=True)
def _class_slot(bits):
    """The position in ``CLASSES`` of the widest unit dividing ``bits``: its lowest set bit, at most 16."""
    low = bits & -bits
    return 0 if low >= 16 else 1 if low == 8 else 2 if low == 4 else 3 if low == 2 else 4


@numba.njit(cache=True, nogil=True)
def _flat_tiles(runs, tile_bytes, wide_row):
    """Counts the tiles of every class, then writes them, class after class, into one table."""
    counts = np.zeros(len(CLASSES), dtype=np.int64)
    starts = np.zeros(len(CLASSES) + 1, dtype=np.int64)
    table = np.empty((0, 3), dtype=np.int64)
    for phase in range(2):
        if phase == 1:
            starts[1:] = np.cumsum(counts)
            table = np.empty((starts[-1], 3), dtype=np.int64)
            counts[:] = starts[:-1]  # from here on: where each class's next tile goes
        for wide in (False, True):  # the contiguous runs first, then the rows of wide strided runs
            for i in range(runs.shape[0]):
                nrows, n = runs[i, 3], runs[i, 2]
                if (wide and not (nrows > 1 and n >= wide_row)) or (not wide and nrows != 1):
                    continue
                for r in range(nrows):
                    src, dst = runs[i, 0] + r * runs[i, 4], runs[i, 1] + r * runs[i, 5]
                    slot = _class_slot(src | dst | n)
                    k = CLASSES[slot]
                    tile = max(tile_bytes // k, 1)
                    units = n // k
                    tiles = (units + tile - 1) // tile
                    if phase == 0:
                        counts[slot] += tiles
                        continue
                    at = counts[slot]
                    for j in range(tiles):
                        table[at + j, 0] = src // k + j * tile
                        table[at + j, 1] = dst // k + j * tile
                        table[at + j, 2] = min(units - j * tile, tile)
                    counts[slot] += tiles
    return table, starts


def flat_tiles(runs: np.ndarray, tile_bytes: int, wide_row: int = WIDE_ROW) -> list[np.ndarray]:
    """The tiles of ``runs`` (``[runs, 6]`` as :func:`chunk_runs_at` gives) that are contiguous -- the
    contiguous runs, then each row of the strided runs whose rows are at least ``wide_row`` bytes -- for
    each alignment class of ``CLASSES`` in turn: ``[tiles, 3]`` = (source, destination, length) in units
    of that class's bytes, at most ``tile_bytes`` a tile."""
    table, starts = _flat_tiles(np.ascontiguousarray(runs, dtype=np.int64), np.int64(tile_bytes), np.int64(wide_row))
    return [table[starts[i]: starts[i + 1]] for i in range(len(CLASSES))]


@numba.njit(cache=True, nogil=True)
def _columns(chunks, stage, src, dst, tensor, src_local, dst_local):
    for i in range(len(chunks)):
        c = chunks[i]
        stage[i], src[i], dst[i], tensor[i] = c["stage"], c["src"], c["dst"], c["tensor"]
        src_local[i], dst_local[i] = c["src_local"], c["dst_local"]


COLUMNS = ("stage", "src", "dst", "tensor", "src_local", "dst_local")


def chunk_columns(chunks: np.ndarray) -> dict[str, np.ndarray]:
    """The chunk records' ``COLUMNS`` as contiguous arrays, in one pass: each field read from the packed
    records on its own is a pass over the whole table (about 0.5 ms each for 60,000 chunks)."""
    out = {name: np.empty(len(chunks), dtype=chunks.dtype[name]) for name in COLUMNS}
    if len(chunks):
        _columns(chunks, *(out[name] for name in COLUMNS))
    return out


def warm() -> None:
    """Compile (or load from numba's cache) both passes now, on a tiny input."""
    from planners.plan import CHUNK_DTYPE

    class _Table:
        itemsize = outer = inner = np.ones(1, dtype=np.int64)
        ptr, nbytes = np.zeros(1, dtype=np.int64), np.full(1, 16, dtype=np.int64)

    chunks = np.zeros(1, dtype=CHUNK_DTYPE)
    chunks["hi"] = 1
    flat_tiles(chunk_runs_at(chunks, np.zeros(1, dtype=np.int64), _Table, _Table, 0), 64)
