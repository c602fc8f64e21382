"""Copy programs' tables, compiled (numba): from chunk records (or byte runs) to tiles in one pass.

After a new expert placement the first sync programs every moved expert chunk again (about 46,000 in
the DeepSeek-V3-like colocated case) while the GPU waits for them. With numpy, ``chunk_runs`` and the
tile cutting took ~18 ms of host time there: tens of array passes, each over the packed chunk records'
strided fields. Here one loop reads each chunk once, merges the runs that continue each other and
cuts the contiguous ones into tiles as it goes. The tiles are those of ``CopyProgram(chunk_runs(plan,
rows))`` (tests hold them equal), class by class, though not in the same order within a class.

Compiled on first use and cached on disk by numba (``cache=True``).
"""

from __future__ import annotations

import numba
import numpy as np

from sync.copier import CLASSES, WIDE_ROW

__all__ = ["chunk_tiles", "run_tiles", "chunk_columns", "COLUMNS"]

# the failures, by code: the message says which end and what to fix
_ERRORS = {1: "runs reach ends {} the program was not given", 2: "a run reaches outside its {} tensor"}


@numba.njit(cache=True, nogil=True, inline="always")
def _class_slot(bits):
    """The position in ``CLASSES`` of the widest unit dividing ``bits``: its lowest set bit, at most 16."""
    low = bits & -bits
    return 0 if low >= 16 else 1 if low == 8 else 2 if low == 4 else 3 if low == 2 else 4


