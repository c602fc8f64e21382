"""``rlsync bench peer``: megatron-core 0.16's own resharding against rlsync's plan executor.

Both implementations refresh weights between two parallel layouts of the same megatron-core model,
on the same 4 local processes (CPU, gloo over loopback), one case at a time:

* **megatron-core**: ``megatron.core.resharding.swap_model_weights(source, destination, service)``
  between two megatron-core ``GPTModel``s living in every process, the source in the trainer layout
  and the destination in the destination layout, over its gloo copy service. Its plan is built on
  the first call and cached on the destination model.
* **rlsync**: the plan executor (``Session.sync``) from the same megatron-core source model into the
  engine side of an rlsync job: buffers in vLLM's layout and names, allocated from the plan.

Models (``--size bench``, the default; ``--size tiny`` is for the test): a dense Llama-style GPT
(RMSNorm, SwiGLU, no biases, GQA; hidden 1024, 4 layers, ~105 MB of bf16 weights) and a Qwen3-MoE
one (hidden 512, 4 layers, 8 experts of which 2 routed per token, ~74 MB), both built with the
repo's ``sync.ends.megatron.build_gpt_model`` (local layer spec, ``use_cpu_initialization``,
``moe_token_dispatcher_type="allgather"``, ``moe_grouped_gemm=False``). The vocabulary (8192) is a
multiple of 512 so that megatron's padded vocabulary is the same under TP2 and TP4: megatron-core's
planner needs a TP-split parameter's full shape equal on both sides (rlsync plans around padding).

Cases (source megatron layout -> megatron destination layout | the equivalent rlsync engine layout):

==================== ======================== ============================ ================================
case                 megatron source          megatron destination         rlsync ``inference``
==================== ======================== ============================ ================================
dense_tp2pp2_to_tp4  TP2 x PP2                TP4                          ``{tp: 4}``
dense_tp1dp4_to_tp4  TP1 x DP4                TP4                          ``{tp: 4}``
dense_tp2dp2_to_tp4  TP2 x DP2                TP4                          ``{tp: 4}``
moe_ep2_to_ep4       TP2 x EP2 (ETP2, DP2)    TP2 x DP2 x EP4, ETP1        ``{tp: 2, dp: 2, enable_ep: true}``
moe_ep4_to_ep1       TP1 x EP4 (ETP1, DP4)    TP4, EP1 (ETP4)              ``{tp: 4}``
==================== ======================== ============================ ================================

Why these are equivalent: vLLM with ``enable_ep`` makes one expert group of all DP x TP ranks of an
engine and keeps every expert whole (no expert tensor parallelism), with attention and embeddings TP
within each DP rank and replicated across DP ranks -- megatron's TP2 x DP2 with EP4 and ETP1, experts
2r, 2r+1 on rank r in both. Without EP vLLM shards every expert over its whole TP group -- megatron's
TP4 with EP1 (ETP4). So the destination of every case holds the same bytes on the same rank in both
implementations (vLLM fuses q/k/v and gate/up into one tensor each, megatron into ``linear_qkv`` and
``linear_fc1``: the same elements, in another order).

Deployment: the rlsync job is ``colocated`` (engine rank i on trainer rank i's device) and each process
hosts trainer rank i and engine rank i, as megatron-core's refit holds both models in one process.
That is the comparison whose bytes compare best: both implementations copy what stays on a device
locally and send the rest, so "bytes moved" counts the same thing on both sides -- bytes of tensor data
sent from one process to another (megatron-core: the sends its plan gives to another rank, counted
in the copy service below; rlsync: ``SyncStats.bytes_sent``). Same-process copies are reported apart.

Known obstacles and how they are handled here:

* megatron-core's ``GlooCopyService`` creates a CUDA stream in its constructor (and waits on it in
  ``run`` when it is set): :class:`CpuGlooCopyService` builds the parent with ``torch.cuda.Stream``
  stubbed to ``None``, so ``run`` skips the wait; everything else is megatron-core's code. The
  subclass also counts the bytes of each send (to another rank, or a local copy).
* megatron-core's planner matches parameters across the two models by ``resolved_name``, which maps
  local expert indices to global ones only for Transformer Engine's grouped-GEMM names (``weightK``).
  The local layer spec names experts ``mlp.experts.local_experts.K...`` with K local to the EP rank, so
  the expert K of every EP rank would match the same name and copy the wrong expert.
  :func:`global_expert_names` wraps the planner's metadata extraction while it plans: an expert
  parameter's resolved name gets its global index (EP rank x experts per rank + K), as megatron-core
  does for ``weightK``.
* megatron-core's planner reads each parameter's TP attributes (``tensor_model_parallel``,
  ``partition_dim``, ``partition_stride``), and megatron-core sets them on CPU-initialized weights
  only when it initializes them; ``build_gpt_model`` builds with ``perform_initialization=False``.
  Both sides here build their models through it with the config forced to initialize
  (:func:`initializing_config`); the weights are overwritten with the benchmark's own right after.
* Two layouts in one process: megatron-core's ``parallel_state`` holds one layout at a time, while the
  models keep the process groups they were built with (``pg_collection``). Each model is built under
  its layout's ``initialize_model_parallel``, which is then destroyed (that only forgets the globals).

Measurement: per case, launches alternate between the implementations (megatron-core, rlsync,
megatron-core, ...), 4 fresh processes each. Every process fills the source model with the same
seeded full weights (by rlsync's megatron shard rules), and each sync starts with the destination
zeroed, all untimed. A sync's time is the slowest process's wall clock from a common barrier to the
return of the implementation's call (until every process holds the new weights). The first sync
of each launch is a warm-up (megatron-core builds its plan, rlsync binds its copy programs) and is
reported apart; the rest are pooled over launches: median and spread (min-max). rlsync's launches run
their warm-up with verification, then alternate syncs with and without its checksum verification
(``verify=False`` / ``True``): ``--syncs N`` gives megatron-core N syncs and rlsync 1 + 2(N-1).
rlsync uses the job's sync settings (256 MB buckets unless ``--bucket-mb``). A launch's setup
(process start, model builds, weights, references) is untimed; the JSON has its steps' seconds.
Bit-exactness is checked after every sync on every process, untimed: the destination's tensors bit
for bit against a reference cut from the full weights by the destination layout's shard rules
(megatron-core: the repo's megatron shard rules for the destination layout; rlsync: the plan's
engine shard rules), computed without either implementation's transfer. rlsync's verified syncs
also report its own checksum verdict.

Reading the bytes: megatron-core's planner takes a replicated source tensor from the first rank of
its source DP group (it balances across DP groups, not within one), so TP1 x DP4 -> TP4 sends three
quarters of the model from rank 0, where rlsync cuts every slice from the copy in its own process.

Usage: rlsync bench peer -- [--cases NAME ...] [--syncs 8] [--launches 2] [--size bench|tiny]
       [--bucket-mb MB] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator
from unittest import mock

import numpy as np
import torch
import torch.distributed as dist

from planners import JobSpec, SyncPlan, build_plan
from sync.bench.timing import usable_cores

__all__ = ["CASES", "PeerCase", "main", "run_case"]

HOST = "127.0.0.1"
PROCESSES = 4
IMPLEMENTATIONS = ("megatron-core", "rlsync")

# HF configs of the two models, at the benchmark's size and at the test's
MODELS: dict[str, dict[str, dict[str, Any]]] = {
    "bench": {
        "dense": dict(model_type="llama", hidden_size=1024, num_hidden_layers=4, num_attention_heads=16,
                      num_key_value_heads=4, head_dim=64, intermediate_size=2048, vocab_size=8192,
                      tie_word_embeddings=False, torch_dtype="bfloat16"),
        "moe": dict(model_type="qwen3_moe", hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
                    num_key_value_heads=4, head_dim=64, intermediate_size=1024, moe_intermediate_size=512,
                    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                    vocab_size=8192, tie_word_embeddings=False, torch_dtype="bfloat16"),
    },
    "tiny": {
        "dense": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, head_dim=32, intermediate_size=256, vocab_size=1024,
                      tie_word_embeddings=False, torch_dtype="bfloat16"),
        "moe": dict(model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=4, head_dim=32, intermediate_size=256, moe_intermediate_size=64,
                    num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[],
                    vocab_size=1024, tie_word_embeddings=False, torch_dtype="bfloat16"),
    },
}


@dataclass(frozen=True)
class PeerCase:
    """One layout pair: the megatron source layout, megatron-core's destination layout and the vLLM
    layout of rlsync's engine side that holds the same shards (see the module docstring)."""

    model: str  # a key of MODELS[size]
    source: dict[str, Any]  # the trainer section of a job
    destination: dict[str, Any]  # a trainer section too: megatron-core's destination model
    inference: dict[str, Any]  # the inference section of rlsync's job


