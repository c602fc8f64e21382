"""Expert-parallel load balancing: replicate hot experts into redundant slots and pack slots onto GPUs.

``rebalance(load [L, E], num_physical, num_groups, num_nodes, num_gpus, policy)`` returns a
:class:`~planners.eplb.placement.Placement` (``phy2log [L, P]``; GPU g owns slots ``[g*P/G, (g+1)*P/G)``).

Policies:

* ``"deepseek"`` -- DeepSeek's EPLB. Hierarchical when ``num_groups % num_nodes == 0``: pack expert
  groups onto nodes (greedy, equal counts), replicate hot experts inside each node (largest load per
  replica first), pack each node's replicas onto its GPUs (greedy, equal counts). Otherwise the same
  with one group and one node (global). All layers at once; the same ``phy2log`` as the plain loop
  (``planners.eplb.loop``): rows whose fast result cannot be certified are redone step by step.
* ``"default"`` -- several nodes: every expert keeps one replica on its group's node, the others go
  where balance is best (see :func:`_spread`), each node's replicas are packed onto its GPUs, repeats
  of one expert on one GPU traded away, then swaps between GPUs. One node: DeepSeek's placement with
  the trades and swaps. Per layer it keeps whichever of this and ``deepseek`` has the lower maximum
  GPU load (then fewer repeats), so it is never worse.

A token routed to a logical expert is served by one of its replicas, so a replica carries
``load[e] / logcnt[e]`` and a GPU the sum over its slots.
"""

from __future__ import annotations

import sys
from typing import Literal

import numpy as np

from planners.errors import EplbError
from planners.eplb.placement import Placement
from planners.eplb.stats import check_load

__all__ = ["rebalance", "gpu_loads", "duplicates", "POLICIES"]

POLICIES = ("default", "deepseek")


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


def _exchange(arrays, sa: np.ndarray, sb: np.ndarray) -> None:
    """Swap flat positions ``sa`` and ``sb`` in every array (in place)."""
    for arr in arrays:
        flat = arr.reshape(-1)
        flat[sa], flat[sb] = flat[sb], flat[sa].copy()


def _swap_pairs(w: np.ndarray, perm: np.ndarray, ids: np.ndarray | None, m: int, k: int, rounds: int,
                limit: np.ndarray | None) -> None:
    """In place on flat ``w, perm, ids [X, m*k]``: rounds pairing the i-th heaviest pack with the i-th
    lightest, each pair making the swap that evens it best if that lowers the heavier."""
    X = w.shape[0]
    n = m * k
    active = np.arange(X)
    P = m // 2
    ar_k = np.arange(k)
    for _ in range(rounds):
        if not len(active) or P < 1:
            break
        A = len(active)
        base = (active * n)[:, None]
        wa = w[active]
        load = wa.reshape(A, m, k).sum(axis=2)
        order = np.argsort(load, axis=1, kind="stable")
        heavy, light = order[:, ::-1][:, :P], order[:, :P]  # [A, P]
        hs = ((heavy * k)[:, :, None] + ar_k).reshape(A, P * k)  # slots of each heavy pack
        ls = ((light * k)[:, :, None] + ar_k).reshape(A, P * k)
        wh = w.take(base + hs).reshape(A, P, k)
        wl = w.take(base + ls).reshape(A, P, k)
        delta = wh[:, :, :, None] - wl[:, :, None, :]  # [A, P, k_h, k_l]
        lh = load.take(heavy + (np.arange(A) * m)[:, None])
        gap = (lh - load.take(light + (np.arange(A) * m)[:, None]))[:, :, None, None]
        ok = (delta > 0) & (delta < gap * (1 - 1e-12))
        if ids is not None:
            ih = ids.take(base + hs).reshape(A, P, k)
            il = ids.take(base + ls).reshape(A, P, k)
            h_has = (ih[:, :, :, None] == il[:, :, None, :])  # [A, P, k_h, k_l]
            ok &= ~h_has.any(axis=3)[:, :, :, None] & ~h_has.any(axis=2)[:, :, None, :]
        if limit is not None:
            ok &= (lh > limit[active][:, None])[:, :, None, None]
        score = np.where(ok, np.abs(gap - 2 * delta), np.inf).reshape(A, P, k * k)
        best = score.argmin(axis=2)  # [A, P]
        go = np.isfinite(np.take_along_axis(score, best[:, :, None], axis=2)[:, :, 0])
        if not go[:, 0].any():  # the heaviest pack of no row gains: done
            break
        a, b = np.divmod(best, k)
        ra, pa = np.nonzero(go)
        sa = base[ra, 0] + hs.reshape(A, P, k)[ra, pa, a[ra, pa]]
        sb = base[ra, 0] + ls.reshape(A, P, k)[ra, pa, b[ra, pa]]
        _exchange((w, perm) + ((ids,) if ids is not None else ()), sa, sb)
        active = active[go[:, 0]]


