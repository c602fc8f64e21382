"""Sides: what each rank of a trainer or an engine holds, as pieces of the model's logical tensors.

A side is a module with ``NAME``, ``check(spec, layout[, placement])`` (a ShardError naming the field
when the model's shapes do not divide over the layout) and ``template(spec, catalog, layout[,
placement], rank)`` (the rank's local tensors, shared by ranks with equal shard coordinates). The
planner looks sides up by the job's ``trainer.kind`` and ``inference.kind``: Megatron-core and vLLM
today; an FSDP/DTensor trainer or an SGLang engine is one more module and one line below.
"""

from __future__ import annotations

from typing import Any, Protocol

from planners.errors import LayoutError
from planners.sides import megatron, vllm

__all__ = ["TrainerSide", "EngineSide", "TRAINERS", "ENGINES", "trainer_side", "engine_side"]


class TrainerSide(Protocol):
    """What a trainer side's module provides."""

    NAME: str

    def check(self, spec: Any, layout: Any) -> None: ...

    def template(self, spec: Any, cat: Any, layout: Any, rank: int) -> tuple: ...


class EngineSide(Protocol):
    """What an engine side's module provides (``placement``: the expert placement its slots hold)."""

    NAME: str

    def check(self, spec: Any, layout: Any, placement: Any) -> None: ...

    def template(self, spec: Any, cat: Any, layout: Any, placement: Any, rank: int) -> tuple: ...

    def slots_of(self, layout: Any, num_physical: int, ranks: Any, local_shapes: list, which: Any, bases: Any) -> Any:
        """The physical expert slot each expert piece fills (engine ranks, ``local_shapes[which]`` their
        local tensors' shapes, the pieces' flat offsets; arrays)."""
        ...


TRAINERS: dict[str, TrainerSide] = {megatron.NAME: megatron}
ENGINES: dict[str, EngineSide] = {vllm.NAME: vllm}


def trainer_side(kind: str) -> TrainerSide:
    if kind not in TRAINERS:
        raise LayoutError(f"trainer.kind {kind!r} is not supported; use one of {sorted(TRAINERS)}")
    return TRAINERS[kind]


def engine_side(kind: str) -> EngineSide:
    if kind not in ENGINES:
        raise LayoutError(f"inference.kind {kind!r} is not supported; use one of {sorted(ENGINES)}")
    return ENGINES[kind]