CASES: dict[str, PeerCase] = {
    "dense_tp2pp2_to_tp4": PeerCase("dense", dict(tp=2, pp=2), dict(tp=4), dict(tp=4)),
    "dense_tp1dp4_to_tp4": PeerCase("dense", dict(tp=1, dp=4), dict(tp=4), dict(tp=4)),
    "dense_tp2dp2_to_tp4": PeerCase("dense", dict(tp=2, dp=2), dict(tp=4), dict(tp=4)),
    "moe_ep2_to_ep4": PeerCase("moe", dict(tp=2, ep=2), dict(tp=2, ep=4, etp=1), dict(tp=2, dp=2, enable_ep=True)),
    "moe_ep4_to_ep1": PeerCase("moe", dict(tp=1, ep=4), dict(tp=4), dict(tp=4)),
}


@dataclass
class CasePlans:
    """What every process of a case needs, planned once in the launcher."""

    job: JobSpec  # rlsync's job: the source layout, the engine layout, colocated
    plan: SyncPlan  # its plan (also: the megatron shard rules of the source layout)
    destination_job: JobSpec  # the same model with megatron-core's destination layout as its trainer
    destination_plan: SyncPlan  # its trainer shard rules give the megatron destination's reference
    timeout_s: float


@dataclass
class SyncRecord:
    """One sync as one process saw it."""

    seconds: float  # the slowest process's, the same on every process
    bytes_sent: int  # to other processes
    bytes_copied: int  # within this process
    mismatched: list[str]  # destination tensors of this process that differ from the reference
    verify: bool | None = None  # rlsync: whether this sync ran its checksum verification
    checksums_agree: bool | None = None  # rlsync: its verification's verdict