def _swap_heaviest(w: np.ndarray, perm: np.ndarray, ids: np.ndarray | None, m: int, k: int, rounds: int,
                   limit: np.ndarray | None, partners: int = 8) -> None:
    """In place on flat ``w, perm, ids [X, m*k]``: swap one item of the heaviest pack with one of one
    of the ``partners`` lightest packs, the swap evening that pair best, while it lowers the heaviest."""
    X = w.shape[0]
    n = m * k
    Q = min(partners, m - 1)
    active = np.arange(X)
    ar_k = np.arange(k)
    for _ in range(rounds):
        if not len(active) or Q < 1:
            break
        A = len(active)
        base = (active * n)[:, None]
        load = w[active].reshape(A, m, k).sum(axis=2)
        order = np.argsort(load, axis=1, kind="stable")
        h = order[:, -1]
        top = load[np.arange(A), h]
        qs = order[:, :Q]
        hs = (h * k)[:, None] + ar_k  # [A, k]
        bs = ((qs * k)[:, :, None] + ar_k).reshape(A, Q * k)
        wh = w.take(base + hs)
        wb = w.take(base + bs)
        delta = wh[:, :, None] - wb[:, None, :]  # [A, k, Q*k]
        gap = np.repeat(top[:, None] - load.take(qs + (np.arange(A) * m)[:, None]), k, axis=1)[:, None, :]
        ok = (delta > 0) & (delta < gap * (1 - 1e-12))
        if ids is not None:
            ih = ids.take(base + hs)
            ib = ids.take(base + bs)
            same = ih[:, :, None] == ib[:, None, :]
            ok &= ~np.repeat(same.reshape(A, k, Q, k).any(axis=3), k, axis=2) & ~same.any(axis=1)[:, None, :]
        if limit is not None:
            ok &= (top > limit[active])[:, None, None]
        score = np.where(ok, np.abs(gap - 2 * delta), np.inf).reshape(A, -1)
        best = score.argmin(axis=1)
        go = np.isfinite(score.ravel().take(np.arange(A) * score.shape[1] + best))
        if not go.any():
            break
        a, b = np.divmod(best[go], Q * k)
        rows = np.flatnonzero(go)
        sa = base[rows, 0] + hs[rows, a]
        sb = base[rows, 0] + bs[rows, b]
        _exchange((w, perm) + ((ids,) if ids is not None else ()), sa, sb)
        active = active[go]


