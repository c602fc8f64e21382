"""The sync plan as data: chunk and piece tables, validation, byte totals, cost, JSON.

A *chunk* moves indices ``[lo, hi)`` of one logical tensor (along its split dimension) from a
block of a source local tensor to a block of a destination local tensor. Stage 1 chunks go from
a trainer rank to an inference rank (a local copy when both share a device); stage 2 chunks go
from an inference rank that received the bytes in stage 1 to the other ranks of its receiving
group. Chunks are ordered by ``(stage, src, dst, tensor, lo)``: both ends of a pair derive the
same order, so a pair's flat bucket holds its chunks back to back (``bucket_offsets``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from planners.cost import CROSS_NODE, LINK_NAMES, SAME_DEVICE, SAME_NODE, Links, stage_time
from planners.errors import PlanError
from planners.models import LogicalTensor
from planners.models.catalog import TensorTable
from planners.eplb.placement import EnginePlacements, Placement, placement_from_phy2log

__all__ = ["SyncPlan", "PlanError", "CHUNK_DTYPE", "PIECE_DTYPE", "DERIVED_DTYPE", "Transfer"]

CHUNK_DTYPE = np.dtype([
    ("stage", "i1"), ("src", "i4"), ("dst", "i4"), ("tensor", "i4"), ("lo", "i8"), ("hi", "i8"),
    ("src_local", "i4"), ("src_base", "i8"), ("src_dim", "i8"), ("src_off", "i8"),
    ("dst_local", "i4"), ("dst_base", "i8"), ("dst_dim", "i8"), ("dst_off", "i8"),
    ("nbytes", "i8"), ("link", "i1"),
])
PIECE_DTYPE = np.dtype([
    ("local", "i4"), ("tensor", "i4"), ("lo", "i8"), ("hi", "i8"), ("base", "i8"), ("dim", "i8"), ("off", "i8"),
])
# a local computed from another of its rank (planners.quant: FP8 values or scales, quantized from ``source``)
DERIVED_DTYPE = np.dtype([("local", "i4"), ("source", "i4")])


@dataclass(frozen=True)
class Transfer:
    """All chunks one stage moves from ``src`` to ``dst``, in bucket order."""

    stage: int
    src: int
    dst: int
    chunks: np.ndarray  # CHUNK_DTYPE rows

    @property
    def nbytes(self) -> int:
        return int(self.chunks["nbytes"].sum())


@dataclass
class SyncPlan:
    tensors: list[LogicalTensor]
    local_rank: np.ndarray  # [locals] global rank holding each local tensor
    local_name: list[str]
    local_shape: list[tuple[int, ...]]
    local_dtype: list[str]
    pieces: np.ndarray  # PIECE_DTYPE: what every local tensor is made of (both sides)
    chunks: np.ndarray  # CHUNK_DTYPE, ordered by (stage, src, dst, tensor, lo)
    devices: np.ndarray  # [ranks] device id of every global rank
    num_trainer: int
    gpus_per_node: int
    links: Links = field(default_factory=Links)
    meta: dict[str, Any] = field(default_factory=dict)
    placement: Placement | EnginePlacements | None = None  # the expert placement the engines get with these weights
    # the plan ranks whose part this is (PlanBuilder.rank_plan): the chunks they send or receive or feed
    # in stage 1, and their own pieces; None for the whole job's plan
    scope: tuple[int, ...] | None = None
    # locals computed from others of their rank (FP8 engines, planners.quant): on a trainer rank before the
    # bytes move, on an engine rank once they have arrived
    derived: np.ndarray = field(default_factory=lambda: np.zeros(0, DERIVED_DTYPE))
    # the placement-free chunks this plan's were merged from (planners.build.PlanBuilder): plans holding the
    # same object hold those chunks alike and in the same order, whatever their expert placements (an
    # executor of one keeps the other's copy programs for them without comparing). Not serialized.
    fixed_part: np.ndarray | None = field(default=None, repr=False, compare=False)

    # -- shape of the job ---------------------------------------------------------------
    @property
    def num_ranks(self) -> int:
        return len(self.devices)

    @property
    def inference_ranks(self) -> range:
        return range(self.num_trainer, self.num_ranks)

    @cached_property
    def table(self) -> TensorTable:
        """The tensors' sizes as arrays by tensor id (a builder hands over its catalog's)."""
        return TensorTable.of(self.tensors)

    def placement_of(self, rank: int) -> Placement | None:
        """The expert placement inference rank ``rank`` (global) serves: its engine's own, where each
        engine has one. Engines are the slowest coordinate of the inference ranks."""
        if self.placement is None or self.placement.engines is None:
            return self.placement
        per_engine = len(self.inference_ranks) // len(self.placement.engines)
        return self.placement.of_engine((rank - self.num_trainer) // per_engine)

    def locals_of(self, rank: int) -> np.ndarray:
        return np.flatnonzero(self.local_rank == rank)

    def same_fixed_part(self, other: "SyncPlan") -> bool:
        """Whether both plans were merged from one builder's placement-free chunks (see ``fixed_part``)."""
        return self.fixed_part is not None and self.fixed_part is other.fixed_part

    def same_locals(self, other: "SyncPlan") -> bool:
        """Whether every rank holds the same local tensors (names, shapes, dtypes) in both plans, as after
        a new expert placement: ends checked against one fit the other."""
        same = lambda a, b: a is b or a == b  # noqa: E731  (a builder's plans share their tables)
        return (same(self.local_name, other.local_name) and same(self.local_shape, other.local_shape)
                and same(self.local_dtype, other.local_dtype) and np.array_equal(self.local_rank, other.local_rank))

    # -- iteration ------------------------------------------------------------------------
    def transfers(self, stage: int | None = None) -> Iterator[Transfer]:
        """Chunks grouped by (stage, src, dst), in plan order."""
        c = self.chunks if stage is None else self.chunks[self.chunks["stage"] == stage]
        if len(c) == 0:
            return
        key = np.stack([c["stage"].astype(np.int64), c["src"], c["dst"]], axis=1)
        cuts = np.flatnonzero(np.any(key[1:] != key[:-1], axis=1)) + 1
        for part in np.split(c, cuts):
            yield Transfer(int(part["stage"][0]), int(part["src"][0]), int(part["dst"][0]), part)

    def bucket_offsets(self) -> np.ndarray:
        """Byte offset of every chunk in its (stage, src, dst) flat buffer."""
        c = self.chunks
        out = np.cumsum(c["nbytes"]) - c["nbytes"]
        if len(c):
            key = (c["stage"].astype(np.int64) * self.num_ranks + c["src"]) * self.num_ranks + c["dst"]
            starts = np.r_[0, np.flatnonzero(key[1:] != key[:-1]) + 1]
            first = np.repeat(out[starts], np.diff(np.r_[starts, len(c)]))
            out = out - first
        return out

    # -- totals ---------------------------------------------------------------------------
    def bytes_by_stage(self) -> dict[int, int]:
        return {s: int(self.chunks["nbytes"][self.chunks["stage"] == s].sum()) for s in (1, 2)}

    def bytes_by_link(self, stage: int | None = None) -> dict[str, int]:
        c = self.chunks if stage is None else self.chunks[self.chunks["stage"] == stage]
        return {LINK_NAMES[k]: int(c["nbytes"][c["link"] == k].sum()) for k in (SAME_DEVICE, SAME_NODE, CROSS_NODE)}

    def bytes_out(self) -> np.ndarray:
        """Bytes each global rank sends over the network (local copies excluded)."""
        m = self.chunks["link"] != SAME_DEVICE
        return np.bincount(self.chunks["src"][m], weights=self.chunks["nbytes"][m], minlength=self.num_ranks).astype(np.int64)

    def bytes_in(self) -> np.ndarray:
        m = self.chunks["link"] != SAME_DEVICE
        return np.bincount(self.chunks["dst"][m], weights=self.chunks["nbytes"][m], minlength=self.num_ranks).astype(np.int64)

    def traffic_matrix(self) -> np.ndarray:
        """[ranks, ranks] bytes from each sender to each receiver, both stages, copies included."""
        n = self.num_ranks
        flat = np.bincount(self.chunks["src"].astype(np.int64) * n + self.chunks["dst"], weights=self.chunks["nbytes"],
                           minlength=n * n)
        return flat.reshape(n, n).astype(np.int64)

    # -- cost -----------------------------------------------------------------------------
    def stage_times(self) -> dict[int, float]:
        out = {}
        for s in (1, 2):
            c = self.chunks[self.chunks["stage"] == s]
            out[s] = stage_time(c["src"], c["dst"], c["nbytes"].astype(np.float64), c["link"], self.devices,
                                self.gpus_per_node, self.links)
        return out

    def predicted_time(self) -> float:
        self.whole("predicted_time()")
        return float(sum(self.stage_times().values()))

    def lower_bound(self) -> float:
        """Seconds no plan can beat: see ``planners.bounds``."""
        from planners.bounds import lower_bound

        self.whole("lower_bound()")
        return lower_bound(self)

    # -- validation -----------------------------------------------------------------------
    def whole(self, what: str) -> None:
        """Refuse ``what`` on a plan of some ranks only: it needs the whole job's."""
        if self.scope is not None:
            raise PlanError(f"{what} needs the whole job's plan (PlanBuilder.plan); this one holds ranks "
                            f"{list(self.scope)[:8]}'s part only (PlanBuilder.rank_plan)")

    def validate(self) -> "SyncPlan":
        """Prove every inference byte is written exactly once, from a rank that holds it."""
        from planners.validate import validate_plan

        self.whole("validate()")
        validate_plan(self)
        return self

    # -- simulation -----------------------------------------------------------------------
    def simulate(self, full_weights: dict[str, Any]) -> dict[int, dict[str, np.ndarray]]:
        """Run the plan in memory on full HF weights; ``{inference global rank: {vLLM name: array}}``."""
        from planners.simulate import simulate

        self.whole("simulate()")
        return simulate(self, full_weights)

    # -- serialization --------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "rlsync-plan/1",
            "meta": self.meta,
            "num_trainer": self.num_trainer,
            "gpus_per_node": self.gpus_per_node,
            "links": vars(self.links),
            "devices": self.devices.tolist(),
            "tensors": [[t.name, list(t.shape), t.dtype, t.split_dim, t.layer, t.expert] for t in self.tensors],
            "locals": {
                "rank": self.local_rank.tolist(),
                "name": self.local_name,
                "shape": [list(s) for s in self.local_shape],
                "dtype": self.local_dtype,
            },
            "pieces": {k: self.pieces[k].tolist() for k in PIECE_DTYPE.names},
            "chunks": {k: self.chunks[k].tolist() for k in CHUNK_DTYPE.names},
            "phy2log": None if self.placement is None else self.placement.phy2log.tolist(),
            "scope": None if self.scope is None else list(self.scope),
            "derived": {k: self.derived[k].tolist() for k in DERIVED_DTYPE.names},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SyncPlan":
        if d.get("format") != "rlsync-plan/1":
            raise PlanError(f"not an rlsync plan (format={d.get('format')!r})")

        def table(cols: dict[str, list], dtype: np.dtype) -> np.ndarray:
            n = len(cols[dtype.names[0]])
            out = np.zeros(n, dtype=dtype)
            for k in dtype.names:
                out[k] = cols[k]
            return out

        return cls(
            tensors=[LogicalTensor(n, tuple(s), dt, sd, layer, e) for n, s, dt, sd, layer, e in d["tensors"]],
            local_rank=np.asarray(d["locals"]["rank"], dtype=np.int32),
            local_name=list(d["locals"]["name"]),
            local_shape=[tuple(s) for s in d["locals"]["shape"]],
            local_dtype=list(d["locals"]["dtype"]),
            pieces=table(d["pieces"], PIECE_DTYPE),
            chunks=table(d["chunks"], CHUNK_DTYPE),
            devices=np.asarray(d["devices"], dtype=np.int64),
            num_trainer=int(d["num_trainer"]),
            gpus_per_node=int(d["gpus_per_node"]),
            links=Links(**d["links"]),
            meta=dict(d["meta"]),
            placement=None if d.get("phy2log") is None else placement_from_phy2log(d["phy2log"]),
            scope=None if d.get("scope") is None else tuple(int(r) for r in d["scope"]),
            derived=table(d["derived"], DERIVED_DTYPE) if d.get("derived") else np.zeros(0, DERIVED_DTYPE),
        )

    def to_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def from_json(cls, path: str | Path) -> "SyncPlan":
        return cls.from_dict(json.loads(Path(path).read_text()))