# -- megatron-core on CPU -------------------------------------------------------------------------


def _copy_service_class():
    """``CpuGlooCopyService`` (defined on first use: importing megatron-core takes seconds, and the
    launcher process never needs it)."""
    from megatron.core.resharding.copy_services.gloo_copy_service import GlooCopyService

    class CpuGlooCopyService(GlooCopyService):
        """megatron-core's gloo copy service without CUDA, counting the bytes it is given to move.

        The parent's constructor makes a CUDA stream that its ``run`` waits on when set; there is no
        CUDA here, so it is built with the stream left unset (``None``) and ``run`` skips the wait."""

        def __init__(self) -> None:
            with mock.patch.object(torch.cuda, "Stream", lambda *args, **kwargs: None):
                super().__init__()
            self.reset_counts()

        def reset_counts(self) -> None:
            self.bytes_sent = 0
            self.bytes_copied = 0

        def _count(self, tensor: torch.Tensor, dest_rank: int) -> None:
            nbytes = tensor.numel() * tensor.element_size()
            if dest_rank == self.rank:  # the service copies these in place, nothing crosses processes
                self.bytes_copied += nbytes
            else:
                self.bytes_sent += nbytes

        def submit_send(self, src_tensor: torch.Tensor, dest_rank: int):
            self._count(src_tensor, dest_rank)
            super().submit_send(src_tensor, dest_rank)

        def submit_send_with_id(self, task_id: int, src_tensor: torch.Tensor, dest_rank: int):
            self._count(src_tensor, dest_rank)
            super().submit_send_with_id(task_id, src_tensor, dest_rank)

    return CpuGlooCopyService


# the index K in a local-spec expert parameter name, "...mlp.experts.local_experts.K.linear_fc1.weight"
_LOCAL_EXPERT_INDEX = re.compile(r"(?<=\.local_experts\.)\d+(?=\.)")