def refine_swaps(weight: np.ndarray, ids: np.ndarray | None = None, max_rounds: int | None = None,
                 good_enough: np.ndarray | None = None) -> np.ndarray:
    """Improve packs ``weight [X, m, k]`` (m packs of k items) by swapping items between packs:
    rounds pairing the heaviest pack with the lightest, the second heaviest with the second lightest
    and so on (each pair making the swap that evens it best, if that lowers the heavier), then
    rounds swapping the heaviest pack with the best of the lightest packs. All rows at once; a row
    stops when the heaviest pack no longer gains or is at most ``good_enough [X]``.

    With ``ids`` (same shape), a swap may not put two items of one id into one pack. Returns the
    permutation ``[X, m*k]``: new flat position -> old flat position. Deterministic.
    """
    X, m, k = weight.shape
    rounds = max_rounds or m + 8
    w = weight.reshape(X, m * k).copy()
    perm = np.tile(np.arange(m * k), (X, 1))
    ids = None if ids is None else ids.reshape(X, m * k).copy()
    limit = None if good_enough is None else np.asarray(good_enough, dtype=np.float64)
    _swap_pairs(w, perm, ids, m, k, rounds, limit)
    _swap_heaviest(w, perm, ids, m, k, min(rounds, 4), limit)  # a last few: the pairs did most
    return perm


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


# -- the default policy ----------------------------------------------------------------------
#
# Several nodes: every expert keeps one replica on its group's node (groups packed onto nodes as
# DeepSeek packs them), the other P - E replicas go wherever balance is best. They are chosen one at
# a time (all layers together): while some replica is heavier than a size target it is split once
# more (new replica on the coolest node with room), otherwise the hottest node is relieved (its
# heaviest expert gets a replica on the coolest node with room) or, when only it has room left,
# takes the lightest replica it can (a "filler"). Then each node's replicas are packed onto its
# GPUs (DeepSeek's greedy), a GPU holding two replicas of one expert trades one away, and swaps
# from the heaviest GPU lower its load. Per layer the better of this and `deepseek` is kept.

_SIZE_SHARES = (0.7,)  # at most this share of the extra replicas goes to splitting oversized replicas
_SIZE_GRID = np.array([0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, np.inf])  # x average GPU load


