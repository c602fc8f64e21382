"""Parallel layouts of both sides and where their ranks live.

* :class:`TrainerLayout` -- Megatron-core: TP/CP/DP/PP for dense layers and ETP/EP/expert-DP/PP
  for experts, ordered by a string such as ``"tp-cp-ep-dp-pp"`` (fastest first).
* :class:`InferenceLayout` -- vLLM: engines (external DP) x DP x PP x TP, TP fastest; with expert
  parallelism the EP group of an engine's PP stage is its DP x TP ranks.
* :class:`Deployment` -- colocated or disaggregated, and how many GPUs a node has.

Global ranks of a sync job: trainer ranks ``0..T-1`` then inference ranks ``T..T+I-1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd
from typing import Annotated, Literal, Sequence

from pydantic import Field

from planners.errors import LayoutError
from planners.rankgrid import RankGrid

__all__ = [
    "TrainerLayout",
    "InferenceLayout",
    "Deployment",
    "Device",
    "TrainerCoords",
    "InferenceCoords",
    "vllm_pp_layers",
]


MAX_RANKS = 1 << 20  # GPUs of one job; beyond this a layout is a typo, and device tables would not fit
# A size of a layout. The job schema (``planners.job``) reads these annotations: the upper bound keeps absurd
# values from sizing tables; lower bounds are the layouts' own checks below, which name the field.
Size = Annotated[int, Field(le=MAX_RANKS)]


def _positive(owner: str, **values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise LayoutError(f"{owner}.{name} must be a positive integer, got {v!r}")


@dataclass(frozen=True)
class TrainerCoords:
    tp: int
    cp: int
    dp: int
    pp: int
    etp: int
    ep: int
    edp: int


@dataclass(frozen=True)
class TrainerLayout:
    """Megatron-core parallel degrees; ``dp=None`` picks the smallest DP that fits EP.

    ``first_stage_layers`` / ``last_stage_layers`` mirror Megatron's
    ``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``; ``vpp`` is
    Megatron's ``virtual_pipeline_model_parallel_size`` (interleaved schedule: each PP rank holds
    ``vpp`` model chunks, see :meth:`chunk_layers`; 1 = no virtual pipeline).
    """

    tp: Size = 1
    pp: Size = 1
    ep: Size = 1
    etp: Size | None = None
    cp: Size = 1
    dp: Size | None = None
    order: str = "tp-cp-ep-dp-pp"
    first_stage_layers: Size | None = None
    last_stage_layers: Size | None = None
    vocab_divisible_by: Size = 128
    vpp: Size = 1  # Megatron's virtual_pipeline_model_parallel_size (interleaved schedule); needs pp > 1

    def __post_init__(self) -> None:
        _positive("trainer", tp=self.tp, pp=self.pp, ep=self.ep, cp=self.cp)
        if self.etp is None:
            object.__setattr__(self, "etp", self.tp)
        _positive("trainer", etp=self.etp)
        if self.dp is None:
            dense = self.tp * self.cp * self.pp
            expert = self.etp * self.ep * self.pp
            lcm = dense * expert // gcd(dense, expert)
            object.__setattr__(self, "dp", lcm // dense)
        _positive("trainer", tp=self.tp, pp=self.pp, ep=self.ep, etp=self.etp, cp=self.cp, dp=self.dp,
                  vocab_divisible_by=self.vocab_divisible_by)
        tokens = self.order.lower().split("-")
        if sorted(tokens) != sorted(["tp", "cp", "ep", "dp", "pp"]):
            raise LayoutError(
                f"trainer.order must name each of tp, cp, ep, dp, pp once (e.g. 'tp-cp-ep-dp-pp'), got {self.order!r}"
            )
        if not tokens[-1] == "pp" and self.pp > 1 and self.edp != self.dp:
            raise LayoutError(
                "trainer.order: Megatron requires pp last in the order when expert-DP differs from DP"
            )
        expert_world = self.etp * self.ep * self.pp
        if self.world_size % expert_world:
            raise LayoutError(
                f"trainer: world size tp*cp*dp*pp = {self.world_size} is not divisible by "
                f"etp*ep*pp = {expert_world}; choose dp so that {self.tp * self.cp * self.pp}*dp is a multiple of {expert_world}"
            )
        for name in ("first_stage_layers", "last_stage_layers"):
            v = getattr(self, name)
            if v is not None:
                _positive("trainer", **{name: v})
                if self.pp == 1:
                    raise LayoutError(f"trainer.{name} needs pp > 1")
        _positive("trainer", vpp=self.vpp)
        if self.vpp > 1:
            if self.pp == 1:
                raise LayoutError(
                    f"trainer.vpp={self.vpp} needs pp > 1: Megatron's interleaved schedule splits each"
                    " pipeline stage into vpp model chunks"
                )
            for name in ("first_stage_layers", "last_stage_layers"):
                v = getattr(self, name)
                if v is not None and v % self.vpp:
                    raise LayoutError(
                        f"trainer.{name}={v} must be divisible by trainer.vpp={self.vpp}"
                        " (every model chunk of that stage gets the same number of layers)"
                    )
            if self.pp == 2 and self.first_stage_layers is not None and self.last_stage_layers is not None:
                raise LayoutError(
                    f"trainer.vpp={self.vpp} with both first_stage_layers and last_stage_layers needs pp > 2:"
                    " megatron-core (0.16.1 get_transformer_layer_offset) divides by the number of middle stages"
                )

    # -- sizes ---------------------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.dp * self.pp

    @property
    def edp(self) -> int:
        """Expert data-parallel size: replicas of each expert shard."""
        return self.world_size // (self.etp * self.ep * self.pp)

    # -- rank grids (Megatron's decoder and expert generators) ----------------------------
    def _grid(self, sizes: dict[str, int]) -> RankGrid:
        names = tuple(self.order.lower().split("-"))
        return RankGrid(names, tuple(sizes[n] for n in names))

    @property
    def dense_grid(self) -> RankGrid:
        return self._grid({"tp": self.tp, "cp": self.cp, "ep": 1, "dp": self.dp, "pp": self.pp})

    @property
    def expert_grid(self) -> RankGrid:
        return self._grid({"tp": self.etp, "cp": 1, "ep": self.ep, "dp": self.edp, "pp": self.pp})

    def coords(self, rank: int) -> TrainerCoords:
        d = self.dense_grid.coords(rank)
        e = self.expert_grid.coords(rank)
        return TrainerCoords(tp=d["tp"], cp=d["cp"], dp=d["dp"], pp=d["pp"], etp=e["tp"], ep=e["ep"], edp=e["dp"])

    def all_coords(self) -> list[TrainerCoords]:
        return [self.coords(r) for r in range(self.world_size)]

    # -- pipeline split --------------------------------------------------------------------
    def stage_layer_counts(self, num_layers: int) -> list[int]:
        """Layers of each PP stage: Megatron's even or first/last-uneven split (all chunks together)."""
        counts = [0] * self.pp
        middle = list(range(self.pp))
        rest = num_layers
        if self.first_stage_layers is not None:
            counts[0] = self.first_stage_layers
            middle.remove(0)
            rest -= self.first_stage_layers
        if self.last_stage_layers is not None:
            counts[-1] = self.last_stage_layers
            middle.remove(self.pp - 1)
            rest -= self.last_stage_layers
        if rest < 0 or (middle and (rest == 0 or rest % len(middle))) or (not middle and rest):
            raise LayoutError(
                f"trainer: {num_layers} layers do not split over pp={self.pp}"
                f" (first_stage_layers={self.first_stage_layers}, last_stage_layers={self.last_stage_layers});"
                " make the remaining layers (at least one per stage, as Megatron requires) divisible by the"
                " remaining stages"
            )
        for s in middle:
            counts[s] = rest // len(middle)
        if self.vpp > 1 and any(c % self.vpp for c in counts):
            raise LayoutError(
                f"trainer: {num_layers} layers over pp={self.pp} give {counts} layers per stage, not all"
                f" divisible by trainer.vpp={self.vpp}; num_layers must be divisible by pp*vpp = {self.pp * self.vpp}"
                " (or, with first_stage_layers/last_stage_layers, each stage's layers by vpp)"
            )
        return counts

    def chunk_layers(self, num_layers: int) -> list[list[range]]:
        """Global layer indices of each model chunk: ``[pp rank][virtual stage]``.

        Megatron's interleaved assignment (``get_transformer_layer_offset``): a stage's layers are split
        evenly over its ``vpp`` chunks; virtual stage ``v`` covers one chunk of every PP rank in order,
        so chunk ``v`` of PP rank ``p`` starts at ``v * (layers per virtual stage) + (chunk sizes of
        ranks < p)`` -- ``(v * pp + p) * num_layers / (pp * vpp)`` for an even split. Without VPP each
        rank has one chunk: its stage.
        """
        per_chunk = [c // self.vpp for c in self.stage_layer_counts(num_layers)]
        starts = [sum(per_chunk[:p]) for p in range(self.pp)]
        span = sum(per_chunk)
        return [[range(v * span + starts[p], v * span + starts[p] + per_chunk[p]) for v in range(self.vpp)]
                for p in range(self.pp)]

    def stage_layers(self, num_layers: int) -> list[Sequence[int]]:
        """Global layer indices of each PP stage (a range without VPP; with VPP its chunks' layers, in
        chunk order)."""
        chunks = self.chunk_layers(num_layers)
        if self.vpp == 1:
            return [c[0] for c in chunks]
        return [[i for r in c for i in r] for c in chunks]


def _ranges(counts: list[int]) -> list[range]:
    out, start = [], 0
    for c in counts:
        out.append(range(start, start + c))
        start += c
    return out


def vllm_pp_layers(num_layers: int, pp: int) -> list[range]:
    """vLLM's default PP split: even, with the remainder given to the stages before the last."""
    if num_layers < pp:
        raise LayoutError(f"inference: {num_layers} layers cannot fill pp={pp} stages")
    counts = [num_layers // pp] * pp
    for i in range(2, num_layers % pp + 2):
        counts[-i] += 1
    return _ranges(counts)


@dataclass(frozen=True)
class InferenceCoords:
    engine: int
    dp: int
    pp: int
    tp: int

    def ep_rank(self, tp_size: int) -> int:
        """Rank in the EP group (DP x TP of one engine and PP stage); also the flattened MoE-TP rank."""
        return self.dp * tp_size + self.tp


@dataclass(frozen=True)
class InferenceLayout:
    """vLLM engines: ``engines`` x DP x PP x TP ranks, TP fastest."""

    tp: Size = 1
    pp: Size = 1
    dp: Size = 1
    enable_ep: bool = False
    engines: Size = 1
    vocab_padding: Size = 64
    # how the engine holds its weights: None (the model dtype) or "fp8_block" (vLLM's block FP8, 128x128
    # blocks, e4m3 with float32 weight_scale_inv; see planners.quant)
    quantization: Literal["fp8_block"] | None = None

    def __post_init__(self) -> None:
        _positive("inference", tp=self.tp, pp=self.pp, dp=self.dp, engines=self.engines, vocab_padding=self.vocab_padding)

    @property
    def engine_size(self) -> int:
        return self.dp * self.pp * self.tp

    @property
    def world_size(self) -> int:
        return self.engines * self.engine_size

    @property
    def grid(self) -> RankGrid:
        return RankGrid(("tp", "pp", "dp", "engine"), (self.tp, self.pp, self.dp, self.engines))

    @property
    def ep_size(self) -> int:
        """Size of an expert group: DP x TP with EP, 1 without."""
        return self.dp * self.tp if self.enable_ep else 1

    @property
    def moe_tp_size(self) -> int:
        """vLLM flattens DP into the MoE tensor-parallel group when EP is off."""
        return 1 if self.enable_ep else self.dp * self.tp

    def expert_slots(self, num_physical: int, group_rank: int) -> range:
        """Physical expert slots of EP rank ``group_rank``: vLLM's linear placement (``P // ep`` each,
        one more for the first ``P % ep`` ranks); every slot without EP."""
        if not self.enable_ep:
            return range(num_physical)
        base, rem = divmod(num_physical, self.ep_size)
        start = group_rank * base + min(group_rank, rem)
        return range(start, start + base + (group_rank < rem))

    def coords(self, rank: int) -> InferenceCoords:
        c = self.grid.coords(rank)
        return InferenceCoords(engine=c["engine"], dp=c["dp"], pp=c["pp"], tp=c["tp"])

    def all_coords(self) -> list[InferenceCoords]:
        return [self.coords(r) for r in range(self.world_size)]

    def tp_groups(self) -> list[list[int]]:
        return self.grid.groups("tp")

    def ep_groups(self) -> list[list[int]]:
        """EP groups (DP x TP within one engine and PP stage), in local inference ranks."""
        return self.grid.groups("tp-dp")


@dataclass(frozen=True)
class Device:
    node: int
    gpu: int


@dataclass(frozen=True)
class Deployment:
    """Where ranks run. Disaggregated: inference ranks on GPUs after the trainer's.
    Colocated: inference rank i shares the GPU of trainer rank i."""

    mode: Literal["colocated", "disaggregated"] = "disaggregated"
    gpus_per_node: Size = 8
    nodes: Size | None = None  # the most nodes the job may take (None: as many as it needs)

    def __post_init__(self) -> None:
        if self.mode not in ("colocated", "disaggregated"):
            raise LayoutError(f"deployment.mode must be 'colocated' or 'disaggregated', got {self.mode!r}")
        _positive("deployment", gpus_per_node=self.gpus_per_node)
        if self.nodes is not None:
            _positive("deployment", nodes=self.nodes)

    def check(self, trainer: TrainerLayout, inference: InferenceLayout) -> None:
        """Raise LayoutError unless both sides fit this deployment."""
        t, i = trainer, inference
        if self.mode == "colocated" and i.world_size > t.world_size:
            raise LayoutError(
                f"deployment.mode=colocated needs the inference world size (inference tp*pp*dp*engines = "
                f"{i.tp}*{i.pp}*{i.dp}*{i.engines} = {i.world_size}) <= the trainer world size (trainer "
                f"tp*cp*dp*pp = {t.tp}*{t.cp}*{t.dp}*{t.pp} = {t.world_size}); use fewer inference ranks, "
                f"more trainer ranks, or deployment.mode=disaggregated"
            )
        n = self.num_nodes(trainer, inference)
        if self.nodes is not None and n > self.nodes:
            raise LayoutError(f"deployment.nodes={self.nodes} is too few: the job needs {n} nodes of "
                              f"{self.gpus_per_node} GPUs")

    def device_ids(self, trainer: TrainerLayout, inference: InferenceLayout) -> list[int]:
        """Device index of every global rank (trainer ranks first)."""
        t, i = trainer.world_size, inference.world_size
        if self.mode == "colocated":
            if i > t:
                self.check(trainer, inference)
            return list(range(t)) + list(range(i))
        return list(range(t + i))

    def devices(self, trainer: TrainerLayout, inference: InferenceLayout) -> list[Device]:
        return [Device(d // self.gpus_per_node, d % self.gpus_per_node) for d in self.device_ids(trainer, inference)]

    def num_nodes(self, trainer: TrainerLayout, inference: InferenceLayout) -> int:
        t, i = trainer.world_size, inference.world_size
        gpus = max(t, i) if self.mode == "colocated" else t + i
        return -(-gpus // self.gpus_per_node)