def give_global_expert_name(metadata) -> None:
    """Rewrite an expert parameter's ``resolved_name`` (megatron-core's ``ParameterMetadata``) to its
    global expert index, in place: the planner matches source and destination parameters by that name,
    and local index K means expert ``ep_rank * experts_per_rank + K``. Other parameters are left alone."""
    if not metadata.is_ep or not metadata.num_experts or metadata.resolved_name is None:
        return
    match = _LOCAL_EXPERT_INDEX.search(metadata.resolved_name)
    if match is None:
        return
    group = metadata.expert_parallel_group_ranks
    experts_per_rank = metadata.num_experts // len(group)
    global_index = group.index(metadata.owner_rank) * experts_per_rank + int(match.group())
    name = metadata.resolved_name
    metadata.resolved_name = name[:match.start()] + str(global_index) + name[match.end():]
    metadata.global_expert_index = global_index


@contextmanager
def global_expert_names() -> Iterator[None]:
    """While megatron-core plans, every expert parameter's metadata carries its global expert index."""
    from megatron.core.resharding import planner

    extract = planner.extract_param_metadata

    def extract_with_global_expert_names(*args, **kwargs):
        metadata = extract(*args, **kwargs)
        give_global_expert_name(metadata)
        return metadata

    with mock.patch.object(planner, "extract_param_metadata", extract_with_global_expert_names):
        yield


@contextmanager
def initializing_config() -> Iterator[None]:
    """Models built meanwhile initialize their weights: megatron-core sets the TP attributes its
    resharding planner reads (``partition_dim``, ``partition_stride``) only then on CPU-initialized
    weights. ``build_gpt_model`` imports ``TransformerConfig`` when it runs, so a subclass that turns
    initialization on is swapped in for the duration."""
    from megatron.core.transformer import transformer_config

    class InitializingConfig(transformer_config.TransformerConfig):
        def __post_init__(self) -> None:
            self.perform_initialization = True
            super().__post_init__()

    with mock.patch.object(transformer_config, "TransformerConfig", InitializingConfig):
        yield


def build_megatron_model(job: JobSpec) -> torch.nn.Module:
    """This process's GPTModel of ``job.model`` in ``job.trainer``'s layout, over the default group.
    ``parallel_state`` is destroyed afterwards: the model keeps its process groups, and the next
    model may be built in another layout."""
    from megatron.core import parallel_state

    from sync.ends.megatron import build_gpt_model

    layout = job.trainer
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        context_parallel_size=layout.cp, order=layout.order, create_gloo_process_groups=False)
    try:
        with initializing_config():
            return build_gpt_model(job.model, layout)
    finally:
        parallel_state.destroy_model_parallel()


# -- weights, references and timing ---------------------------------------------------------------


def full_weights(plan: SyncPlan, seed: int = 0, version: int = 1) -> dict[str, torch.Tensor]:
    """Seeded full HF weights of the model, by tensor name (the same in every process)."""
    from sync.ends.synthetic import synthetic_tensor

    return {t.name: synthetic_tensor(t, i, seed, version) for i, t in enumerate(plan.tensors)}


def by_tensor_id(plan: SyncPlan, weights: dict[str, torch.Tensor]) -> Callable[[int], torch.Tensor]:
    return lambda tid: weights[plan.tensors[tid].name]