def _spread(load: np.ndarray, num_physical: int, num_nodes: int, num_gpus: int, size_share: np.ndarray
            ) -> tuple[np.ndarray, np.ndarray]:
    """Replica counts ``[L, E]`` and replicas on each node ``[L, N, E]`` for experts in node-major
    order (node n's own experts are ``[n*E/N, (n+1)*E/N)``; each keeps a replica there).

    Rounds of up to one new replica per node: while replicas heavier than the size target remain,
    the heaviest ones split (new replicas on the coolest nodes with room); otherwise the i-th
    hottest node gives its expert shedding most a replica on the i-th coolest node with room; when
    that helps no node, each node with room takes the replica of its own experts adding least."""
    L, E = load.shape
    N = num_nodes
    B = E // N
    per_node = num_gpus // N  # replicas of one expert a node can hold without doubling up on a GPU
    extra = num_physical - E
    rows = np.arange(L)
    row = rows[:, None]
    weight = np.ascontiguousarray(load, dtype=np.float64)
    count = np.ones((L, E))
    on = np.zeros((L, N, E))
    own_mask = np.repeat(np.eye(N, dtype=bool), B, axis=1)  # [N, E]
    on[:, own_mask] = 1
    node_load = weight.reshape(L, N, B).sum(axis=2)
    free = np.full((L, N), num_physical // N - B)
    left = np.full(L, extra)
    # size target per layer: the smallest multiple of the average GPU load such that splitting every
    # heavier replica down to it takes at most ``size_share [L]`` of the extra replicas
    avg = weight.sum(axis=1) / num_gpus
    size_target = np.full(L, np.inf)
    for alpha in _SIZE_GRID[::-1]:
        if np.isfinite(alpha):
            size = np.maximum(alpha * avg, 1e-300)
            need = np.maximum(np.ceil(weight / size[:, None]) - 1, 0).sum(axis=1)
            size_target = np.where(need <= size_share * extra, size, size_target)
    own_idx = np.arange(E).reshape(N, B)  # node n's own experts
    node_ids = np.arange(N)
    half = max(N // 2, 1)
    for _ in range(extra):
        if not left.any():
            break
        share = weight / count
        new = weight / (count + 1)
        gain = share - new
        room = (free > 0) & (left > 0)[:, None]
        cool = np.argsort(np.where(room, node_load, np.inf), axis=1, kind="stable")  # coolest with room first
        chosen = np.full((L, N), -1)
        dest = cool.copy()
        # 1. split the heaviest oversized replicas, the i-th heaviest onto the i-th coolest node
        top = np.empty((L, N), dtype=np.intp)
        pick = share.copy()
        pick_flat = pick.ravel()
        for i in range(N):  # the N heaviest replicas, one argmax at a time
            top[:, i] = pick.argmax(axis=1)
            pick_flat[rows * E + top[:, i]] = -1.0
        split_ok = (share[row, top] > size_target[:, None]) & room[row, cool]
        split_ok &= on[row, cool, top] < per_node
        split_ok &= np.cumsum(split_ok, axis=1) <= left[:, None]
        chosen = np.where(split_ok, top, chosen)
        sized = split_ok.any(axis=1)
        # 2. relieve: the i-th hottest node, through its own expert shedding most, onto the i-th coolest
        hot = np.argsort(-node_load, axis=1, kind="stable")[:, :half]
        own_replicas = on[:, node_ids[:, None], own_idx]  # [L, N, B] replicas of each node's own experts there
        relief = own_replicas * gain.reshape(L, N, B)
        relief_expert = own_idx[node_ids, relief.argmax(axis=2)]  # [L, N]
        hot_expert = relief_expert[row, hot]  # [L, half]
        cool_node = cool[:, :half]
        relieve_ok = room[row, cool_node] & (cool_node != hot)
        relieve_ok &= node_load[row, cool_node] + new[row, hot_expert] < node_load[row, hot]
        relieve_ok &= on[row, cool_node, hot_expert] < per_node
        relieve_ok &= ~sized[:, None]
        relieve_ok &= np.cumsum(relieve_ok, axis=1) <= left[:, None]
        chosen[:, :half] = np.where(relieve_ok, hot_expert, chosen[:, :half])
        dest[:, :half] = np.where(relieve_ok, cool_node, dest[:, :half])
        relieved = relieve_ok.any(axis=1)
        # 3. otherwise every node with room takes the replica of its own experts adding least to it
        add = np.where(own_replicas < per_node, new.reshape(L, N, B) * (1 - 1e-9) - relief, np.inf)
        fill = own_idx[node_ids, add.argmin(axis=2)]  # [L, N]
        fill_ok = room & np.isfinite(add.min(axis=2)) & ~(sized | relieved)[:, None]
        fill_ok &= np.cumsum(fill_ok, axis=1) <= left[:, None]
        keep = fill_ok.any(axis=1) | sized | relieved
        chosen = np.where(fill_ok, fill, np.where(keep[:, None], chosen, -1))
        dest = np.where(fill_ok, node_ids, dest)
        stuck = (chosen < 0).all(axis=1) & (left > 0)
        if stuck.any():  # any node with room, the lightest replica it can take
            stuck_rows = np.flatnonzero(stuck)
            can_take = room[stuck_rows][:, :, None] & (on[stuck_rows] < per_node)
            lightest = np.where(can_take, new[stuck_rows][:, None, :], np.inf).reshape(len(stuck_rows), -1)
            flat = lightest.argmin(axis=1)
            chosen[stuck_rows, 0], dest[stuck_rows, 0] = flat % E, flat // E
        # apply (the experts of one round are distinct)
        layer_of, col_of = np.nonzero(chosen >= 0)
        expert_of, node_of = chosen[layer_of, col_of], dest[layer_of, col_of]
        np.subtract.at(node_load, layer_of, on[layer_of, :, expert_of] * gain[layer_of, expert_of][:, None])
        np.add.at(node_load, (layer_of, node_of), new[layer_of, expert_of])
        np.add.at(on, (layer_of, node_of, expert_of), 1)
        np.add.at(count, (layer_of, expert_of), 1)
        np.subtract.at(free, (layer_of, node_of), 1)
        np.subtract.at(left, layer_of, 1)
    return count, on


def _pack_nodes(load: np.ndarray, count: np.ndarray, on: np.ndarray, num_gpus: int, slots_per_gpu: int) -> np.ndarray:
    """phy2log ``[L, P]``: each node's replicas packed onto its GPUs."""
    L, N, E = on.shape
    per_node = num_gpus // N
    share = load / count
    keys, ib, _ = _desc_keys(share)
    order = keys & _I64((1 << ib) - 1)  # experts, heaviest replica first
    r = np.arange(L)[:, None]
    reps = on[r[:, :, None], np.arange(N)[None, :, None], order[:, None, :]].astype(np.intp)  # [L, N, E] in that order
    slots = per_node * slots_per_gpu
    item = np.repeat(np.broadcast_to(order[:, None, :], (L, N, E)).ravel(), reps.ravel()).reshape(L * N, slots)
    ws = np.repeat(np.broadcast_to(share[r, order][:, None, :], (L, N, E)).ravel(), reps.ravel()).reshape(L * N, slots)
    pos = _pack_sorted(ws, per_node)
    placed = np.empty((L * N, slots), dtype=_I64)
    weights = np.empty((L * N, slots))
    rr = np.arange(L * N)[:, None]
    placed[rr, pos] = item
    weights[rr, pos] = ws
    shape = (L * N, per_node, slots_per_gpu)
    # refine a node's GPUs only while its heaviest could be the layer's: down to the layer's heaviest
    # node average (or just above its own average)
    avg = weights.sum(axis=1).reshape(L, N) / per_node
    good = np.maximum(avg * 1.0005, avg.max(axis=1, keepdims=True)).ravel()
    perm = _refine(weights.reshape(shape), placed.reshape(shape), good_enough=good)
    return _take(placed, perm).reshape(L, N * slots)


def _refine(weight: np.ndarray, ids: np.ndarray, max_rounds: int | None = None,
            good_enough: np.ndarray | None = None) -> np.ndarray:
    """Permutation ``[X, m*k]`` (new flat position -> old) improving packs ``[X, m, k]``: first a
    pack holding two items of one id trades one for the closest-weight item of another pack that
    creates no new repeat, then :func:`refine_swaps` lowers the heaviest pack."""
    X, m, k = weight.shape
    w = weight.copy()
    ids = ids.copy()
    perm = np.tile(np.arange(m * k).reshape(m, k), (X, 1, 1))
    rows = np.arange(X)
    for _ in range(m * k):
        srt = np.sort(ids, axis=2)
        dup_pack = (srt[:, :, 1:] == srt[:, :, :-1]).any(axis=2)  # [X, m]
        todo = dup_pack.any(axis=1)
        if not todo.any():
            break
        r = rows[todo]
        p = dup_pack[r].argmax(axis=1)
        ip = ids[r, p]  # [R, k]
        # the second copy of a repeated id in pack p
        rep = (ip[:, :, None] == ip[:, None, :]) & np.tri(k, k, -1, dtype=bool)  # a equals an earlier b
        a = rep.any(axis=2).argmax(axis=1)
        ea, wa = ip[np.arange(len(r)), a], w[r, p, a]
        # partners: items b of other packs q, with q not holding ea and p not holding b's id
        q_has = (ids[r] == ea[:, None, None]).any(axis=2)  # [R, m]
        p_has = (ids[r][:, :, :, None] == ip[:, None, None, :]).any(axis=3)  # [R, m, k]: b's id in p
        ok = ~q_has[:, :, None] & ~p_has
        ok[np.arange(len(r)), p] = False
        cost = np.where(ok, np.abs(w[r] - wa[:, None, None]), np.inf).reshape(len(r), -1)
        best = cost.argmin(axis=1)
        go = np.isfinite(cost[np.arange(len(r)), best])
        if not go.any():
            break
        r, p, a, best = r[go], p[go], a[go], best[go]
        q, b = np.divmod(best, k)
        for arr in (w, ids, perm):
            tmp = arr[r, p, a].copy()
            arr[r, p, a] = arr[r, q, b]
            arr[r, q, b] = tmp
    swaps = refine_swaps(w, ids, max_rounds, good_enough)
    return _take(perm.reshape(X, m * k), swaps)


def _default(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int) -> np.ndarray:
    L, E = load.shape
    k = num_physical // num_gpus
    ds = _deepseek(load, num_physical, num_groups, num_nodes, num_gpus)
    if num_nodes > 1 and k > 1:
        nm2log = _group_order(load, num_groups, num_nodes)
        load_nm = load if nm2log is None else _take(load, nm2log)
        # a few size targets at once (rows stacked), the better kept per layer below
        tries = len(_SIZE_SHARES)
        stacked = np.tile(load_nm, (tries, 1))
        count, on = _spread(stacked, num_physical, num_nodes, num_gpus, np.repeat(_SIZE_SHARES, L))
        cand = _pack_nodes(stacked, count, on, num_gpus, k).reshape(tries, L, num_physical)
        candidates = [c if nm2log is None else _take(nm2log, c) for c in cand]
    else:  # one node: DeepSeek's packing, then trades and swaps between GPUs
        shape = (L, num_gpus, k)
        share = load / _counts(ds, E)
        per_slot = _take(share, ds)
        good = 1.001 * np.maximum(load.sum(axis=1) / num_gpus, share.max(axis=1))  # near the bound: stop
        candidates = [_take(ds, _refine(per_slot.reshape(shape), ds.reshape(shape), good_enough=good))] if k > 1 else []
    best = gpu_loads(load, ds, num_gpus).max(axis=1)
    best_dups = duplicates(ds, num_gpus)
    out = ds
    for cand in candidates:
        peak = gpu_loads(load, cand, num_gpus).max(axis=1)
        dups = duplicates(cand, num_gpus)
        take = (peak < best * (1 - 1e-12)) | ((peak <= best) & (dups < best_dups))
        out = np.where(take[:, None], cand, out)
        best = np.where(take, peak, best)
        best_dups = np.where(take, dups, best_dups)
    return out


def _counts(phy2log: np.ndarray, num_experts: int) -> np.ndarray:
    """``[L, E]`` replicas of each expert."""
    L = phy2log.shape[0]
    flat = (phy2log + (np.arange(L) * num_experts)[:, None]).ravel()
    return np.bincount(flat, minlength=L * num_experts).reshape(L, num_experts)


def duplicates(phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """Per layer, GPUs holding two or more replicas of one expert."""
    L, P = phy2log.shape
    slots = np.sort(phy2log.reshape(L, num_gpus, P // num_gpus), axis=2)
    return (np.diff(slots, axis=2) == 0).any(axis=2).sum(axis=1)


def gpu_loads(load: np.ndarray, phy2log: np.ndarray, num_gpus: int) -> np.ndarray:
    """``[L, G]`` tokens per GPU when each logical expert's tokens split evenly over its replicas."""
    load = np.asarray(load, dtype=np.float64)
    L, P = phy2log.shape
    E = load.shape[1]
    flat = (phy2log + (np.arange(L) * E)[:, None]).ravel()
    count = np.bincount(flat, minlength=L * E)
    per_slot = (load.ravel() / np.maximum(count, 1))[flat]
    return per_slot.reshape(L, num_gpus, P // num_gpus).sum(axis=2)


def _check(load: np.ndarray, num_physical: int, num_groups: int, num_nodes: int, num_gpus: int, policy: str) -> np.ndarray:
    load = check_load(load)
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
    if policy == "deepseek":
        phy2log = _deepseek(load, num_physical, *shape, num_gpus)
    else:
        phy2log = _default(load, num_physical, *shape, num_gpus)
    if old_placement is not None:
        from planners.eplb.stability import keep_in_place

        phy2log = keep_in_place(phy2log, old_placement.phy2log, num_gpus, num_nodes if hierarchical else 1)
    return Placement(phy2log)
