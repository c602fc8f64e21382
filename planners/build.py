"""Build a two-stage sync plan by intersecting what trainer ranks hold with what engines need.

Steps (tables are numpy arrays so a 1T-parameter job plans in seconds):
1. Shard rules give every rank's local tensors and their pieces; ranks with the same shard
   coordinates share one template.
2. Per logical tensor, the cut points of all trainer pieces split the split dimension into
   *segments*; each segment's holders are the trainer ranks whose pieces cover it (DP and
   expert-DP replicas, tied copies).
3. Each inference piece is cut at segment boundaries. Equal cuts needed by ranks of one
   *receiving group* -- the engine ranks of one node, of any engine -- form one *delivery*, so
   each byte crosses into a node once and spreads over NVLink from there.
4. Routing. A destination whose own GPU holds the bytes copies them locally. A delivery with one
   holder and one destination has nothing to choose. The rest, largest first, pick the
   least-loaded destination as entry receiver and the holder that would finish soonest as its
   stage-1 sender (same-node holders count at NVLink speed); stage 2 fans out from the entry
   (or from a local copier) to the rest of the group over the node's links -- when those links
   are faster than the holders' (otherwise every member gets its own stage-1 copy, spreading the
   load over the holders).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from planners.cost import CROSS_NODE, SAME_DEVICE, SAME_NODE, Links, link_class
from planners.errors import PlanBuildError
from planners.layouts import Deployment, InferenceLayout, TrainerLayout
from planners.models import Catalog, ModelSpec, catalog
from planners.quant import quantize_catalog, quantize_templates
from planners.eplb.placement import EnginePlacements, Placement
from planners.plan import CHUNK_DTYPE, DERIVED_DTYPE, PIECE_DTYPE, SyncPlan
from planners.schedule.buckets import chunk_origins
from planners.sides import engine_side, trainer_side
from planners.sides.shards import LocalTensor

__all__ = ["build_plan", "build_plan_from_parts", "PlanBuilder", "PlanBuildError"]


def build_plan(job: Any, load: Any = None) -> SyncPlan:
    """Plan for a :class:`planners.job.JobSpec`; with EPLB enabled and expert ``load [moe_layers,
    experts]`` given, the plan fills the balanced placement computed from it. (Refreshing with a new
    load every iteration: keep a ``PlanBuilder.for_job(job)`` and call ``plan(job.placement(load))``.)"""
    return build_plan_from_parts(job.model, job.trainer, job.inference, job.deployment, job.placement(load),
                                 job.links, meta=job.describe(), sides=(job.trainer_kind, job.engine_kind))


def build_plan_from_parts(spec: ModelSpec, trainer: TrainerLayout, inference: InferenceLayout,
                          deployment: Deployment, placement: Placement | EnginePlacements | None = None,
                          links: Links | None = None, meta: dict[str, Any] | None = None,
                          sides: tuple[str, str] = ("megatron", "vllm")) -> SyncPlan:
    """``sides``: the trainer's and the engine's kind (``planners.sides``)."""
    return PlanBuilder(spec, trainer, inference, deployment, placement, links, meta, sides).plan(placement)


class PlanBuilder:
    """A job's plan in two parts: what no expert placement can touch, built once here, and the routed
    experts' slots, built per placement by :meth:`plan` (a refresh with a new placement pays for that
    part only). The placement-free part covers both sides' local tensors and every piece but the
    engines' expert-slot pieces, the trainer's segments, and the chunks of every other tensor, routed
    first; the experts are routed after them, from where that routing left every rank's links. So
    :meth:`plan` gives the same plan for a placement whichever placements it planned before."""

    def __init__(self, spec: ModelSpec, trainer: TrainerLayout, inference: InferenceLayout, deployment: Deployment,
                 placement: Placement | EnginePlacements | None = None, links: Links | None = None, meta: dict[str, Any] | None = None,
                 sides: tuple[str, str] = ("megatron", "vllm")) -> None:
        self.spec, self.trainer, self.inference, self.deployment = spec, trainer, inference, deployment
        self.links, self.meta = links or Links(), meta or {}
        trainer_rules, self.engine_rules = trainer_side(sides[0]), engine_side(sides[1])
        trainer_rules.check(spec, trainer)
        self.engine_rules.check(spec, inference, placement)
        self.cat = cat = catalog(spec) if inference.quantization is None else quantize_catalog(spec, catalog(spec))
        self.devices = np.asarray(deployment.device_ids(trainer, inference), dtype=np.int64)
        self.T = T = trainer.world_size
        self.num_physical = placement.num_physical if placement is not None else spec.num_experts

        templates = [trainer_rules.template(spec, cat, trainer, r) for r in range(T)]
        templates += [self.engine_rules.template(spec, cat, inference, placement, r) for r in range(inference.world_size)]
        if inference.quantization is not None:  # FP8 engines: scale tensors, and what trainer ranks quantize
            templates = quantize_templates(templates, cat, T, spec.dtype)
        self.local_rank, self.names, self.shapes, self.dtypes, self.pieces, self.derived = _tables(templates)
        self.piece_rank = piece_rank = self.local_rank[self.pieces["local"]]
        self.seg = _Segments(cat, self.pieces[piece_rank < T], piece_rank[piece_rank < T], self.devices)

        self._slots()
        fixed = (piece_rank >= T) & ~self.in_slot
        cuts = _cuts(cat, self.seg, self.pieces[fixed], piece_rank[fixed], self.devices, deployment.gpus_per_node)
        # the other tensors are routed once, balanced around what the experts of vLLM's initial placement
        # load every link with (a new placement loads them about as much: it moves experts, not bytes)
        self.first_holder = np.zeros(len(self.seg.points), np.int64)  # where each segment's deliveries start
        initial = np.zeros(0, CHUNK_DTYPE)
        if len(self.slot_rows):
            expert_cuts = self._expert_cuts(self._filled(None))
            self.first_holder = _first_holders(self.seg, expert_cuts, len(self.devices))
            initial = self._route_cuts(expert_cuts)[0]
        fixed_chunks, _ = _route(cat, self.seg, cuts, self.devices, deployment.gpus_per_node, self.links,
                                 _stage1_busy(initial, len(self.devices), self.links))
        self.fixed_chunks = _sorted_chunks([fixed_chunks])
        self.keys = _ChunkKeys(len(self.devices), cat)
        self.fixed_keys = self.keys(self.fixed_chunks) if self.keys.usable else None
        self._scopes: dict[tuple[int, ...], _Scope] = {}
        self._origin: np.ndarray | None = None

    @classmethod
    def for_job(cls, job: Any) -> "PlanBuilder":
        """The builder of a :class:`planners.job.JobSpec` (its initial placement planned first)."""
        return cls(job.model, job.trainer, job.inference, job.deployment, job.placement(None), job.links,
                   meta=job.describe(), sides=(job.trainer_kind, job.engine_kind))

    def _slots(self) -> None:
        """The engines' expert-slot pieces: for each, its MoE layer, physical slot and projection, so that
        a placement says which logical tensor fills it."""
        spec, cat = self.spec, self.cat
        expert = cat.table.expert
        self.in_slot = (self.piece_rank >= self.T) & (expert[self.pieces["tensor"]] >= 0)
        self.slot_rows = np.flatnonzero(self.in_slot)
        if not len(self.slot_rows):
            return
        layers = list(spec.moe_layers)
        self.expert_tensor = _expert_tensors(cat, layers, spec.num_experts)
        moe_of, proj_of = np.full(len(cat), -1, np.int64), np.full(len(cat), -1, np.int64)
        moe_of[self.expert_tensor.reshape(-1)] = np.repeat(np.arange(len(layers)), self.expert_tensor[0].size)
        proj_of[self.expert_tensor.reshape(-1)] = np.tile(np.arange(self.expert_tensor.shape[2]),
                                                          len(layers) * spec.num_experts)
        rows = self.pieces[self.slot_rows]
        self.slot_layer, self.slot_proj = moe_of[rows["tensor"]], proj_of[rows["tensor"]]
        engine_ranks = self.piece_rank[self.slot_rows].astype(np.int64) - self.T
        self.slot_engine = engine_ranks // self.inference.engine_size  # engines are the slowest rank coordinate
        # every expert of a (layer, projection) is cut alike by the trainer's shards: a slot piece spans
        # the same segments of whichever expert fills it, counted from that expert's first segment
        self.first_segment = np.searchsorted(self.seg.points, np.arange(len(cat), dtype=np.int64) * self.seg.stride)
        t = rows["tensor"].astype(np.int64)
        s0 = np.searchsorted(self.seg.points, t * self.seg.stride + rows["lo"], side="right") - 1
        s1 = np.searchsorted(self.seg.points, t * self.seg.stride + rows["hi"], side="left")
        self.slot_spans = (s0 - self.first_segment[t], s1 - self.first_segment[t])
        locals_ = rows["local"].astype(np.int64)
        kinds, which = np.unique(locals_, return_inverse=True)
        self.slot_phys = self.engine_rules.slots_of(self.inference, self.num_physical,
                                                    engine_ranks,
                                                    [self.shapes[int(k)] for k in kinds], which,
                                                    rows["base"].astype(np.int64))

    def _phy2log(self, placement: Placement | EnginePlacements | None) -> np.ndarray:
        """``[engines, L, P]``: the expert every engine's slot serves (shared placements broadcast; None:
        vLLM's initial placement, slot ``i`` serving expert ``i % E``)."""
        layers, engines = len(self.spec.moe_layers), self.inference.engines
        if placement is None:
            identity = np.arange(self.num_physical) % self.spec.num_experts
            return np.broadcast_to(identity, (engines, layers, self.num_physical))
        placement.check(layers, self.spec.num_experts, self.num_physical, engines)
        if placement.engines is None:
            return np.broadcast_to(placement.phy2log, (engines, layers, self.num_physical))
        return placement.phy2log

    def _filled(self, placement: Placement | EnginePlacements | None) -> np.ndarray:
        """The logical tensor every expert-slot piece holds under ``placement``."""
        experts = self._phy2log(placement)[self.slot_engine, self.slot_layer, self.slot_phys]
        return self.expert_tensor[self.slot_layer, experts, self.slot_proj]

    def _expert_chunks(self, filled: np.ndarray, slots: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Chunks and their feeders (see ``_route_by_rule``) of the expert-slot pieces ``slots`` (positions
        in ``slot_rows``; all by default) holding the logical tensors ``filled``."""
        return self._route_cuts(self._expert_cuts(filled, slots))

    def _route_cuts(self, cuts: "_Cuts") -> tuple[np.ndarray, np.ndarray]:
        nbytes = (cuts.hi - cuts.lo) * self.cat.table.row_bytes[cuts.tensor]
        return _route_by_rule(self.seg, cuts, nbytes, self.devices, self.deployment.gpus_per_node, self.links,
                              self.first_holder)

    def _expert_cuts(self, filled: np.ndarray, slots: np.ndarray | None = None) -> "_Cuts":
        slots = np.arange(len(self.slot_rows)) if slots is None else slots
        rows = self.slot_rows[slots]
        pieces = self.pieces[rows]
        pieces["tensor"] = filled
        first = self.first_segment[filled]
        spans = (first + self.slot_spans[0][slots], first + self.slot_spans[1][slots])
        return _cuts(self.cat, self.seg, pieces, self.piece_rank[rows], self.devices, self.deployment.gpus_per_node, spans)

    def plan(self, placement: Placement | EnginePlacements | None = None) -> SyncPlan:
        """The whole job's plan for ``placement`` (vLLM's initial placement when None): one shared by
        every engine, or one per engine."""
        pieces, moving = self.pieces, np.zeros(0, CHUNK_DTYPE)
        if len(self.slot_rows):
            filled = self._filled(placement)
            pieces = pieces.copy()
            pieces["tensor"][self.slot_rows] = filled
            moving = self._expert_chunks(filled)[0]
        return self._plan(pieces, self.keys.merge(self.fixed_chunks, self.fixed_keys, moving), placement, None,
                          self.fixed_chunks)

    def rank_plan(self, placement: Placement | EnginePlacements | None, ranks) -> SyncPlan:
        """The part of :meth:`plan` that plan ``ranks`` (one, or those one process hosts) sync by: the chunks
        they send or receive and the stage-2 chunks their stage-1 sends feed (which their checksums
        cover), in the whole plan's order, and their own pieces. It routes only the expert deliveries
        those ranks take part in, so its cost follows the ranks' share of the job, not the job."""
        scope = self._scope(ranks)
        pieces, moving = self.pieces[scope.piece_rows], np.zeros(0, CHUNK_DTYPE)
        if len(self.slot_rows):
            filled = self._filled(placement)
            pieces["tensor"][scope.own_slot_at] = filled[scope.own_slots]
            # every slot holding what a hosted trainer rank sends or a hosted engine rank receives: a
            # delivery's route depends on the other deliveries of its segment (_route_by_rule)
            wanted = scope.held.copy()
            wanted[filled[scope.own_slots]] = True
            slots = np.flatnonzero(wanted[filled])
            chunks, feeder = self._expert_chunks(filled[slots], slots)
            moving = chunks[scope.hosted[chunks["src"]] | scope.hosted[chunks["dst"]] | scope.hosted[feeder]]
        chunks = self.keys.merge(scope.fixed_chunks, scope.fixed_keys, moving)
        return self._plan(pieces, chunks, placement, scope.ranks, scope.fixed_chunks)

    def _plan(self, pieces: np.ndarray, chunks: np.ndarray, placement, scope, fixed_part: np.ndarray) -> SyncPlan:
        plan = SyncPlan(
            tensors=self.cat.tensors, local_rank=self.local_rank, local_name=self.names, local_shape=self.shapes,
            local_dtype=self.dtypes, pieces=pieces, chunks=chunks, devices=self.devices, num_trainer=self.T,
            gpus_per_node=self.deployment.gpus_per_node, links=self.links, meta=self.meta, placement=placement,
            scope=scope, derived=self.derived, fixed_part=fixed_part,
        )
        plan.table = self.cat.table  # the same tensors: their size arrays are computed once per job
        return plan

    def _scope(self, ranks) -> "_Scope":
        """What no placement changes about ``ranks``' part of the plan (computed once per set of ranks)."""
        key = tuple(sorted({int(ranks)} if np.ndim(ranks) == 0 else {int(r) for r in ranks}))
        if key in self._scopes:
            return self._scopes[key]
        if not key or key[0] < 0 or key[-1] >= len(self.devices):
            raise PlanBuildError(f"ranks {list(key)} are not plan ranks (0 to {len(self.devices) - 1})")
        s = _Scope()
        s.ranks = key
        s.hosted = np.zeros(len(self.devices), dtype=bool)
        s.hosted[list(key)] = True
        piece_hosted = s.hosted[self.piece_rank]
        s.piece_rows = np.flatnonzero(piece_hosted)
        slot_hosted = piece_hosted[self.slot_rows]
        s.own_slots = np.flatnonzero(slot_hosted)  # positions in slot_rows of the hosted ranks' slot pieces
        s.own_slot_at = np.searchsorted(s.piece_rows, self.slot_rows[s.own_slots])  # and in s.piece_rows
        s.held = np.zeros(len(self.cat), dtype=bool)  # tensors a hosted trainer rank holds part of
        held_rows = s.hosted[self.seg.holder_rank]
        s.held[self.seg.points[self.seg.holder_seg[held_rows]] // self.seg.stride] = True
        c = self.fixed_chunks
        feeder = np.where(c["stage"] == 1, c["src"], c["src"][np.maximum(self._fixed_origin(), 0)])
        keep = s.hosted[c["src"]] | s.hosted[c["dst"]] | s.hosted[feeder]
        s.fixed_chunks = c[keep]
        s.fixed_keys = self.fixed_keys[keep] if self.fixed_keys is not None else None
        self._scopes[key] = s
        return s

    def _fixed_origin(self) -> np.ndarray:
        """The stage-1 chunk feeding each placement-free chunk (computed at the first rank plan)."""
        if self._origin is None:
            self._origin = chunk_origins(self.fixed_chunks)
        return self._origin


class _Scope:
    """Plan ranks' share of a builder's tables (see PlanBuilder.rank_plan)."""

    ranks: tuple[int, ...]
    hosted: np.ndarray  # [plan ranks] bool
    piece_rows: np.ndarray  # rows of the builder's pieces that are the hosted ranks'
    own_slots: np.ndarray  # their expert-slot pieces, as positions in slot_rows
    own_slot_at: np.ndarray  # where those pieces are in piece_rows
    held: np.ndarray  # [tensors] some hosted trainer rank holds part of it
    fixed_chunks: np.ndarray
    fixed_keys: np.ndarray | None


def _expert_tensors(cat: Catalog, layers: list[int], num_experts: int) -> np.ndarray:
    """``[MoE layers, experts, k]``: the ids of each routed expert's tensors (its projections, and their
    FP8 scales where the engine holds them), in catalog order."""
    layer_of = np.array([t.layer for t in cat.tensors], dtype=np.int64)
    expert = cat.table.expert
    ids = np.flatnonzero(expert >= 0)
    position = {layer: k for k, layer in enumerate(layers)}
    moe = np.array([position.get(int(x), -1) for x in layer_of[ids]], dtype=np.int64)
    order = np.lexsort((ids, expert[ids], moe))
    ids = ids[order]
    per_expert = len(ids) // max(len(layers) * num_experts, 1)
    return ids.reshape(len(layers), num_experts, per_expert)


def _tables(templates: list[tuple[LocalTensor, ...]]):
    """Flatten every rank's local tensors (rank r uses ``templates[r]``) into plan tables;
    ranks sharing a template convert it once. Also the derived locals (``planners.quant``): each with
    the local of its rank it is computed from."""
    local_rank: list[int] = []
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    dtypes: list[str] = []
    piece_parts: list[np.ndarray] = []
    derived_parts: list[np.ndarray] = []
    converted: dict[int, tuple] = {}
    for rank, tensors in enumerate(templates):
        done = converted.get(id(tensors))
        if done is None:
            rows = [(i, p.tensor, p.lo, p.hi, p.base, p.dim, p.off) for i, t in enumerate(tensors) for p in t.pieces]
            rel = np.array(rows, dtype=PIECE_DTYPE) if rows else np.zeros(0, PIECE_DTYPE)
            position = {t.name: i for i, t in enumerate(tensors)}
            derived = np.array([(i, position[t.source]) for i, t in enumerate(tensors) if t.source],
                               dtype=DERIVED_DTYPE).reshape(-1)
            done = converted[id(tensors)] = (rel, [t.name for t in tensors], [t.shape for t in tensors],
                                             [t.dtype for t in tensors], derived)
        rel, t_names, t_shapes, t_dtypes, derived = done
        shifted = rel.copy()
        shifted["local"] += len(names)
        piece_parts.append(shifted)
        if len(derived):
            moved = derived.copy()
            moved["local"] += len(names)
            moved["source"] += len(names)
            derived_parts.append(moved)
        local_rank += [rank] * len(t_names)
        names += t_names
        shapes += t_shapes
        dtypes += t_dtypes
    pieces = np.concatenate(piece_parts) if piece_parts else np.zeros(0, PIECE_DTYPE)
    derived = np.concatenate(derived_parts) if derived_parts else np.zeros(0, DERIVED_DTYPE)
    return np.asarray(local_rank, dtype=np.int32), names, shapes, dtypes, pieces, derived


class _Segments:
    """Trainer segments of every logical tensor and their holders.

    Cut points are encoded as ``tensor * stride + index`` in the sorted array ``points``; segment
    s is ``[points[s], points[s+1])``. Holders are rows sorted by segment (``holder_*``), with
    ``first[s]:first[s+1]`` the holders of segment s.
    """

    def __init__(self, cat: Catalog, tp: np.ndarray, ranks: np.ndarray, devices: np.ndarray) -> None:
        self.stride = max((t.shape[t.split_dim] for t in cat.tensors), default=0) + 1
        t = tp["tensor"].astype(np.int64) * self.stride
        self.points = np.unique(np.concatenate([t + tp["lo"], t + tp["hi"]]))
        s0 = np.searchsorted(self.points, t + tp["lo"])
        s1 = np.searchsorted(self.points, t + tp["hi"])
        count = s1 - s0
        piece = np.repeat(np.arange(len(tp)), count)
        seg = np.repeat(s0, count) + _ramp(count)
        order = np.lexsort((ranks[piece], seg))
        piece, seg = piece[order], seg[order]
        self.holder_seg = seg
        self.holder_rank = ranks[piece].astype(np.int64)
        self.holder_local = tp["local"][piece].astype(np.int64)
        self.holder_base = tp["base"][piece]
        self.holder_dim = tp["dim"][piece]
        start = self.points[seg] % self.stride
        self.holder_off = tp["off"][piece] + start - tp["lo"][piece]  # offset at the segment's start
        self.holder_device = devices[self.holder_rank]
        self.first = np.searchsorted(seg, np.arange(len(self.points) + 1))
        self._by_device: tuple[np.ndarray, np.ndarray] | None = None

    def by_device(self, n_dev: int) -> tuple[np.ndarray, np.ndarray]:
        """Holder rows sorted by (segment, device): the sorted keys and the rows (computed once)."""
        if self._by_device is None:
            key = self.holder_seg * n_dev + self.holder_device
            order = np.argsort(key, kind="stable")
            self._by_device = key[order], order
        return self._by_device


def _ramp(count: np.ndarray) -> np.ndarray:
    """``[0..count[0]-1, 0..count[1]-1, ...]``."""
    total = int(count.sum())
    starts = np.repeat(np.cumsum(count) - count, count)
    return np.arange(total) - starts


class _Cuts:
    """Inference pieces cut at segment boundaries, grouped into deliveries (sorted by delivery)."""

    seg: np.ndarray
    tensor: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    rank: np.ndarray
    local: np.ndarray
    base: np.ndarray
    dim: np.ndarray
    off: np.ndarray
    delivery: np.ndarray  # delivery id, ascending
    local_holder: np.ndarray  # holder row on the same device, or -1


def _cuts(cat, seg: _Segments, ip: np.ndarray, ranks: np.ndarray, devices, gpn,
          spans: tuple[np.ndarray, np.ndarray] | None = None) -> _Cuts:
    """``spans``: each piece's first and past-last segment, where the caller knows them."""
    t = ip["tensor"].astype(np.int64) * seg.stride
    if spans is None:
        s0 = np.searchsorted(seg.points, t + ip["lo"], side="right") - 1
        s1 = np.searchsorted(seg.points, t + ip["hi"], side="left")
    else:
        s0, s1 = spans
    count = s1 - s0
    bad = (s0 < 0) | (count < 1)
    bad[~bad] |= seg.points[s0[~bad]] // seg.stride != ip["tensor"][~bad]
    if bad.any():
        p = ip[np.flatnonzero(bad)[0]]
        raise PlanBuildError(f"no trainer rank holds {cat[int(p['tensor'])].name}[{p['lo']}:{p['hi']}]")
    piece = np.repeat(np.arange(len(ip)), count)
    s = np.repeat(s0, count) + _ramp(count)
    if (seg.first[s + 1] == seg.first[s]).any():
        p = ip[piece[np.flatnonzero(seg.first[s + 1] == seg.first[s])[0]]]
        raise PlanBuildError(f"no trainer rank holds part of {cat[int(p['tensor'])].name}[{p['lo']}:{p['hi']}]")
    c = _Cuts()
    c.tensor = ip["tensor"][piece].astype(np.int64)
    origin = c.tensor * seg.stride
    c.lo = np.maximum(ip["lo"][piece], seg.points[s] - origin)
    c.hi = np.minimum(ip["hi"][piece], seg.points[s + 1] - origin)
    c.seg = s
    c.rank = ranks[piece].astype(np.int64)
    c.local = ip["local"][piece].astype(np.int64)
    c.base = ip["base"][piece]
    c.dim = ip["dim"][piece]
    c.off = ip["off"][piece] + c.lo - ip["lo"][piece]
    device = devices[c.rank]
    group = device // gpn  # receiving group: the engine ranks of one node, whatever their engine

    # deliveries: equal (segment, range, receiving group)
    order = np.lexsort((c.rank, group, c.hi, c.lo, c.seg))
    for name in ("tensor", "lo", "hi", "seg", "rank", "local", "base", "dim", "off"):
        setattr(c, name, getattr(c, name)[order])
    group, device = group[order], device[order]
    new = np.r_[True, (np.diff(c.seg) != 0) | (np.diff(c.lo) != 0) | (np.diff(c.hi) != 0) | (np.diff(group) != 0)]
    c.delivery = np.cumsum(new) - 1

    # same-device holders
    n_dev = int(devices.max()) + 1
    hkey, hsort = seg.by_device(n_dev)
    ckey = c.seg * n_dev + device
    pos = np.searchsorted(hkey, ckey)
    pos = np.minimum(pos, len(hsort) - 1)
    hit = hkey[pos] == ckey
    c.local_holder = np.where(hit, hsort[pos], -1)
    return c


def _route(cat: Catalog, seg: _Segments, c: _Cuts, devices: np.ndarray, gpn: int, links: Links,
           busy: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Chunks for the cuts ``c``, and every rank's (out, in) busy seconds after them; ``busy``: where
    earlier routing left them (the placement-free tensors, routed once, before the experts)."""
    n_ranks = len(devices)
    if not len(c.tensor):
        return np.zeros(0, CHUNK_DTYPE), busy if busy is not None else (np.zeros(n_ranks), np.zeros(n_ranks))
    inv_bw = 1.0 / links.bandwidths()
    nbytes = (c.hi - c.lo) * cat.table.row_bytes[c.tensor]
    starts = np.r_[0, np.flatnonzero(np.diff(c.delivery)) + 1]
    n_dest = np.diff(np.r_[starts, len(c.delivery)])
    n_holders = seg.first[c.seg + 1] - seg.first[c.seg]
    has_local = np.zeros(len(starts), dtype=bool)
    np.logical_or.at(has_local, c.delivery, c.local_holder >= 0)
    parts: list[np.ndarray] = []

    # Local copies, wherever a destination's GPU holds the bytes.
    m = c.local_holder >= 0
    parts.append(_stage1_rows(seg, c, np.flatnonzero(m), c.local_holder[m], nbytes, devices, gpn))

    # Deliveries with nothing to choose: one holder, one destination, no local copy.
    simple = (n_dest == 1) & ~has_local & (n_holders[starts] == 1)
    rows = starts[simple]
    parts.append(_stage1_rows(seg, c, rows, seg.first[c.seg[rows]], nbytes, devices, gpn))
    out_busy = np.zeros(n_ranks) if busy is None else busy[0].copy()
    in_busy = np.zeros(n_ranks) if busy is None else busy[1].copy()
    if len(parts[-1]):
        p = parts[-1]
        cost = p["nbytes"] * inv_bw[p["link"]]
        out_busy += np.bincount(p["src"], weights=cost, minlength=n_ranks)
        in_busy += np.bincount(p["dst"], weights=cost, minlength=n_ranks)

    # The rest: greedy, largest first.
    rest = np.flatnonzero(~simple)
    rest = rest[np.argsort(-nbytes[starts[rest]], kind="stable")]
    parts.extend(_greedy(seg, c, starts, n_dest, rest, nbytes, devices, gpn, inv_bw, out_busy, in_busy))

    chunks = np.concatenate([p for p in parts if len(p)]) if any(len(p) for p in parts) else np.zeros(0, CHUNK_DTYPE)
    return chunks, (out_busy, in_busy)


def _mix(*keys: np.ndarray) -> np.ndarray:
    """A well-spread 63-bit hash of integer columns (splitmix64's finalizer over their combination):
    the same for the same values, wherever and with whatever else it is computed."""
    h = np.zeros(len(keys[0]), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            h = (h ^ np.asarray(k).astype(np.uint64)) * np.uint64(0x9E3779B97F4A7C15)
            h ^= h >> np.uint64(31)
            h *= np.uint64(0xBF58476D1CE4E5B9)
            h ^= h >> np.uint64(29)
    return (h >> np.uint64(1)).astype(np.int64)


def _pick_holder(seg: _Segments, segment: np.ndarray, node_of_dest: np.ndarray, choice: np.ndarray, node: np.ndarray,
                 n_holders: int) -> np.ndarray:
    """Holder rows for cuts of ``segment``: the ``choice``-th (modulo) of the holders on the destination's
    node where there are any (NVLink), else of all its holders."""
    first = seg.first[segment]
    j = np.arange(n_holders)  # holders per segment are few (data-parallel replicas of one shard)
    valid = j < (seg.first[segment + 1] - first)[:, None]
    rows = np.minimum(first[:, None] + j, len(seg.holder_rank) - 1)
    near = valid & (node[seg.holder_rank[rows]] == node_of_dest[:, None])
    pool = np.where(near.any(axis=1)[:, None], near, valid)
    target = choice % pool.sum(axis=1)
    return first + np.argmax(np.cumsum(pool, axis=1) > target[:, None], axis=1)


def _first_holders(seg: _Segments, c: _Cuts, n_ranks: int) -> np.ndarray:
    """Per segment, the holder (index among its holders) its deliveries start from, chosen once per job
    so the holders of every set send about equal bytes: segments largest first, each starting at the
    holder that has sent least so far, its deliveries (counted in ``c``, the initial placement's) then
    taking the holders in turn. Placement-free, so every rank derives the same."""
    out = np.zeros(len(seg.points), np.int64)
    starts = np.r_[0, np.flatnonzero(np.diff(c.delivery)) + 1] if len(c.delivery) else np.zeros(0, np.int64)
    segment = c.seg[starts]
    count = np.bincount(segment, minlength=len(seg.points))
    size = np.bincount(segment, weights=(c.hi - c.lo)[starts], minlength=len(seg.points))
    n_holders = seg.first[1:] - seg.first[:-1]
    busy = np.zeros(n_ranks)
    for s in np.flatnonzero((count > 0) & (n_holders > 1))[np.argsort(-size[(count > 0) & (n_holders > 1)], kind="stable")]:
        holders = seg.holder_rank[seg.first[s]:seg.first[s + 1]]
        k, n = int(count[s]), len(holders)
        start = int(np.argmin(busy[holders]))
        each = size[s] / k
        turns = np.arange(k)
        np.add.at(busy, holders[(start + turns) % n], each)
        out[s] = start
    return out


def _route_by_rule(seg: _Segments, c: _Cuts, nbytes: np.ndarray, devices: np.ndarray, gpn: int,
                   links: Links, first_holder: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Chunks for the cuts ``c`` (the routed experts' slots), each delivery routed on its own: a
    destination whose GPU holds the bytes copies them and feeds the rest of its group in stage 2;
    otherwise a destination picked by a hash of the delivery is its entry, fed by a holder picked the
    same way (one on its node where there is one). Those whose own link from a holder is as fast as
    the entry's take their own stage-1 copy; the rest get stage 2 from the entry. A delivery's route
    depends on the delivery alone, so a rank routes only the deliveries it takes part in and gets
    exactly the chunks a whole-job plan gives it. Also returns each chunk's *feeder*: the holder
    whose stage-1 send brings its bytes (for stage 2, the entry's)."""
    if not len(c.tensor):
        return np.zeros(0, CHUNK_DTYPE), np.zeros(0, np.int64)
    inv_bw = 1.0 / links.bandwidths()
    node = devices // gpn
    starts = np.r_[0, np.flatnonzero(np.diff(c.delivery)) + 1]
    n_dest = np.diff(np.r_[starts, len(c.delivery)])
    of = np.repeat(np.arange(len(starts)), n_dest)  # each cut row's delivery
    local = c.local_holder >= 0
    first_local = np.full(len(starts), -1, np.int64)
    rows_local = np.flatnonzero(local)
    first_local[of[rows_local[::-1]]] = rows_local[::-1]  # the first local row of each delivery
    dest_node = node[c.rank]
    n_holders = int((seg.first[c.seg + 1] - seg.first[c.seg]).max(initial=0))
    key = _mix(c.tensor[starts], c.lo[starts], c.hi[starts], dest_node[starts])
    entry = np.where(first_local >= 0, first_local, starts + key % n_dest)
    fed_locally = first_local >= 0
    # the entry's holder, where no destination holds the bytes
    remote_entry = entry[~fed_locally]
    entry_holder = np.full(len(starts), -1, np.int64)
    # a segment's deliveries take its holders in turn, from the one _first_holders picked for it: each
    # holder sends an equal share of every segment, whichever nodes need it
    segment = c.seg[remote_entry]
    turn = np.arange(len(segment)) - np.searchsorted(segment, segment)  # deliveries are sorted by segment
    entry_holder[~fed_locally] = _pick_holder(seg, segment, dest_node[remote_entry], first_holder[segment] + turn, node,
                                              n_holders)
    holder_near = np.zeros(len(starts), dtype=bool)
    holder_near[~fed_locally] = node[seg.holder_rank[entry_holder[~fed_locally]]] == dest_node[remote_entry]
    holder_inv = np.where(holder_near, inv_bw[SAME_NODE], inv_bw[CROSS_NODE])
    # every other row: its own stage-1 copy (local, or from a holder as close as the entry), or stage 2
    row_entry = entry[of]
    others = np.flatnonzero(np.arange(len(c.delivery)) != row_entry)
    same_dev = devices[c.rank[others]] == devices[c.rank[row_entry[others]]]
    own_inv = np.where(same_dev, inv_bw[SAME_DEVICE], inv_bw[SAME_NODE])
    remote_others = others[~local[others]]
    direct = ~fed_locally[of[remote_others]] & (own_inv[~local[others]] >= holder_inv[of[remote_others]])
    own = remote_others[direct]
    fanned = remote_others[~direct]
    own_holder = _pick_holder(seg, c.seg[own], dest_node[own], _mix(c.seg[own]) + c.rank[own], node, n_holders)
    # stage-1 rows: local copies (every row with a same-device holder), remote entries, own copies
    s1_rows = np.concatenate([rows_local, remote_entry, own])
    s1_holders = np.concatenate([c.local_holder[rows_local], entry_holder[~fed_locally], own_holder])
    stage1 = _stage1_rows(seg, c, s1_rows, s1_holders, nbytes, devices, gpn)
    stage2 = _stage2_rows(c, row_entry[fanned], fanned, nbytes, devices, gpn)
    feeder_of_delivery = np.where(fed_locally, seg.holder_rank[np.maximum(c.local_holder[np.maximum(first_local, 0)], 0)],
                                  seg.holder_rank[np.maximum(entry_holder, 0)])
    feeder = np.concatenate([seg.holder_rank[s1_holders], feeder_of_delivery[of[fanned]]])
    return np.concatenate([stage1, stage2]), feeder


def _stage1_busy(chunks: np.ndarray, n_ranks: int, links: Links) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's (out, in) seconds over its links in stage 1 of ``chunks`` (local copies are free)."""
    s1 = chunks[(chunks["stage"] == 1) & (chunks["link"] != SAME_DEVICE)]
    cost = s1["nbytes"] / links.bandwidths()[s1["link"]]
    out = np.bincount(s1["src"], weights=cost, minlength=n_ranks), np.bincount(s1["dst"], weights=cost, minlength=n_ranks)
    return out[0].astype(np.float64), out[1].astype(np.float64)  # (an empty bincount is integer)


_ORDER = ("stage", "src", "dst", "tensor", "lo")  # the plan's chunk order, most significant first


def _sorted_chunks(parts: list[np.ndarray]) -> np.ndarray:
    """Chunks in the plan's order: by stage, sender, receiver, tensor, offset (stable)."""
    chunks = np.concatenate(parts) if parts else np.zeros(0, CHUNK_DTYPE)
    order = np.lexsort(tuple(chunks[f] for f in reversed(_ORDER)))
    return chunks[order]


class _ChunkKeys:
    """The plan's chunk order as one int64 per chunk, the five fields packed at widths fixed by the
    job (ranks, tensors, the longest split dimension), so keys of chunks routed apart compare."""

    def __init__(self, n_ranks: int, cat: Catalog) -> None:
        longest = max((t.shape[t.split_dim] for t in cat.tensors), default=1)
        widths = [2, n_ranks, n_ranks, len(cat), longest]
        self.bits = [max(int(w), 1).bit_length() for w in widths]
        self.usable = sum(self.bits) <= 63

    def __call__(self, chunks: np.ndarray) -> np.ndarray:
        key = np.zeros(len(chunks), np.int64)
        for f, b in zip(_ORDER, self.bits):
            key <<= b
            key |= chunks[f]
        return key

    def merge(self, fixed: np.ndarray, fixed_key: np.ndarray, moving: np.ndarray) -> np.ndarray:
        """``fixed`` (in the plan's order, keys ``fixed_key``) with ``moving`` merged in: the order a
        stable sort of both gives, without sorting ``fixed`` again."""
        if not self.usable:
            return _sorted_chunks([fixed, moving])
        key = self(moving)
        order = np.argsort(key, kind="stable")
        return np.insert(fixed, np.searchsorted(fixed_key, key[order], side="right"), moving[order])


def _stage1_rows(seg: _Segments, c: _Cuts, rows: np.ndarray, holders: np.ndarray, nbytes, devices, gpn) -> np.ndarray:
    """Stage-1 chunks from holder rows ``holders`` into cut rows ``rows``."""
    out = np.zeros(len(rows), dtype=CHUNK_DTYPE)
    out["stage"] = 1
    out["src"] = seg.holder_rank[holders]
    out["dst"] = c.rank[rows]
    out["tensor"] = c.tensor[rows]
    out["lo"], out["hi"] = c.lo[rows], c.hi[rows]
    out["src_local"] = seg.holder_local[holders]
    out["src_base"] = seg.holder_base[holders]
    out["src_dim"] = seg.holder_dim[holders]
    seg_start = seg.points[c.seg[rows]] - c.tensor[rows] * seg.stride
    out["src_off"] = seg.holder_off[holders] + c.lo[rows] - seg_start
    out["dst_local"], out["dst_base"], out["dst_dim"], out["dst_off"] = c.local[rows], c.base[rows], c.dim[rows], c.off[rows]
    out["nbytes"] = nbytes[rows]
    out["link"] = link_class(devices[out["src"]], devices[out["dst"]], gpn)
    return out


def _greedy(seg, c, starts, n_dest, deliveries, nbytes, devices, gpn, inv_bw, out_busy, in_busy) -> list[np.ndarray]:
    """Route deliveries that have a choice of entry receiver or sender, one at a time."""
    dev = devices.tolist()
    node = [d // gpn for d in dev]
    inv_node, inv_nic = float(inv_bw[SAME_NODE]), float(inv_bw[CROSS_NODE])
    out_b, in_b = out_busy.tolist(), in_busy.tolist()
    rank = c.rank.tolist()
    local_holder = c.local_holder.tolist()
    hrank = seg.holder_rank.tolist()
    first = seg.first.tolist()
    cseg = c.seg.tolist()
    nb = nbytes.tolist()
    s1_rows, s1_holders, s2_src, s2_dst = [], [], [], []
    inv_dev = float(inv_bw[SAME_DEVICE])  # relaying pays only over links faster than the holders'

    def send_from_best_holder(i: int, s: int, size: float) -> bool:
        """Stage 1 into cut row i from the holder that finishes it soonest; True if that holder is remote."""
        d_rank = rank[i]
        d_node = node[d_rank]
        best, best_t, best_inv = -1, 0.0, inv_nic
        for h in range(first[s], first[s + 1]):
            inv = inv_node if node[hrank[h]] == d_node else inv_nic
            finish = out_b[hrank[h]] + size * inv
            if best < 0 or finish < best_t:
                best, best_t, best_inv = h, finish, inv
        out_b[hrank[best]] = best_t
        in_b[d_rank] += size * best_inv
        s1_rows.append(i)
        s1_holders.append(best)
        return best_inv == inv_nic

    for d in deliveries.tolist():
        a = int(starts[d])
        size = nb[a]
        entry = -1
        rest = []
        for i in range(a, a + int(n_dest[d])):
            if local_holder[i] >= 0:
                if entry < 0:
                    entry = i  # already counted among local copies
            else:
                rest.append(i)
        if entry < 0:
            entry = rest[0] if len(rest) == 1 else min(rest, key=lambda i: in_b[rank[i]])
            rest.remove(entry)
            remote = send_from_best_holder(entry, cseg[a], size)
            holder_inv = inv_nic if remote else inv_node
            direct = [i for i in rest if (inv_dev if dev[rank[i]] == dev[rank[entry]] else inv_node) >= holder_inv]
            for i in direct:  # the holders are as close as the entry: a copy of its own from them
                send_from_best_holder(i, cseg[a], size)
            rest = [i for i in rest if i not in direct]
        for i in rest:
            s2_src.append(entry)
            s2_dst.append(i)
    stage1 = _stage1_rows(seg, c, np.array(s1_rows, dtype=np.int64), np.array(s1_holders, dtype=np.int64),
                          nbytes, devices, gpn)
    out_busy[:], in_busy[:] = out_b, in_b  # the caller's arrays: where this routing left every rank
    return [stage1, _stage2_rows(c, np.array(s2_src, dtype=np.int64), np.array(s2_dst, dtype=np.int64), nbytes, devices, gpn)]


def _stage2_rows(c: _Cuts, src: np.ndarray, dst: np.ndarray, nbytes, devices, gpn) -> np.ndarray:
    """Stage-2 chunks from the cut rows ``src`` (which received the bytes) to cut rows ``dst``."""
    out = np.zeros(len(src), dtype=CHUNK_DTYPE)
    out["stage"] = 2
    out["src"], out["dst"] = c.rank[src], c.rank[dst]
    out["tensor"], out["lo"], out["hi"] = c.tensor[dst], c.lo[dst], c.hi[dst]
    out["src_local"], out["src_base"], out["src_dim"], out["src_off"] = c.local[src], c.base[src], c.dim[src], c.off[src]
    out["dst_local"], out["dst_base"], out["dst_dim"], out["dst_off"] = c.local[dst], c.base[dst], c.dim[dst], c.off[dst]
    out["nbytes"] = nbytes[dst]
    out["link"] = link_class(devices[out["src"]], devices[out["dst"]], gpn)
    return out