def reference_shards(plan: SyncPlan, rank: int, like: dict[str, torch.Tensor],
                     weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What rank ``rank`` of ``plan`` must hold: ``weights`` cut by its shard rules into tensors shaped
    as ``like``'s."""
    from sync.ends.base import fill_from_full

    reference = {name: torch.zeros_like(t) for name, t in like.items()}
    fill_from_full(plan, rank, reference, by_tensor_id(plan, weights))
    return reference


def same_bits(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    if actual.dtype != expected.dtype or actual.shape != expected.shape:
        return False
    integer = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[actual.element_size()]
    return torch.equal(actual.detach().contiguous().view(integer), expected.contiguous().view(integer))


def mismatched_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors whose bits differ from the reference (or that are missing)."""
    return sorted(name for name, want in expected.items() if name not in actual or not same_bits(actual[name], want))


def zero_tensors(tensors: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for t in tensors.values():
            t.zero_()


def timed_on_every_process(sync: Callable[[], Any]) -> tuple[float, Any]:
    """(the slowest process's seconds, ``sync()``'s result): every process starts together after a
    barrier of the default group and stops when its call returns."""
    dist.barrier()
    start = time.perf_counter()
    result = sync()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item()), result


# -- one launch of each implementation, in each process -------------------------------------------


def megatron_core_launch(process: int, plans: CasePlans, syncs: int, port: int) -> dict[str, Any]:
    """``syncs`` refits from the source model to the destination model by megatron-core."""
    setup = SetupClock()
    from megatron.core.resharding import swap_model_weights

    from sync.ends.base import fill_from_full
    from sync.ends.megatron import MegatronSource
    from sync.run.local import init_group

    init_group(process, PROCESSES, HOST, port, plans.timeout_s)
    setup.lap("import_and_join")
    source = build_megatron_model(plans.job)
    destination = build_megatron_model(plans.destination_job)
    setup.lap("build_models")
    weights = full_weights(plans.plan)
    fill_from_full(plans.plan, process, MegatronSource(source).local_tensors(), by_tensor_id(plans.plan, weights))
    destination_tensors = MegatronSource(destination).local_tensors()  # the parameters themselves
    reference = reference_shards(plans.destination_plan, process, destination_tensors, weights)
    service = _copy_service_class()()
    setup.lap("weights_and_reference")
    records = []
    with global_expert_names():
        for _ in range(syncs):
            zero_tensors(destination_tensors)
            service.reset_counts()
            seconds, _ = timed_on_every_process(lambda: swap_model_weights(source, destination, service))
            records.append(SyncRecord(seconds, service.bytes_sent, service.bytes_copied,
                                      mismatched_tensors(destination_tensors, reference)))
    return {"setup_s": setup.laps, "syncs": [asdict(record) for record in records]}


class SetupClock:
    """Seconds of each setup step of a launch (process start to the first sync), for the JSON."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, step: str) -> None:
        now = time.perf_counter()
        self.laps[step] = now - self._last
        self._last = now


def rlsync_verify_schedule(syncs: int) -> list[bool]:
    """Verification per sync of an rlsync launch: a verified warm-up, then ``syncs - 1`` syncs each
    without and with verification, alternating."""
    return [True] + [False, True] * (syncs - 1)


def rlsync_launch(process: int, plans: CasePlans, syncs: int, port: int, sync_port: int) -> dict[str, Any]:
    """rlsync's syncs from the same megatron-core source model into the engine ranks this process
    hosts (colocated: trainer rank ``process`` and the engine rank on its device)."""
    setup = SetupClock()
    from sync.ends.base import fill_from_full
    from sync.ends.megatron import MegatronSource
    from sync.ends.synthetic import BufferTarget
    from sync.run.local import init_group
    from sync.session import Session
    from sync.transport import standalone_transport

    plan = plans.plan
    init_group(process, PROCESSES, HOST, port, plans.timeout_s)  # megatron-core's default group
    setup.lap("import_and_join")
    source = build_megatron_model(plans.job)
    setup.lap("build_models")
    weights = full_weights(plan)
    fill_from_full(plan, process, MegatronSource(source).local_tensors(), by_tensor_id(plan, weights))
    process_of = hosting_processes(plan)
    ranks = np.flatnonzero(process_of == process).tolist()
    trainer_ranks = [rank for rank in ranks if rank < plan.num_trainer]
    engine_ranks = [rank for rank in ranks if rank >= plan.num_trainer]
    targets = {rank: BufferTarget(plan, rank) for rank in engine_ranks}
    references = {rank: reference_shards(plan, rank, targets[rank].tensors, weights) for rank in engine_ranks}
    transport = standalone_transport(process, PROCESSES, HOST, sync_port, plans.timeout_s, store_on_rank0=False)
    session = Session.open(plan, ranks, transport, {rank: MegatronSource(source) for rank in trainer_ranks}, targets,
                           process_of=process_of)
    setup.lap("weights_and_reference")
    records = []
    for version, verify in enumerate(rlsync_verify_schedule(syncs), start=1):
        for target in targets.values():
            zero_tensors(target.tensors)
        seconds, stats = timed_on_every_process(lambda: session.sync(version, verify=verify))
        mismatched = [f"rank {rank}: {name}" for rank in engine_ranks
                      for name in mismatched_tensors(targets[rank].tensors, references[rank])]
        records.append(SyncRecord(seconds, stats.bytes_sent, stats.bytes_copied, mismatched, verify=verify,
                                  checksums_agree=stats.verified if verify else None))
    return {"setup_s": setup.laps, "syncs": [asdict(record) for record in records]}


def hosting_processes(plan: SyncPlan) -> np.ndarray:
    """The process of each plan rank: one per device, hosting the trainer and engine ranks on it."""
    devices = np.unique(plan.devices)
    if len(devices) != PROCESSES:
        raise ValueError(f"the rlsync job places its ranks on {len(devices)} devices, not {PROCESSES}")
    return np.searchsorted(devices, plan.devices).astype(np.int64)


# -- the launcher ---------------------------------------------------------------------------------


def job_of(model: dict[str, Any], trainer: dict[str, Any], inference: dict[str, Any],
           bucket_mb: float | None, timeout_s: float) -> JobSpec:
    sync: dict[str, Any] = {"timeout_s": timeout_s}
    if bucket_mb is not None:
        sync["bucket_mb"] = bucket_mb
    return JobSpec.from_dict(dict(model=dict(hf_config=model), trainer=trainer, inference=inference,
                                  deployment=dict(mode="colocated", gpus_per_node=PROCESSES), sync=sync))


def plan_case(case: PeerCase, size: str, bucket_mb: float | None, timeout_s: float) -> CasePlans:
    model = MODELS[size][case.model]
    job = job_of(model, case.source, case.inference, bucket_mb, timeout_s)
    destination_job = job_of(model, case.destination, case.inference, bucket_mb, timeout_s)
    for side, side_job in (("source", job), ("destination", destination_job)):
        layout = side_job.trainer
        if layout.world_size != PROCESSES:
            raise ValueError(f"the {side} layout {layout} has {layout.world_size} ranks, not {PROCESSES}")
    return CasePlans(job, build_plan(job).validate(), destination_job, build_plan(destination_job).validate(),
                     timeout_s)


# what every process of this benchmark imports, on top of what spawn_ranks' fork server preloads
MEGATRON_PRELOAD = ["megatron.core.resharding", "megatron.core.models.gpt",
                    "megatron.core.models.gpt.gpt_layer_specs", "sync.ends.megatron", "sync.session"]


def start_fork_server_with_megatron() -> None:
    """spawn_ranks forks each launch's processes from a fork server that has imported torch and rlsync;
    start that server (unless it runs already) with megatron-core imported too: every process imports
    it, seconds each on a small machine, four at once on two cores. Preloading changes no code path:
    a server started before this one simply leaves the import to each process."""
    import multiprocessing
    from multiprocessing import forkserver

    context = multiprocessing.get_context("forkserver")
    # spawn_ranks' own preload list, and megatron-core
    from sync.run.local import PRELOAD

    context.set_forkserver_preload([*PRELOAD, *MEGATRON_PRELOAD])
    forkserver.ensure_running()


def launch(implementation: str, plans: CasePlans, syncs: int) -> list[dict[str, Any]]:
    """One launch: 4 fresh processes; what each returned (its setup times and sync records), by process."""
    from sync.run.local import host_store, spawn_ranks

    stores = [host_store(timeout_s=plans.timeout_s) for _ in range(2)]  # held open until the processes finish
    if implementation == "megatron-core":
        worker, args = megatron_core_launch, (plans, syncs, stores[0].port)
    else:
        worker, args = rlsync_launch, (plans, syncs, stores[0].port, stores[1].port)
    results, _ = spawn_ranks(PROCESSES, worker, args, timeout_s=plans.timeout_s)
    return [results[process] for process in range(PROCESSES)]


@dataclass
class Samples:
    """Sync records of one implementation (and verification mode), pooled over launches."""

    timed: list[float] = field(default_factory=list)  # after each launch's warm-up
    warmup: list[float] = field(default_factory=list)
    bytes_sent: set[int] = field(default_factory=set)  # all processes together, per sync
    bytes_copied: set[int] = field(default_factory=set)
    mismatched: list[str] = field(default_factory=list)
    checksums_agree: bool | None = None

    def add(self, per_process: list[dict], warmup: bool) -> None:
        (self.warmup if warmup else self.timed).append(per_process[0]["seconds"])
        self.bytes_sent.add(sum(record["bytes_sent"] for record in per_process))
        self.bytes_copied.add(sum(record["bytes_copied"] for record in per_process))
        self.mismatched += [f"process {process}: {name}" for process, record in enumerate(per_process)
                            for name in record["mismatched"]]
        verdicts = [record["checksums_agree"] for record in per_process if record["checksums_agree"] is not None]
        if verdicts:
            self.checksums_agree = all(verdicts) and self.checksums_agree is not False

    def summary(self) -> dict[str, Any]:
        return {
            "median_s": statistics.median(self.timed) if self.timed else None,
            "min_s": min(self.timed, default=None),
            "max_s": max(self.timed, default=None),
            "samples_s": self.timed,
            "warmup_s": self.warmup,
            # the same every sync; several values would mean the traffic changed between syncs
            "bytes_sent": max(self.bytes_sent, default=0),
            "bytes_sent_varied": len(self.bytes_sent) > 1,
            "bytes_copied_locally": max(self.bytes_copied, default=0),
            "exact": not self.mismatched,
            "mismatched": self.mismatched[:10],
            "checksums_agree": self.checksums_agree,
        }


def add_launch(samples: dict[str, Samples], implementation: str, per_process: list[dict[str, Any]]) -> None:
    """Sort a launch's syncs: megatron-core's into one pool, rlsync's by verification; the first is the
    warm-up (rlsync's, verified, counts with the verified ones)."""
    for i in range(len(per_process[0]["syncs"])):
        sync = [result["syncs"][i] for result in per_process]
        if implementation == "megatron-core":
            key = "megatron-core"
        else:
            key = "rlsync verify" if sync[0]["verify"] else "rlsync"
        samples[key].add(sync, warmup=i == 0)


def slowest_setup(per_process: list[dict[str, Any]]) -> dict[str, float]:
    """Each setup step's seconds in the slowest process of a launch."""
    return {step: max(result["setup_s"][step] for result in per_process) for step in per_process[0]["setup_s"]}


def run_case(name: str, syncs: int = 8, launches: int = 2, size: str = "bench", bucket_mb: float | None = None,
             timeout_s: float = 600.0, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Alternating launches of both implementations on case ``name``; its row."""
    if syncs < 2:
        raise ValueError("--syncs must be at least 2: the first sync of each launch is a warm-up")
    case = CASES[name]
    plans = plan_case(case, size, bucket_mb, timeout_s)
    samples = {key: Samples() for key in ("megatron-core", "rlsync", "rlsync verify")}
    setups: dict[str, list[dict[str, float]]] = {implementation: [] for implementation in IMPLEMENTATIONS}
    start_fork_server_with_megatron()
    for i in range(launches):
        for implementation in IMPLEMENTATIONS:
            start = time.perf_counter()
            per_process = launch(implementation, plans, syncs)
            add_launch(samples, implementation, per_process)
            setups[implementation].append(slowest_setup(per_process))
            say(f"  {name}: launch {i + 1}/{launches} of {implementation}: {time.perf_counter() - start:.1f} s "
                f"(setup {', '.join(f'{step} {seconds:.1f} s' for step, seconds in setups[implementation][-1].items())})")
    sides = {key: s.summary() for key, s in samples.items()}
    megatron, rlsync, verified = sides["megatron-core"], sides["rlsync"], sides["rlsync verify"]
    return {
        "case": name,
        "model": case.model,
        "size": size,
        "weights_bytes": weights_bytes(plans.plan),
        "megatron_source": case.source,
        "megatron_destination": case.destination,
        "rlsync_inference": case.inference,
        "syncs_per_launch": syncs,
        "launches": launches,
        "megatron_seconds": megatron["median_s"],
        "rlsync_seconds": rlsync["median_s"],
        "rlsync_verify_seconds": verified["median_s"],
        "megatron_over_rlsync": ratio(megatron["median_s"], rlsync["median_s"]),
        "megatron_over_rlsync_verify": ratio(megatron["median_s"], verified["median_s"]),
        "megatron_bytes_moved": megatron["bytes_sent"],
        "rlsync_bytes_moved": rlsync["bytes_sent"],
        "megatron_exact": megatron["exact"],
        "rlsync_exact": rlsync["exact"] and verified["exact"],
        "rlsync_checksums_agree": verified["checksums_agree"],
        "details": sides,
        "setup_s": setups,  # per launch, the slowest process's seconds of each step before the first sync
    }


def weights_bytes(plan: SyncPlan) -> int:
    """Bytes of the model's full weights (one copy)."""
    from sync.tensors import TORCH_DTYPES

    return sum(int(np.prod(t.shape)) * TORCH_DTYPES[t.dtype].itemsize for t in plan.tensors)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator is not None and denominator else None


# -- output ---------------------------------------------------------------------------------------


def _seconds(side: dict[str, Any]) -> str:
    if side["median_s"] is None:
        return "-"
    return f"{side['median_s']:.3f} ({side['min_s']:.3f}-{side['max_s']:.3f})"


def _megabytes(nbytes: int) -> str:
    return f"{nbytes / 1e6:.1f}"


def _yes_no(value: bool | None) -> str:
    return "[green]yes[/]" if value else "[red]NO[/]"


def print_table(rows: list[dict[str, Any]], console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    first = rows[0]
    table = Table(title=f"megatron-core {megatron_core_version()} resharding vs rlsync, {PROCESSES} CPU processes "
                        f"(gloo); seconds: median (min-max) of {first['launches']} launches x "
                        f"{first['syncs_per_launch'] - 1} syncs after a warm-up", title_justify="left")
    for column in ("case", "weights MB", "megatron-core s", "rlsync s", "rlsync+verify s", "megatron/rlsync",
                   "MB moved megatron", "MB moved rlsync", "exact megatron", "exact rlsync"):
        table.add_column(column, justify="left" if column == "case" else "right")
    for row in rows:
        details = row["details"]
        speedup = row["megatron_over_rlsync"]
        table.add_row(row["case"], _megabytes(row["weights_bytes"]), _seconds(details["megatron-core"]),
                      _seconds(details["rlsync"]), _seconds(details["rlsync verify"]),
                      "-" if speedup is None else f"{speedup:.2f}",
                      _megabytes(row["megatron_bytes_moved"]), _megabytes(row["rlsync_bytes_moved"]),
                      _yes_no(row["megatron_exact"]), _yes_no(row["rlsync_exact"] and row["rlsync_checksums_agree"]))
    (console or Console(width=200)).print(table)


def megatron_core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("megatron-core")
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlsync bench peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES), metavar="CASE",
                        help=f"cases to run (default: all): {', '.join(CASES)}")
    parser.add_argument("--syncs", type=int, default=8, help="syncs per launch, the first a warm-up (default 8)")
    parser.add_argument("--launches", type=int, default=2, help="launches of each implementation (default 2)")
    parser.add_argument("--size", choices=sorted(MODELS), default="bench", help="model size (tiny: for tests)")
    parser.add_argument("--bucket-mb", type=float, default=None, help="rlsync's bucket size (default: the job's)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a launch may take")
    parser.add_argument("--json", metavar="PATH", help="write the rows (and the settings) as JSON")
    args = parser.parse_args(argv)
    if args.syncs < 2 or args.launches < 1:
        parser.error("--syncs must be at least 2 (the first is a warm-up) and --launches at least 1")
    from rich.console import Console

    console = Console(width=200)
    rows = []
    for name in args.cases:
        console.print(f"{name}: {CASES[name]}")
        rows.append(run_case(name, args.syncs, args.launches, args.size, args.bucket_mb, args.timeout,
                             say=console.print))
    print_table(rows, console)
    if args.json:
        settings = {"syncs": args.syncs, "launches": args.launches, "size": args.size, "bucket_mb": args.bucket_mb,
                    "processes": PROCESSES, "torch": torch.__version__, "megatron_core": megatron_core_version(),
                    "machine": platform.platform(), "cpus": usable_cores()}
        with open(args.json, "w") as out:
            json.dump({"settings": settings, "rows": rows}, out, indent=2)
    exact = all(row["megatron_exact"] and row["rlsync_exact"] and row["rlsync_checksums_agree"] for row in rows)
    return 0 if exact else 1


if __name__ == "__main__":
    raise SystemExit(main())
