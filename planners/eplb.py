"""Expert-parallel load balancing: replicate hot experts into redundant slots and pack slots onto GPUs.

``rebalance(load [L, E], num_physical, num_groups, num_nodes, num_gpus, policy)`` returns a
:class:`~planners.placement.Placement` (``phy2log [L, P]``; GPU g owns slots ``[g*P/G, (g+1)*P/G)``).

Policies:

* ``"deepseek"`` -- DeepSeek's EPLB. Hierarchical when ``num_groups % num_nodes == 0``: pack expert
  groups onto nodes (greedy, equal counts), replicate hot experts inside each node (largest load per
  replica first), pack each node's replicas onto its GPUs (greedy, equal counts). Otherwise the same
  with one group and one node (global). Vectorized across layers.
* ``"default"`` -- the same pipeline with each greedy packing refined by load-reducing swaps out of the
  heaviest pack (groups between nodes, replicas between the GPUs of a node, never putting two replicas
  of one expert on one GPU); per layer it keeps whichever of this and ``deepseek`` has the lower
  maximum GPU load, so it is never worse.

A token routed to a logical expert is served by one of its replicas, so a replica carries
``load[e] / logcnt[e]`` and a GPU the sum over its slots.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np

from planners.placement import Placement

__all__ = ["rebalance", "EplbError", "gpu_loads", "BalanceReport", "balance_report", "POLICIES"]

POLICIES = ("default", "deepseek")


class EplbError(ValueError):
    """Arguments a placement cannot be computed for; the message names the argument."""


# -- building blocks (all [X, n] -> [X, n], X = independent rows, e.g. layers) -----------------

def pack_greedy(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy balanced packing with equal item counts per pack.

    Items go heaviest first to the lightest pack that still has room (lowest index on ties).
    Returns ``pack [X, n]`` and ``rank_in_pack [X, n]``. One step per item, vectorized over rows.
    """
    X, n = weight.shape
    per_pack = n // num_packs
    if per_pack == 1:
        return np.tile(np.arange(n), (X, 1)), np.zeros((X, n), dtype=np.int64)
    order = np.argsort(-weight, axis=1, kind="stable")
    w_sorted = _take(weight, order).T.copy()  # [n, X]: one contiguous row per step
    base = np.arange(X) * num_packs
    load = np.zeros(X * num_packs)  # flat [X, packs]; a full pack's load is set to +inf
    count = np.zeros(X * num_packs, dtype=np.int64)
    load2d = load.reshape(X, num_packs)
    pack_sorted = np.empty((n, X), dtype=np.int64)
    rank_sorted = np.empty((n, X), dtype=np.int64)
    for step in range(n):
        idx = load2d.argmin(axis=1) + base
        load[idx] += w_sorted[step]
        c = count[idx]
        rank_sorted[step] = c
        count[idx] = c + 1
        pack_sorted[step] = idx - base
        full = idx[c + 1 == per_pack]
        if len(full):
            load[full] = np.inf
    pack = np.empty((X, n), dtype=np.int64)
    rank = np.empty((X, n), dtype=np.int64)
    rows = np.arange(X)[:, None]
    pack[rows, order] = pack_sorted.T
    rank[rows, order] = rank_sorted.T
    return pack, rank