@numba.njit(cache=True, nogil=True, inline="always")
def _emit(src, dst, n, tile_bytes, tiles, slots, count):
    """Append the tiles of one contiguous piece (``n`` bytes from ``src`` to ``dst``) to ``tiles`` (in
    units of its class) and their classes to ``slots``, growing both when full. Returns them and the count."""
    slot = _class_slot(src | dst | n)
    k = CLASSES[slot]
    tile = max(tile_bytes // k, 1)
    units = n // k
    pieces = (units + tile - 1) // tile
    if count + pieces > len(tiles):
        size = max(2 * len(tiles), count + pieces)
        grown, grown_slots = np.empty((size, 3), dtype=np.int64), np.empty(size, dtype=np.int8)
        grown[:count], grown_slots[:count] = tiles[:count], slots[:count]
        tiles, slots = grown, grown_slots
    for j in range(pieces):
        tiles[count + j, 0] = src // k + j * tile
        tiles[count + j, 1] = dst // k + j * tile
        tiles[count + j, 2] = min(units - j * tile, tile)
        slots[count + j] = slot
    return tiles, slots, count + pieces


@numba.njit(cache=True, nogil=True)
def _by_class(tiles, slots, count):
    """The first ``count`` tiles grouped by class (a counting sort, stable), and where each class starts."""
    starts = np.zeros(len(CLASSES) + 1, dtype=np.int64)
    for i in range(count):
        starts[slots[i] + 1] += 1
    for s in range(len(CLASSES)):
        starts[s + 1] += starts[s]
    if starts[1] == count:  # one class (16 bytes, as a rule): already in order
        return tiles[:count], starts
    out = np.empty((count, 3), dtype=np.int64)
    at = starts[:-1].copy()
    for i in range(count):
        out[at[slots[i]]] = tiles[i]
        at[slots[i]] += 1
    return out, starts


@numba.njit(cache=True, nogil=True)
def _failed(strided, code, which):
    return (np.empty((0, 3), dtype=np.int64), np.zeros(len(CLASSES) + 1, dtype=np.int64), strided[:0], code,
            np.array([which, 0], dtype=np.int64))


@numba.njit(cache=True, nogil=True)
def _chunk_tiles(chunks, rows, shapes, ends, base, tile_bytes, wide_row):
    """See :func:`chunk_tiles`. ``shapes [tensors, 3]``: (itemsize, outer, inner); ``ends [locals, 2]``:
    (address, bytes). Returns (tiles, class starts, strided runs, error code, (bytes, runs) or, on an
    error, (the id or side at fault, 0))."""
    tiles = np.empty((max(2 * len(rows), 16), 3), dtype=np.int64)
    slots = np.empty(len(tiles), dtype=np.int8)
    strided = np.empty((len(rows), 6), dtype=np.int64)
    count, n_strided, payload, runs = 0, 0, 0, 0
    open_run = False  # a contiguous run not yet cut: the next chunk may continue it
    run_src = run_dst = run_n = run_src_local = run_dst_local = 0
    for i in rows:
        c = chunks[i]
        t = c["tensor"]
        k, outer, inner = shapes[t, 0], shapes[t, 1], shapes[t, 2]
        row_bytes = (np.int64(c["hi"]) - np.int64(c["lo"])) * inner * k
        src_first = (np.int64(c["src_base"]) + np.int64(c["src_off"]) * inner) * k
        dst_first = (np.int64(c["dst_base"]) + np.int64(c["dst_off"]) * inner) * k
        src_stride, dst_stride = np.int64(c["src_dim"]) * inner * k, np.int64(c["dst_dim"]) * inner * k
        if outer == 1 or (src_stride == row_bytes and dst_stride == row_bytes):  # rows that touch: one run
            nbytes, nrows = row_bytes * outer, np.int64(1)
        else:
            nbytes, nrows = row_bytes, outer
        if nbytes <= 0:
            continue
        src_local, dst_local = np.int64(c["src_local"]), np.int64(c["dst_local"])
        if src_local < 0 or src_local >= len(ends) or ends[src_local, 1] < 0:
            return _failed(strided, 1, src_local)
        if dst_local < 0 or dst_local >= len(ends) or ends[dst_local, 1] < 0:
            return _failed(strided, 1, dst_local)
        last = (nrows - 1) if nrows > 1 else 0
        if src_first < 0 or src_first + last * src_stride + nbytes > ends[src_local, 1]:
            return _failed(strided, 2, 0)
        if dst_first < 0 or dst_first + last * dst_stride + nbytes > ends[dst_local, 1]:
            return _failed(strided, 2, 1)
        src_at, dst_at = ends[src_local, 0] + src_first - base, ends[dst_local, 0] + dst_first - base
        payload += nbytes * nrows
        if nrows == 1 and open_run and src_local == run_src_local and dst_local == run_dst_local \
                and run_src + run_n == src_at and run_dst + run_n == dst_at:
            run_n += nbytes  # continues the open run at both ends: one run
            continue
        if open_run:
            tiles, slots, count = _emit(run_src, run_dst, run_n, tile_bytes, tiles, slots, count)
            open_run = False
        runs += 1
        if nrows == 1:
            open_run = True
            run_src, run_dst, run_n, run_src_local, run_dst_local = src_at, dst_at, nbytes, src_local, dst_local
        elif nbytes >= wide_row:  # rows long enough to fill tiles on their own: contiguous pieces, one a row
            for r in range(nrows):
                tiles, slots, count = _emit(src_at + r * src_stride, dst_at + r * dst_stride, nbytes, tile_bytes,
                                            tiles, slots, count)
        else:
            strided[n_strided, 0], strided[n_strided, 1], strided[n_strided, 2] = src_at, dst_at, nbytes
            strided[n_strided, 3], strided[n_strided, 4], strided[n_strided, 5] = nrows, src_stride, dst_stride
            n_strided += 1
    if open_run:
        tiles, slots, count = _emit(run_src, run_dst, run_n, tile_bytes, tiles, slots, count)
    table, starts = _by_class(tiles, slots, count)
    summary = np.array([payload, runs], dtype=np.int64)
    return table, starts, strided[:n_strided], 0, summary


def chunk_tiles(chunks: np.ndarray, rows: np.ndarray, shapes: np.ndarray, ends: np.ndarray, base: int,
                tile_bytes: int) -> tuple[list[np.ndarray], np.ndarray, int, int]:
    """The copy tiles of whole chunks ``chunks[rows]`` (``CHUNK_DTYPE``): for each class of ``CLASSES``,
    ``[tiles, 3]`` = (source, destination, length) in units of its bytes, at most ``tile_bytes`` a tile,
    addresses counted from ``base``; the strided runs whose rows are shorter than ``WIDE_ROW``
    (``[runs, 6]``: source, destination, bytes, rows, strides), for the copier's row tiles; the bytes
    copied; the number of runs. ``shapes``: ``(itemsize, outer, inner)`` by tensor; ``ends``: (address,
    bytes) by local id, bytes -1 where not bound. Raises ValueError as ``CopyProgram`` does for a run
    outside its tensor or at an end not bound."""
    table, starts, strided, error, which = _chunk_tiles(chunks, np.asarray(rows, dtype=np.int64), shapes, ends,
                                                        np.int64(base), np.int64(tile_bytes), np.int64(WIDE_ROW))
    if error == 1:
        raise ValueError(_ERRORS[1].format([int(which[0])]))
    if error == 2:
        raise ValueError(_ERRORS[2].format(("src", "dst")[int(which[0])]))
    return [table[starts[s]: starts[s + 1]] for s in range(len(CLASSES))], strided, int(which[0]), int(which[1])


@numba.njit(cache=True, nogil=True)
def _run_tiles(runs, tile_bytes, wide_row):
    tiles = np.empty((max(2 * len(runs), 16), 3), dtype=np.int64)
    slots = np.empty(len(tiles), dtype=np.int8)
    count = 0
    for i in range(len(runs)):
        nrows, n = runs[i, 3], runs[i, 2]
        if nrows == 1 or n >= wide_row:
            for r in range(nrows):
                tiles, slots, count = _emit(runs[i, 0] + r * runs[i, 4], runs[i, 1] + r * runs[i, 5], n, tile_bytes,
                                            tiles, slots, count)
    return _by_class(tiles, slots, count)


def run_tiles(runs: np.ndarray, tile_bytes: int) -> list[np.ndarray]:
    """The tiles of the contiguous pieces of ``runs`` (``[runs, 6]``: source, destination from the base,
    bytes, rows, source and destination stride) -- the contiguous runs and each row of the strided runs
    whose rows are at least ``WIDE_ROW`` -- for each class of ``CLASSES``, as :func:`chunk_tiles` gives them."""
    table, starts = _run_tiles(np.ascontiguousarray(runs, dtype=np.int64), np.int64(tile_bytes), np.int64(WIDE_ROW))
    return [table[starts[s]: starts[s + 1]] for s in range(len(CLASSES))]


@numba.njit(cache=True, nogil=True)
def _columns(chunks, expert, stage, src, dst, tensor, src_local, dst_local, moving):
    for i in range(len(chunks)):
        c = chunks[i]
        stage[i], src[i], dst[i], tensor[i] = c["stage"], c["src"], c["dst"], c["tensor"]
        src_local[i], dst_local[i] = c["src_local"], c["dst_local"]
        moving[i] = expert[c["tensor"]] >= 0


COLUMNS = ("stage", "src", "dst", "tensor", "src_local", "dst_local")


def chunk_columns(chunks: np.ndarray, expert: np.ndarray) -> dict[str, np.ndarray]:
    """The chunk records' ``COLUMNS`` as contiguous arrays, and ``moving``: whether the chunk's tensor is a
    routed expert's (``expert``: the expert of every tensor, -1 for none), in one pass: each field read
    from the packed records on its own is a pass over the whole table (about 0.5 ms each for 60,000)."""
    out = {name: np.empty(len(chunks), dtype=chunks.dtype[name]) for name in COLUMNS}
    out["moving"] = np.empty(len(chunks), dtype=np.bool_)
    if len(chunks):
        _columns(chunks, np.asarray(expert), *(out[name] for name in COLUMNS), out["moving"])
    return out