def replicate(weight: np.ndarray, num_slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Give each extra slot to the expert with the largest load per replica.

    Returns ``slot2item [X, num_slots]`` (the first n slots are the items themselves),
    ``replica_rank [X, num_slots]`` and ``count [X, n]``.
    """
    X, n = weight.shape
    rows = np.arange(X)
    slot2item = np.tile(np.arange(num_slots), (X, 1))
    replica_rank = np.zeros((X, num_slots), dtype=np.int64)
    count = np.ones((X, n), dtype=np.int64)
    per_replica = weight.astype(np.float64, copy=True)
    for slot in range(n, num_slots):
        item = per_replica.argmax(axis=1)
        slot2item[:, slot] = item
        c = count[rows, item]
        replica_rank[:, slot] = c
        count[rows, item] = c + 1
        per_replica[rows, item] = weight[rows, item] / (c + 1)
    return slot2item, replica_rank, count


def refine_swaps(weight: np.ndarray, ids: np.ndarray | None = None, max_rounds: int | None = None) -> np.ndarray:
    """Improve packs ``weight [X, m, k]`` (m packs of k items) by swapping one item of the heaviest
    pack with one of the lightest whenever that lowers the heavier of the two, as much as possible.

    With ``ids`` (same shape), a swap may not put two items of one id into one pack. Returns the
    permutation ``[X, m*k]``: new flat position -> old flat position. Deterministic.
    """
    X, m, k = weight.shape
    w = weight.copy()
    perm = np.tile(np.arange(m * k).reshape(m, k), (X, 1, 1))
    ids = None if ids is None else ids.copy()
    rows = np.arange(X)
    active = np.ones(X, dtype=bool)
    for _ in range(max_rounds or 2 * m):
        load = w.sum(axis=2)  # [X, m]
        h, lo = load.argmax(axis=1), load.argmin(axis=1)
        gap = (load[rows, h] - load[rows, lo])[:, None, None]
        delta = w[rows, h][:, :, None] - w[rows, lo][:, None, :]  # [X, k_h, k_l]: moved from h to lo
        ok = (delta > 0) & (delta < gap * (1 - 1e-12)) & active[:, None, None]
        if ids is not None:
            ih, il = ids[rows, h], ids[rows, lo]
            lo_has = (il[:, None, :] == ih[:, :, None]).any(axis=2)  # [X, k_h]: lightest already holds it
            h_has = (ih[:, None, :] == il[:, :, None]).any(axis=2)  # [X, k_l]
            ok &= ~lo_has[:, :, None] & ~h_has[:, None, :]
        score = np.where(ok, np.abs(gap - 2 * delta), np.inf).reshape(X, -1)  # best: halves the gap
        best = score.argmin(axis=1)
        go = np.isfinite(score[rows, best])
        if not go.any():
            break
        active &= go
        r = rows[go]
        a, b = np.unravel_index(best[go], (k, k))
        hh, ll = h[go], lo[go]
        for arr in (w, perm) + ((ids,) if ids is not None else ()):
            tmp = arr[r, hh, a].copy()
            arr[r, hh, a] = arr[r, ll, b]
            arr[r, ll, b] = tmp
    return perm.reshape(X, m * k)


def _take(a: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """``a[x, idx[x, j]]`` for every row x (take_along_axis on axis 1, without its overhead)."""
    return a[np.arange(a.shape[0])[:, None], idx]


def _inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    inv[np.arange(perm.shape[0])[:, None], perm] = np.arange(perm.shape[1])
    return inv


# -- DeepSeek's policy without stepping through items one layer at a time --------------------
#
# Greedy balanced packing is sequential per row, so rows (layers, or layer x node) step together:
# each pack's load is an int64 key (load << 24 | items << 16 | flat pack index), one min-reduction
# finds every row's lightest pack, one scatter-add places the item. While every pack's turn comes
# in load order, a whole round of m items goes at once. Rows are then certified against float
# arithmetic (or checked exactly) and the rare row that fails is redone by the plain steps above.

_I64 = np.int64
_POSMAX = _I64(0x7FF0000000000000)  # bits of +inf: above the bits of every finite non-negative double
_KEYS_OK = sys.byteorder == "little"  # keys are read through byte views
_SHIFT = 24
_UNITS = float(2 ** 38 - 2)  # a row's total load in integer units
_FULL = _I64(1) << 62  # a full pack's key


def _desc_keys(values: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Row-wise sort keys of ``values [X, n] >= 0``: heaviest first, lower index first on ties.

    Returns the sorted keys (index in the low ``ib`` bits), ``ib``, and the rows where two neighbours
    agree in every key bit above the index (a tie, or values too close for the key to order)."""
    X, n = values.shape
    ib = max(int(n - 1).bit_length(), 1)
    keys = _POSMAX - values.view(_I64)
    keys >>= ib
    keys <<= ib
    keys |= np.arange(n, dtype=_I64)
    keys.sort(axis=1)
    flat = keys.ravel()
    close = np.empty(X * n, dtype=bool)
    np.less(flat[1:] ^ flat[:-1], 1 << ib, out=close[:-1])
    close[n - 1::n] = False  # across rows
    return keys, ib, close.reshape(X, n).any(axis=1)


def _replica_counts(weight: np.ndarray, num_slots: int) -> np.ndarray:
    """Replica counts ``[X, n]`` (float) of :func:`replicate`: each extra slot to the largest load
    per replica, lower index on ties. Vectorized over rows, one step per extra slot."""
    X, n = weight.shape
    count = np.ones(X * n)
    if num_slots == n:
        return count.reshape(X, n)
    per = weight.astype(np.float64, copy=True)
    perf, wf = per.ravel(), weight.ravel()
    base = np.arange(0, X * n, n)
    f = np.empty(X, dtype=np.intp)
    for _ in range(num_slots - n):
        np.add(per.argmax(axis=1), base, out=f)
        c = count[f]
        c += 1
        count[f] = c
        perf[f] = wf[f] / c
    return count.reshape(X, n)


def _pack_sorted(ws: np.ndarray, num_packs: int) -> np.ndarray:
    """Slot position (pack * n/m + rank in pack) of each item under :func:`pack_greedy`, for items
    already sorted heaviest first (``ws [X, n]``; lower index first among equal weights), at least
    two items per pack."""
    X, n = ws.shape
    m = num_packs
    k = n // m
    if m == 1:
        return np.broadcast_to(np.arange(n, dtype=_I64), (X, n))
    if m * X > 1 << 16 or k > 250 or not _KEYS_OK:
        pack, rank = pack_greedy(ws, m)
        return pack * k + rank
    total = ws.sum(axis=1)
    scale = _UNITS / np.where(total > 0, total, 1.0)
    XL = np.ascontiguousarray((ws * scale[:, None]).astype(_I64).T)  # [n, X] integer loads
    XI = (XL << _SHIFT) + (1 << 16)  # adds an item's load and counts it
    fidx = np.arange(m, dtype=_I64)[:, None] * X + np.arange(X, dtype=_I64)
    K = np.empty(m * X, dtype=_I64)
    K2 = K.reshape(m, X)
    np.add(XI[:m], fidx, out=K2)  # first round: item p to pack p
    rec = np.empty((n, X), dtype=_I64)  # key of the pack each item went to, before it
    rec[:m] = fidx
    idx = rec.view(np.uint16).reshape(n, X, 4)[:, :, 0]
    cnt = rec.view(np.uint8).reshape(n, X, 8)[:, :, 2]
    j = m
    if m >= 8:  # whole rounds, while each pack's turn comes in load order (the last round always)
        moved = False
        while j < n:
            Ks = np.sort(K2, axis=0)
            if j + m < n:
                A = Ks >> _SHIFT
                thr = np.minimum.accumulate(A + XL[j:j + m], axis=0)
                if not (A[1:] < thr[:-1]).all():
                    break
            rec[j:j + m] = Ks
            np.add(Ks, XI[j:j + m], out=K2)
            moved = True
            j += m
        if moved and j < n:  # rounds leave keys sorted: back to their own index
            Kc = K.copy()
            K[Kc.view(np.uint16)[::4]] = Kc
    if j < n:
        XF = XI + _FULL  # the item that fills a pack closes it
        fills = np.empty(X, dtype=bool)
        kcnt = K.view(np.uint8)[2::8]
        guarded = False
        while j < n:
            if not guarded:  # no pack can fill within the next few items: skip the check
                step = min(4, n - j)
                guarded = int(kcnt.max()) + step >= k
            else:
                step = n - j
            for i in range(j, j + step):
                np.minimum.reduce(K2, axis=0, out=rec[i])
                if guarded:
                    np.equal(cnt[i], k - 1, out=fills)
                    np.add.at(K, idx[i], np.where(fills, XF[i], XI[i]))
                else:
                    np.add.at(K, idx[i], XI[i])
            j += step
    pos = ((np.arange(m * X, dtype=_I64) // X * k).take(idx) + cnt).T  # [X, n]
    # certify rows: successive start loads equal (same items) or apart by more than the rounding of
    # the items summed; check the others exactly; redo the rare row that fails
    S = rec[m:] >> _SHIFT
    D = S[1:] - S[:-1]
    unsure = ((D > 0) & (D < 2 * k + 2)).any(axis=0) | (ws[:, m - 1] <= 0)
    if unsure.any():
        rows = np.flatnonzero(unsure)
        redo = rows[~_is_greedy(ws[rows], pos[rows], m)]
        if len(redo):
            pos = pos.copy()
            pack, rank = pack_greedy(ws[redo], m)
            pos[redo] = pack * k + rank
    return pos


def _is_greedy(ws: np.ndarray, pos: np.ndarray, num_packs: int) -> np.ndarray:
    """Rows where slot positions ``pos`` are the greedy packing of the sorted items ``ws``: every
    item starts on the lightest pack left (float loads summed in item order, as the greedy sums
    them), the lower pack on ties."""
    X, n = ws.shape
    k = n // num_packs
    flat = pos + np.arange(0, X * n, n)[:, None]
    Y = np.empty(X * n)
    Y[flat] = ws
    Y = Y.reshape(X * num_packs, k)
    start = np.zeros((X * num_packs, k))
    np.cumsum(Y[:, :-1], axis=1, out=start[:, 1:])
    G = start.ravel()[flat]
    d = G[:, 1:] - G[:, :-1]
    return ~((d < 0) | ((d == 0) & (pos[:, 1:] < pos[:, :-1]))).any(axis=1)


def _deepseek_rows(rows_load: np.ndarray, slots: int, packs: int) -> np.ndarray:
    """DeepSeek's replicate-then-pack for independent rows (a node's experts, local ids):
    ``[X, slots]`` expert per slot, ``packs`` packs of ``slots / packs`` slots."""
    X, n = rows_load.shape
    k = slots // packs
    if k == 1:  # one slot per pack: the slots stay in the order replicas were made
        return _deepseek_rows_steps(rows_load, slots, packs)
    count = _replica_counts(rows_load, slots)
    per_replica = rows_load / count
    keys, ib, close = _desc_keys(per_replica)  # equal loads per replica of two experts: redo the row
    base = np.arange(0, X * n, n)[:, None]
    order = (keys & _I64((1 << ib) - 1)) + base
    reps = count.ravel().take(order).astype(np.intp).ravel()
    item = np.repeat(order.ravel(), reps).reshape(X, slots)  # flat (row, expert) of each replica
    pos = _pack_sorted(per_replica.ravel().take(item), packs)
    out = np.empty(X * slots, dtype=_I64)
    out[pos + np.arange(0, X * slots, slots)[:, None]] = item
    out = out.reshape(X, slots) - base
    if close.any():
        bad = np.flatnonzero(close)
        out[bad] = _deepseek_rows_steps(rows_load[bad], slots, packs)
    return out


def _deepseek_rows_steps(rows_load: np.ndarray, slots: int, packs: int) -> np.ndarray:
    slot2item, _, count = replicate(rows_load, slots)
    pack, rank = pack_greedy(_take(rows_load / count, slot2item), packs)
    return _take(slot2item, _inverse(pack * (slots // packs) + rank))


def _group_order(load: np.ndarray, num_groups: int, num_nodes: int) -> np.ndarray | None:
    """``[L, E]`` logical expert in node-major order (node n holds positions [n*E/N, (n+1)*E/N)),
    groups packed onto nodes by DeepSeek's greedy; None when that is the identity."""
    L, E = load.shape
    if num_groups == num_nodes:
        return None  # one group per node: group g on node g
    gs = E // num_groups
    per_node = num_groups // num_nodes
    group_load = load.reshape(L, num_groups, gs).sum(axis=2)
    keys, ib, close = _desc_keys(group_load)
    order = keys & _I64((1 << ib) - 1)
    r = np.arange(L)[:, None]
    slot_group = np.empty((L, num_groups), dtype=_I64)
    slot_group[r, _pack_sorted(group_load[r, order], num_nodes)] = order
    if close.any():
        bad = np.flatnonzero(close)
        node, rank = pack_greedy(group_load[bad], num_nodes)
        slot_group[bad] = _inverse(node * per_node + rank)
    return ((slot_group * gs)[:, :, None] + np.arange(gs)).reshape(L, E)


def _deepseek(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """phy2log ``[L, P]`` of DeepSeek's hierarchical policy (global: one group, one node)."""
    L, E = load.shape
    nm2log = _group_order(load, num_groups, num_nodes)
    node_load = (load if nm2log is None else _take(load, nm2log)).reshape(L * num_nodes, E // num_nodes)
    out = _deepseek_rows(node_load, num_physical // num_nodes, num_gpus // num_nodes)
    if num_nodes > 1:
        out = out.reshape(L, num_nodes, -1) + (np.arange(num_nodes) * (E // num_nodes))[None, :, None]
    out = out.reshape(L, num_physical)
    return out if nm2log is None else _take(nm2log, out)


# -- the hierarchical pipeline -------------------------------------------------------------

def _hierarchical(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int,
                  refine: bool) -> np.ndarray:
    """phy2log [L, P] of the hierarchical policy (optionally with swap refinement)."""
    L, E = load.shape
    group_size = E // num_groups
    groups_per_node = num_groups // num_nodes
    gpus_per_node = num_gpus // num_nodes
    slots_per_gpu = num_physical // num_gpus
    experts_per_node = E // num_nodes

    # 1. expert groups -> nodes (equal group counts per node)
    group_load = load.reshape(L, num_groups, group_size).sum(axis=2)  # [L, groups]
    node, rank = pack_greedy(group_load, num_nodes)
    group_pos = node * groups_per_node + rank  # [L, groups] position in node-major order
    if refine and num_nodes > 1:
        by_pos = _take(group_load, _inverse(group_pos))
        moved = refine_swaps(by_pos.reshape(L, num_nodes, groups_per_node))  # new pos -> old pos
        group_pos = _inverse(_take(_inverse(group_pos), moved))
    # logical expert -> "node-major" expert id, and back
    log2nm = (group_pos * group_size)[:, :, None] + np.arange(group_size)
    log2nm = log2nm.reshape(L, E)
    nm2log = _inverse(log2nm)

    # 2. replicate inside each node: rows are (layer, node)
    node_load = _take(load, nm2log).reshape(L * num_nodes, experts_per_node)
    slot2nm, _, count = replicate(node_load, num_physical // num_nodes)

    # 3. a node's replicas -> its GPUs (equal slot counts per GPU)
    replica_load = _take(node_load / count, slot2nm)  # [L*nodes, P/nodes]
    gpu, rank = pack_greedy(replica_load, gpus_per_node)
    slot_pos = gpu * slots_per_gpu + rank  # replica -> position among the node's slots
    pos2slot = _inverse(slot_pos)
    if refine and gpus_per_node > 1:
        packed = _take(replica_load, pos2slot).reshape(-1, gpus_per_node, slots_per_gpu)
        ids = _take(slot2nm, pos2slot).reshape(packed.shape)
        pos2slot = _take(pos2slot, refine_swaps(packed, ids))
    pos2nm = _take(slot2nm, pos2slot)
    pos2nm = pos2nm.reshape(L, num_nodes, -1) + (np.arange(num_nodes) * experts_per_node)[None, :, None]
    return _take(nm2log, pos2nm.reshape(L, num_physical))


def _spill(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    """phy2log [L, P]: each expert's first replica stays on its group's node, the extra replicas go
    wherever balance is best. Replica counts by water-filling over all slots; replicas packed
    heaviest first onto the least-loaded GPU allowed, never two of one expert on one GPU (unless
    an expert has more replicas than there are GPUs)."""
    L, E = load.shape
    G, N = num_gpus, num_nodes
    k = num_physical // G
    gpu_node = np.arange(G) // (G // N)
    rows = np.arange(L)
    if N > 1:
        group_load = load.reshape(L, num_groups, E // num_groups).sum(axis=2)
        node, _ = pack_greedy(group_load, N)
        home = np.repeat(node, E // num_groups, axis=1)  # [L, E]
    else:
        home = np.zeros((L, E), dtype=np.int64)
    _, _, count = replicate(load, num_physical)
    # items: experts repeated by their replica counts; the first of each is its primary
    expert = np.stack([np.repeat(np.arange(E), c) for c in count])  # [L, P]
    primary = np.ones_like(expert, dtype=bool)
    primary[:, 1:] = expert[:, 1:] != expert[:, :-1]
    weight = _take(load / count, expert)
    order = np.lexsort((~primary, -weight))  # heaviest first, primaries first among equals
    expert, primary, weight = _take(expert, order), _take(primary, order), _take(weight, order)

    home_of = _take(home, expert)  # [L, P] home node of each item
    node_onehot = np.eye(N, dtype=bool)
    load_or_full = np.zeros((L, G))  # a full GPU's load is +inf
    gpu_count = np.zeros((L, G), dtype=np.int64)
    holds = np.zeros((L, E, G), dtype=bool)
    # slots of a node that secondaries may still take without crowding out its primaries
    node_spare = num_physical // N - np.stack([np.bincount(h, minlength=N) for h in home])
    phy2log = np.empty((L, num_physical), dtype=np.int64)
    for step in range(num_physical):
        e, is_primary, w = expert[:, step], primary[:, step], weight[:, step]
        node_ok = np.where(is_primary[:, None], node_onehot[home_of[:, step]], node_spare > 0)  # [L, N]
        allowed = np.where(node_ok[:, gpu_node], load_or_full, np.inf)  # full GPUs are +inf already
        g = np.where(holds[rows, e], np.inf, allowed).argmin(axis=1)
        stuck = np.isinf(allowed[rows, g]) | holds[rows, e, g]  # only GPUs that already hold e are left
        if stuck.any():
            g[stuck] = allowed[stuck].argmin(axis=1)
        c = gpu_count[rows, g]
        phy2log[rows, g * k + c] = e
        load_or_full[rows, g] += w
        gpu_count[rows, g] = c + 1
        done = c + 1 == k
        load_or_full[rows[done], g[done]] = np.inf
        holds[rows, e, g] = True
        secondary = ~is_primary
        node_spare[rows[secondary], gpu_node[g[secondary]]] -= 1
    return phy2log


def gpu_loads(load: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, G]`` tokens per GPU when each logical expert's tokens split evenly over its replicas."""
    L, P = phy2log.shape
    count = np.stack([np.bincount(row, minlength=load.shape[1]) for row in phy2log])
    per_slot = _take(load / np.maximum(count, 1), phy2log)
    return per_slot.reshape(L, num_gpus, P // num_gpus).sum(axis=2)


def _check(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int, policy: str) -> np.ndarray:
    try:
        load = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError):
        raise EplbError(f"load must be a numeric array [layers, experts], got {type(load).__name__}") from None
    if load.ndim != 2:
        raise EplbError(f"load must be [layers, experts], got shape {load.shape}")
    for bad, what in ((~np.isfinite(load), "NaN or infinite"), (load < 0, "negative")):
        if bad.any():
            layer, expert = (int(x) for x in np.argwhere(bad)[0])
            raise EplbError(f"load holds {what} values (load[{layer}, {expert}] = {float(load[layer, expert])!r}); "
                            "expert loads are token counts")
    L, E = load.shape
    for name, v in (("num_physical", num_physical), ("num_groups", num_groups), ("num_nodes", num_nodes),
                    ("num_gpus", num_gpus)):
        if not isinstance(v, (int, np.integer)) or v < 1:
            raise EplbError(f"{name} must be a positive integer, got {v!r}")
    if num_physical < E:
        raise EplbError(f"num_physical ({num_physical}) must be >= the number of experts ({E})")
    if num_physical % num_gpus:
        raise EplbError(f"num_physical ({num_physical}) must be a multiple of num_gpus ({num_gpus})")
    if num_gpus % num_nodes:
        raise EplbError(f"num_gpus ({num_gpus}) must be a multiple of num_nodes ({num_nodes})")
    if E % num_groups:
        raise EplbError(f"the number of experts ({E}) must be a multiple of num_groups ({num_groups})")
    if policy not in POLICIES:
        raise EplbError(f"policy {policy!r} is unknown; use one of {POLICIES}")
    return load


def rebalance(load: np.ndarray, num_physical: int, num_groups: int = 1, num_nodes: int = 1, num_gpus: int = 1,
              policy: Literal["default", "deepseek"] = "default", old_placement: Placement | None = None) -> Placement:
    """A placement of ``num_physical`` slots per layer for per-layer expert loads ``load [L, E]``."""
    load = _check(load, num_physical, num_groups, num_nodes, num_gpus, policy)
    hierarchical = num_groups % num_nodes == 0
    shape = (num_groups, num_nodes) if hierarchical else (1, 1)
    phy2log = _deepseek(load, num_physical, *shape, num_gpus)
    if policy == "default":
        # per layer, keep the candidate with the lowest max GPU load, then the fewest GPUs holding
        # two replicas of one expert (a wasted slot); deepseek's placement wins remaining ties
        best = gpu_loads(load, phy2log, num_gpus).max(axis=1)
        best_dups = _duplicates(phy2log, num_gpus)
        candidates = [_hierarchical(load, num_physical, *shape, num_gpus, refine=True)]
        if shape[1] > 1:  # spilling replicas across nodes only helps when there are nodes to balance
            candidates.append(_spill(load, num_physical, *shape, num_gpus))
        for candidate in candidates:
            peak = gpu_loads(load, candidate, num_gpus).max(axis=1)
            dups = _duplicates(candidate, num_gpus)
            take = (peak < best * (1 - 1e-12)) | ((peak <= best) & (dups < best_dups))
            phy2log = np.where(take[:, None], candidate, phy2log)
            best = np.where(take, peak, best)
            best_dups = np.where(take, dups, best_dups)
    if old_placement is not None:
        from planners.eplb_stability import keep_in_place

        phy2log = keep_in_place(phy2log, old_placement.phy2log, num_gpus, num_nodes if hierarchical else 1)
    return Placement(phy2log)


# -- metrics -------------------------------------------------------------------------------

def _duplicates(phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Per layer, GPUs holding two or more replicas of one expert."""
    L, P = phy2log.shape
    slots = np.sort(phy2log.reshape(L, num_gpus, P // num_gpus), axis=2)
    return (np.diff(slots, axis=2) == 0).any(axis=2).sum(axis=1)


@dataclass(frozen=True)
class BalanceReport:
    """Balance of a placement against its load; arrays are per layer."""

    max_gpu_load: np.ndarray  # [L]
    mean_gpu_load: np.ndarray  # [L]
    max_node_load: np.ndarray  # [L]
    bound: np.ndarray  # [L] max(total/G, best max load per replica over all replica counts): any placement
    replica_bound: np.ndarray  # [L] cardinality bound for this placement's own replica counts
    balancedness: float  # sum over layers of mean / sum over layers of max (as vLLM logs it)
    duplicates: int  # GPUs (summed over layers) holding two replicas of one expert

    @property
    def max_over_bound(self) -> float:
        """Max GPU load over the placement-independent bound, summed over layers."""
        return float(self.max_gpu_load.sum() / max(self.bound.sum(), 1e-30))

    @property
    def max_over_replica_bound(self) -> float:
        """Max GPU load over the best packing of the chosen replicas could reach, summed over layers."""
        return float(self.max_gpu_load.sum() / max(np.maximum(self.bound, self.replica_bound).sum(), 1e-30))


def replication_bound(load: np.ndarray, num_physical: int) -> np.ndarray:
    """min over replica counts (>= 1, summing to P) of max_e load_e / c_e, per layer (water-filling)."""
    _, _, count = replicate(load, num_physical)
    return (load / count).max(axis=1)


def balance_report(load: np.ndarray, placement: Placement, num_gpus: int, num_nodes: int = 1) -> BalanceReport:
    load = np.asarray(load, dtype=np.float64)
    phy2log = placement.phy2log
    L, P = phy2log.shape
    per_gpu = gpu_loads(load, phy2log, num_gpus)
    per_node = per_gpu.reshape(L, num_nodes, -1).sum(axis=2)
    k = P // num_gpus
    bound = np.maximum(load.sum(axis=1) / num_gpus, replication_bound(load, P))
    # the GPU holding the heaviest replica also holds k-1 others, at least the k-1 lightest ones
    count = np.stack([np.bincount(row, minlength=load.shape[1]) for row in phy2log])
    replica = np.sort(_take(load / np.maximum(count, 1), phy2log), axis=1)
    card = replica[:, -1] + replica[:, : k - 1].sum(axis=1)
    return BalanceReport(per_gpu.max(axis=1), per_gpu.mean(axis=1), per_node.max(axis=1), bound, card,
                         float(per_gpu.mean(axis=1).sum() / max(per_gpu.max(axis=1).sum(), 1e-30)),
                         int(_duplicates(phy2log, num_gpus).sum()))
