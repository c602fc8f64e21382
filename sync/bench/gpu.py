"""Colocated refresh on one GPU: batched copies vs per-slice ``copy_`` vs a flat device copy.

Runs on a CUDA machine in one call (``rlsync bench gpu`` or ``python scripts/bench_gpu.py``) and
prints a table last. Each case is a colocated sync plan whose every rank this one process hosts on one
GPU, so every chunk is a device-local copy: (a) a ~1.7B dense model, trainer TP1 -> engine TP1 (one
GPU, as deployed) and trainer TP2 x DP2 -> engine TP4 (a 4-GPU layout folded onto one: the same
resharding copies); (b) a DeepSeek-V3-like tensor mix (61 layers, 256 routed experts: ~45,000
expert tensors, scaled down to fit) from trainer TP2 x EP4 to an engine DP8 x EP8 with 32
redundant slots placed by EPLB from a skewed load. For each, payload GB/s of:

- ``flat``: one contiguous device-to-device copy of the same number of bytes (the ceiling);
- ``triton``: ``PlanExecutor`` with batched copy programs (the default on CUDA);
- ``foreach``: the same runs through ``torch._foreach_copy_``;
- ``slices``: one ``copy_`` per chunk slice (what a per-tensor loader does);
- ``triton (trusted)``: as ``triton``, without the per-sync check that every tensor is still where
  the copy programs were bound (``recheck=False``; one Python pass over ~80,000 tensors in (b)).

``sync GB/s`` times the whole ``PlanExecutor.sync`` call; ``kernel GB/s`` the copy launches alone.

``--ipc`` adds the dense TP1 -> TP1 case as two processes on the GPU (a trainer process and an
engine process, as when the engine runs in its own process), checked by checksums: buckets by CUDA
IPC of the flat send arena, packed by the sender and unpacked by the receiver (two copies), and the
direct mode, where the engine copies straight from the trainer's shared tensors (one copy).

Every variant's engine tensors are compared bit for bit with the ``slices`` result, after poisoning.

``--replan`` measures instead what a new expert placement costs the MoE case: the PlanBuilder's replan,
the session's rebind and the first sync by the new plan, against a sync with the placement unchanged.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from planners import JobSpec, build_plan
from planners.eplb.stats import synthetic_load
from sync.copier import CopyProgram
from planners import SyncSettings
from sync.ends.base import end_locals
from sync.bench.timing import Collections
from sync.session import Session
from sync.tensors import TORCH_DTYPES
from sync.transport import SoloTransport

DENSE = dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
             head_dim=128, intermediate_size=6144, vocab_size=151936, tie_word_embeddings=True, torch_dtype="bfloat16")
DENSE_8B = dict(DENSE, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, intermediate_size=12288,
                tie_word_embeddings=False)
DSV3_LIKE = dict(model_type="deepseek_v3", hidden_size=1024, num_hidden_layers=61, first_k_dense_replace=3,
                 num_attention_heads=16, intermediate_size=2048, moe_intermediate_size=128, n_routed_experts=256,
                 n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, q_lora_rank=384,
                 kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, vocab_size=129280,
                 tie_word_embeddings=False, torch_dtype="bfloat16")
CASES = {
    "dense 1.7B tp1->tp1": dict(model=dict(hf_config=DENSE), trainer=dict(tp=1), inference=dict(tp=1),
                                deployment=dict(mode="colocated")),
    # Qwen3-8B's shapes: what one GPU of a colocated GRPO job commonly holds (16.4 GB), for CUDA IPC direct
    "dense 8B tp1->tp1": dict(model=dict(hf_config=DENSE_8B), trainer=dict(tp=1), inference=dict(tp=1),
                              deployment=dict(mode="colocated")),
    "dense 1.7B tp2dp2->tp4": dict(model=dict(hf_config=DENSE), trainer=dict(tp=2, dp=2), inference=dict(tp=4),
                                   deployment=dict(mode="colocated")),
    "dsv3-like tp2ep4->dp8ep8+32": dict(model=dict(hf_config=DSV3_LIKE), trainer=dict(tp=2, dp=4, ep=4, etp=1),
                                        inference=dict(tp=1, dp=8, enable_ep=True), deployment=dict(mode="colocated"),
                                        eplb=dict(enabled=True, num_redundant_experts=32)),
    # the same engines in block FP8: trainer ranks quantize their own slices before the bytes move
    "dsv3-like fp8 tp2ep4->dp8ep8+32": dict(model=dict(hf_config=DSV3_LIKE), trainer=dict(tp=2, dp=4, ep=4, etp=1),
                                            inference=dict(tp=1, dp=8, enable_ep=True, quantization="fp8_block"),
                                            deployment=dict(mode="colocated"), eplb=dict(enabled=True, num_redundant_experts=32)),
}


class Tensors:
    """An endpoint over given tensors."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def local_tensors(self) -> dict[str, torch.Tensor]:
        return self.tensors


def endpoints(plan, ranks=None):
    """Random bytes in the trainer ranks' tensors, empty engine tensors (all ranks, or ``ranks``)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    sources, targets = {}, {}
    for r in range(plan.num_ranks) if ranks is None else ranks:
        ids = end_locals(plan, r)
        tensors = {plan.local_name[i]: torch.empty(plan.local_shape[i], dtype=TORCH_DTYPES[plan.local_dtype[i]],
                                                   device="cuda") for i in ids}
        if r < plan.num_trainer:
            for t in tensors.values():
                t.view(-1).view(torch.uint8).random_(0, 256, generator=gen)  # any bit pattern must survive
            sources[r] = Tensors(tensors)
        else:
            targets[r] = Tensors(tensors)
    return sources, targets


def poison(targets) -> None:
    flat = [t.view(-1).view(torch.uint8) for tg in targets.values() for t in tg.local_tensors().values()]
    torch._foreach_zero_(flat)
    torch._foreach_add_(flat, 0xA5)


def flat_copy_gbps(nbytes: int, reps: int) -> float:
    nbytes = min(nbytes, 4 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda").random_(0, 256)
    dst = torch.empty_like(src)
    times = []
    for _ in range(reps + 2):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return nbytes / statistics.median(times[2:]) / 1e9


def time_variant(plan, copies: str, recheck: bool, sources, targets, reps: int) -> dict:
    session = Session.open(plan, range(plan.num_ranks), SoloTransport(), sources, targets, SyncSettings(),
                           copies=copies, recheck=recheck)
    ex = session.executor
    sources, targets = session.sources, session.targets  # engines versioned, as every sync's are
    t0 = time.perf_counter()
    first = ex.sync(sources, targets, verify=False)  # binds: validates tensors, builds copy programs
    first_s = time.perf_counter() - t0
    programs = [p for s in (1, 2) for p in ex._binding.local[s]]
    gc.collect()  # the previous variant's garbage is not this one's time
    quantizers = list(ex._binding.quantize.values())  # FP8 engines: the block quantizer, each side's
    walls, kernels, quantizing, stages = [], [], [], []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stats = ex.sync(sources, targets, verify=False)
        walls.append(time.perf_counter() - t0)
        stages.append([stats.stage_seconds.get(stage, 0.0) for stage in (1, 2)])
        kernels.append(gpu_seconds(programs))
        quantizing.append(gpu_seconds(quantizers))
    poison(targets)
    torch.cuda.synchronize()
    verify_s, elements_s = [], []
    for i in range(6):  # the first of each builds its checksum programs; words and elements alternate
        wide = i % 2 == 0
        ex.verifier.read_words(wide)
        t0 = time.perf_counter()
        checked = ex.sync(sources, targets, verify=True)  # also checks every engine tensor's checksum
        (verify_s if wide else elements_s).append(time.perf_counter() - t0 - checked.seconds)
    ex.verifier.read_words(True)
    slices_verify_s = None
    if copies == "auto" and recheck:  # what the chunk-by-chunk checksums (CPU path) would cost here
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ex.verifier._expected_slices(ex._binding.flats, ex.verifier.work)
        torch.cuda.synchronize()
        slices_verify_s = time.perf_counter() - t0
    launches = sum(launch_count(p) for p in programs)
    runs = sum(getattr(p, "num_runs", 0) for p in programs)
    return dict(copies=copies, recheck=recheck, first_s=first_s, bind_s=first.bind_seconds, wall_s=statistics.median(walls),
                kernel_s=statistics.median(kernels), quantize_s=statistics.median(quantizing),
                stage_s=[statistics.median(s) for s in zip(*stages)], launches=launches, runs=runs, verify_s=statistics.median(verify_s[1:]),
                verify_first_s=verify_s[0], verify_elements_s=statistics.median(elements_s[1:]), slices_expected_s=slices_verify_s,
                verified=bool(checked.verified),
                copied=stats.bytes_copied)


def gpu_seconds(programs, config=None) -> float:
    """Seconds the GPU takes to run ``programs`` once, back to back (CUDA events); copy programs with the
    kernel knobs ``config`` (``sync.copy_kernel.KernelConfig``) where given."""
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for p in programs:
        p(config) if config is not None and isinstance(p, CopyProgram) else p()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3


def launch_count(program) -> int:
    """Kernel launches one run of a copy program makes (a foreach call counts as one)."""
    if isinstance(program, CopyProgram):
        return len(program.launches) or int(bool(program.pairs[0]))
    return len(program.pairs)


def snapshot(targets) -> list[torch.Tensor]:
    """The engine tensors' bytes: on the GPU when they fit with room to spare, else in host memory."""
    tensors = [t for tg in targets.values() for t in tg.local_tensors().values()]
    need = sum(t.numel() * t.element_size() for t in tensors)
    device = "cuda" if torch.cuda.mem_get_info()[0] > need + (8 << 30) else "cpu"
    return [t.view(-1).view(torch.uint8).to(device, copy=True) for t in tensors]


def same(targets, ref: list[torch.Tensor]) -> bool:
    got = [t for tg in targets.values() for t in tg.local_tensors().values()]
    return all(torch.equal(a.view(-1).view(torch.uint8).to(b.device), b) for a, b in zip(got, ref))


def case_plan(spec: dict):
    """A case's validated plan; MoE cases place their experts by EPLB from a skewed load."""
    job = JobSpec.from_dict(spec)
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=0) if job.model.is_moe else None
    return build_plan(job, load).validate()


def run_case(name: str, spec: dict, reps: int, slices_reps: int) -> list[dict]:
    t0 = time.perf_counter()
    plan = case_plan(spec)
    plan_s = time.perf_counter() - t0
    payload = int(plan.chunks["nbytes"].sum())
    sources, targets = endpoints(plan)
    flat = flat_copy_gbps(payload, reps)
    rows = []
    ref = None
    for copies, recheck in (("slices", True), ("foreach", True), ("auto", True), ("auto", False)):
        print(f"{name}: {copies} ...", file=sys.stderr, flush=True)
        r = time_variant(plan, copies, recheck, sources, targets, slices_reps if copies == "slices" else reps)
        if ref is None:
            ref = snapshot(targets)
            r["exact"] = True
        else:
            r["exact"] = same(targets, ref)
        r.update(case=name, payload=payload, chunks=len(plan.chunks), plan_s=plan_s, flat_gbps=flat,
                 engine_tensors=sum(len(t.tensors) for t in targets.values()))
        r["gbps"] = payload / r["wall_s"] / 1e9
        r["kernel_gbps"] = payload / r["kernel_s"] / 1e9
        rows.append(r)
        print(json.dumps(r), flush=True)
    del ref, sources, targets
    torch.cuda.empty_cache()
    return rows


def gpu_timeline(run) -> dict:
    """Where the GPU idles while ``run()`` runs (one call, under torch's profiler): each copy kernel's
    start and end from the sync's start, the idle stretches before, between and after them, in ms."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        with record_function("rlsync.sync"):
            run()
            torch.cuda.synchronize()
    events = prof.events()
    whole = next(e for e in events if e.name == "rlsync.sync")
    start, end = whole.time_range.start, whole.time_range.end
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" not in e.name.lower()
                     and e.name != "rlsync.sync")  # the marker's own range on the GPU
    copies = sorted(e.time_range.start for e in events
                    if e.device_type == torch.autograd.DeviceType.CUDA and "memcpy" in e.name.lower())
    launched = sorted(e.time_range.start for e in events if e.device_type == torch.autograd.DeviceType.CPU
                      and "launchkernel" in e.name.lower())
    ms = lambda us: round(us / 1e3, 3)  # noqa: E731
    spans = [(ms(a - start), ms(b - start), name[:40]) for a, b, name in kernels]
    idle, cursor = [], start
    for a, b, _ in kernels:
        if a > cursor:
            idle.append((ms(cursor - start), ms(a - cursor)))
        cursor = max(cursor, b)
    return dict(wall_ms=ms(end - start), kernels=spans, idle_ms=idle, idle_total_ms=ms(sum(d * 1e3 for _, d in idle)),
                after_last_ms=ms(end - cursor), launched_ms=[ms(t - start) for t in launched],
                uploads_ms=[ms(t - start) for t in copies])


def run_replan(name: str, spec: dict, reps: int, profile: bool = False, tile_kb: int = 64,
               collect_during_sync: bool = False, moving_tile_kb: int = 256, timeline: bool = False) -> dict:
    """A refresh after a placement change against one with the placement unchanged, in one session:
    syncs by the same plan (median), then, for each of ``reps`` new placements, the PlanBuilder's
    replan (CPU), the session's rebind (``Session.replan``: checks, new executor) and the first sync by
    the new plan (which binds its copy programs), and a second sync by it. The last is verified."""
    from planners.build import PlanBuilder

    job = JobSpec.from_dict(spec)
    builder = PlanBuilder.for_job(job)
    loads = [synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.2, seed=s) for s in range(2 * reps + 1)]
    plan = builder.plan(job.placement(loads[0]))
    sources, targets = endpoints(plan)
    session = Session.open(plan, range(plan.num_ranks), SoloTransport(), sources, targets, SyncSettings(),
                           tile_bytes=tile_kb << 10, moving_tile_bytes=moving_tile_kb << 10,
                           collect_during_sync=collect_during_sync)
    srcs, tgts = session.sources, session.targets
    collections = Collections()  # inside each timed sync

    def timed_sync(verify: bool = False):
        torch.cuda.synchronize()
        with collections:
            t0 = time.perf_counter()
            stats = session.executor.sync(srcs, tgts, verify=verify)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
        return seconds, stats

    timed_sync()  # binds
    unchanged = [timed_sync()[0] for _ in range(reps)]
    plan_s, rebind_s, first_s, second_s = [], [], [], []
    checked = None
    profiler = None
    first_gc_s = []
    for i, load in enumerate(loads[1: reps + 1]):
        if profile and i == reps - 1:  # the last change: where the rebind and first sync spend their time
            import cProfile

            profiler = cProfile.Profile()
        t0 = time.perf_counter()
        new = builder.plan(job.placement(load))
        t1 = time.perf_counter()
        if profiler is not None:
            profiler.enable()
        session.replan(new)
        t2 = time.perf_counter()
        first, _ = timed_sync()
        first_gc_s.append(collections.seconds[-1])
        if profiler is not None:
            profiler.disable()
        plan_s.append(t1 - t0)
        rebind_s.append(t2 - t1)
        first_s.append(first)
        second_s.append(timed_sync()[0])
    # prepared: the new plan bound while the trainer steps (Session.prepare), then the sync
    prepare_s, prepared_s = [], []
    for load in loads[reps + 1:]:
        new = builder.plan(job.placement(load))
        t0 = time.perf_counter()
        session.prepare(new)
        prepare_s.append(time.perf_counter() - t0)
        prepared_s.append(timed_sync()[0])
    timelines = {}
    if timeline:  # one more change, and one more sync by an unchanged plan, each under the profiler
        session.replan(builder.plan(job.placement(loads[0])))
        timelines["first sync after a change"] = gpu_timeline(lambda: session.executor.sync(srcs, tgts, verify=False))
        timelines["unchanged"] = gpu_timeline(lambda: session.executor.sync(srcs, tgts, verify=False))
        for label, t in timelines.items():
            print(label, json.dumps(t), file=sys.stderr, flush=True)
    _, checked = timed_sync(verify=True)
    if profiler is not None:
        import pstats

        pstats.Stats(profiler).sort_stats("cumtime").print_stats(35)
    med = statistics.median
    row = dict(case=name, copies="replan", tile_kb=tile_kb, moving_tile_kb=moving_tile_kb,
               collect_during_sync=collect_during_sync,
               first_sync_gc_s=med(first_gc_s), first_sync_gc_max_s=max(first_gc_s), payload=int(plan.chunks["nbytes"].sum()), chunks=len(plan.chunks),
               sync_unchanged_s=med(unchanged), replan_plan_s=med(plan_s), rebind_s=med(rebind_s),
               first_sync_s=med(first_s), second_sync_s=med(second_s),
               changed_over_unchanged=(med(rebind_s) + med(first_s)) / med(unchanged),
               with_planning_over_unchanged=(med(plan_s) + med(rebind_s) + med(first_s)) / med(unchanged),
               prepare_s=med(prepare_s), prepared_sync_s=med(prepared_s),
               prepared_over_unchanged=med(prepared_s) / med(unchanged),
               spread=dict(unchanged=[min(unchanged), max(unchanged)], first=[min(first_s), max(first_s)],
                           rebind=[min(rebind_s), max(rebind_s)], prepared=[min(prepared_s), max(prepared_s)]),
               verified=bool(checked.verified))
    if timelines:
        row["timelines"] = timelines
    return row


def _ipc_worker(rank: int, spec: dict, port: int, reps: int, bucket_bytes: int, mode: str) -> dict:
    from sync.transport import standalone_transport

    torch.cuda.set_device(0)
    plan = build_plan(JobSpec.from_dict(spec)).validate()
    transport = standalone_transport(rank, 2, "127.0.0.1", port, 300, store_on_rank0=False)  # gloo: control only
    sources, targets = endpoints(plan, [rank])
    session = Session.open(plan, rank, transport, sources, targets,
                           SyncSettings(bucket_mb=bucket_bytes / (1 << 20), timeout_s=300), ipc=mode)
    ex, source, target = session.executor, session.source, session.target
    ex.sync(source, target, verify=False)
    times, parts = [], []
    for _ in range(reps):
        transport.barrier().wait()
        stats = ex.sync(source, target, verify=False)
        times.append(stats.global_seconds)
        parts.append((stats.seconds, stats.wait_seconds, stats.pack_seconds + stats.unpack_seconds,
                      stats.check_seconds, stats.stage_seconds.get(1, 0.0), stats.stage_seconds.get(2, 0.0)))
    # the reader's copies alone, on the GPU (CUDA events), out of the lenders' tensors as last borrowed
    pulls = [p for programs in (ex._pull[2].values() if ex._pull else ()) for p in programs]
    kernel = statistics.median(gpu_seconds(pulls) for _ in range(reps)) if pulls else 0.0
    if target is not None:
        poison(targets)
    last = ex.sync(source, target, verify=True)
    own, waiting, copying, check, stage1, stage2 = (statistics.median(p) for p in zip(*parts))
    return dict(seconds=statistics.median(times), verified=bool(last.verified), peak=last.peak_buffer_bytes,
                own_s=own, wait_s=waiting, copy_s=copying, check_s=check, stage1_s=stage1, stage2_s=stage2,
                pull_kernel_s=kernel)


def run_ipc(name: str, spec: dict, reps: int, bucket_mb: int, mode: str = "arena") -> dict:
    from sync.run.local import host_store, spawn_ranks

    plan = build_plan(JobSpec.from_dict(spec)).validate()
    payload = int(plan.chunks["nbytes"].sum())
    store = host_store(timeout_s=300)
    results, _ = spawn_ranks(2, _ipc_worker, (spec, store.port, reps, bucket_mb << 20, mode), timeout_s=600)
    seconds = max(r["seconds"] for r in results.values())
    flat = flat_copy_gbps(payload, reps)
    return dict(case=f"{name}, 2 processes", copies=f"ipc {mode}", recheck=True, payload=payload, chunks=len(plan.chunks),
                engine_tensors=len(plan.locals_of(1)), runs=0, launches=0, wall_s=seconds, gbps=payload / seconds / 1e9,
                kernel_gbps=None, flat_gbps=flat, bind_s=0.0, exact=all(r["verified"] for r in results.values()),
                bucket_mb=bucket_mb, arena_bytes=results[0]["peak"],
                # each process's own seconds, waiting for the other, and copying (medians)
                processes={rank: {k: r[k] for k in ("own_s", "wait_s", "copy_s", "check_s", "stage1_s", "stage2_s",
                                                    "pull_kernel_s")} for rank, r in results.items()})


def run_kernel_sweep(name: str, spec: dict, reps: int, tiles_kb=(64, 256), blocks=(256, 512, 1024, 2048),
                     warps_=(2, 4, 8, 16), alternate: bool = True) -> list[dict]:
    """The copy kernel's knobs on one case's copy programs: for each tile size the programs are bound
    with, each ``KernelConfig`` times every local program back to back (CUDA events, median of
    ``reps``) and is checked bit for bit against the default's result; then, with the default, syncs
    with and without the per-sync address check alternate on one executor (medians: wall, the check's
    host seconds, the launches'). Ratios are to a flat copy of the payload measured in the same run."""
    from itertools import product

    from sync.copy_kernel import DEFAULT, KernelConfig

    plan = case_plan(spec)
    payload = int(plan.chunks["nbytes"].sum())
    sources, targets = endpoints(plan)
    flat = flat_copy_gbps(payload, reps)
    configs = [KernelConfig(block, warps) for block, warps in product(blocks, warps_)]
    rows, ref = [], None
    for tile_kb in tiles_kb:
        session = Session.open(plan, range(plan.num_ranks), SoloTransport(), sources, targets, SyncSettings(),
                               tile_bytes=tile_kb << 10, moving_tile_bytes=tile_kb << 10)  # every program alike
        ex = session.executor
        ex.sync(session.sources, session.targets, verify=False)  # binds
        programs = [p for stage in (1, 2) for p in ex._binding.local[stage]]
        if ref is None:
            ref = snapshot(targets)
        for config in configs:
            poison(targets)
            gpu_seconds(programs, config)  # compiles, and leaves the result to compare
            exact = same(targets, ref)
            seconds = statistics.median(gpu_seconds(programs, config) for _ in range(reps))
            rows.append(dict(case=name, tile_kb=tile_kb, block=config.block, num_warps=config.num_warps,
                             default=config == DEFAULT, kernel_s=seconds, x_flat=payload / seconds / 1e9 / flat, exact=exact))
            print(json.dumps(rows[-1]), flush=True)
        if alternate and tile_kb == tiles_kb[0]:
            rows.append(alternate_check(ex, session, reps, payload, flat, name))
            print(json.dumps(rows[-1]), flush=True)
        del session, ex, programs
        gc.collect()
    del ref, sources, targets
    torch.cuda.empty_cache()
    return rows



def alternate_check(ex, session, reps: int, payload: int, flat: float, name: str) -> dict:
    """Syncs with the per-sync address check on and off, alternating on one executor."""
    timings: dict[bool, list] = {True: [], False: []}
    for _ in range(reps):
        for recheck in (True, False):
            ex.recheck = recheck
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            stats = ex.sync(session.sources, session.targets, verify=False)
            timings[recheck].append((time.perf_counter() - t0, stats.check_seconds, stats.pack_seconds))
    ex.recheck = True
    med = lambda xs: statistics.median(xs)  # noqa: E731
    out = dict(case=name, variant="address check on vs off, alternating", flat_gbps=flat)
    for recheck, label in ((True, "checked"), (False, "trusted")):
        walls, checks, launches = zip(*timings[recheck])
        out.update({f"{label}_s": med(walls), f"{label}_spread_s": [min(walls), max(walls)],
                    f"{label}_x_flat": payload / med(walls) / 1e9 / flat, f"{label}_check_s": med(checks),
                    f"{label}_launch_s": med(launches)})
    return out


def run_address_check(count: int, dicts: int, reps: int, device: str = "cuda") -> dict:
    """What the per-sync check that no tensor moved costs for ``count`` CUDA tensors in ``dicts``
    endpoint dicts, by way of checking (medians of ``reps``, milliseconds): listing the dicts' tensors,
    the executor's check (identities in Python, addresses in C++ once ``sync.addresses`` has built that
    part), torch's C++ loop over the Python list (the check until then), and two Python-level passes."""
    import numpy as np
    from itertools import chain

    from sync.addresses import Addresses, native_check
    from sync.executor import PlanExecutor

    per = -(-count // dicts)
    pool = torch.empty(count * 64, dtype=torch.uint8, device=device)
    given = [(r, {f"t{i}": pool[(r * per + i) * 64:(r * per + i + 1) * 64] for i in range(min(per, count - r * per))},
              "target") for r in range(dicts)]
    key = PlanExecutor._key(given)
    want = np.array(key[1], dtype=np.int64)

    def listed():
        return list(chain.from_iterable(d.values() for _, d, _ in given))

    def fromiter():
        tensors = listed()
        return np.array_equal(np.fromiter(map(torch.Tensor.data_ptr, tensors), dtype=np.int64, count=len(tensors)), want)

    def mapped():
        return list(map(torch.Tensor.data_ptr, listed())) == key[1]

    from_python = Addresses(key[2].tensors, key[1], native=False)
    out = dict(tensors=count, dicts=dicts, native_built=native_check.module is not None)  # main waited for it
    for name, fn in (("list", listed), ("executor", lambda: PlanExecutor._moved(given, key)),
                     ("torch loop", lambda: from_python.moved([d for _, d, _ in given])),
                     ("numpy fromiter", fromiter), ("python map", mapped)):
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name + "_ms"] = statistics.median(times) * 1e3
        out[name + "_spread_ms"] = [min(times) * 1e3, max(times) * 1e3]
    assert not PlanExecutor._moved(given, key) and not from_python.moved([d for _, d, _ in given])
    first = given[0][1]
    name = next(iter(first))
    first[name].data = first[name].clone()  # moved under the same object: both checks see it
    assert PlanExecutor._moved(given, key) and from_python.moved([d for _, d, _ in given])
    return out


def _verify_ms(row: dict) -> str:
    """What verification adds, in 4-byte words and (in brackets) element by element; '-' where not timed."""
    if "verify_s" not in row:
        return "-"
    elements = row.get("verify_elements_s")
    return f"{row['verify_s'] * 1e3:.1f}" + ("" if elements is None else f" ({elements * 1e3:.1f})")


def print_table(rows: list[dict], card: str, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"colocated refresh on one {card} (payload GB/s; ratio to a flat copy of the same bytes)")
    for col in ("case", "payload GB", "tensors", "runs", "variant", "launches", "sync GB/s", "x flat",
                "kernel GB/s", "flat GB/s", "bind s", "verify ms (elements)", "exact"):
        table.add_column(col)
    for r in rows:
        variant = {"auto": "triton", "foreach": "foreach", "slices": "per-slice copy_",
                   "ipc arena": f"CUDA IPC arena, {r.get('bucket_mb')} MB buckets",
                   "ipc direct": "CUDA IPC direct (one copy)"}[r["copies"]]
        variant += "" if r["recheck"] else " (trusted)"
        kernel = "-" if r["kernel_gbps"] is None else f"{r['kernel_gbps']:.0f}"
        table.add_row(r["case"], f"{r['payload'] / 1e9:.2f}", str(r["engine_tensors"]), str(r["runs"] or r["chunks"]),
                      variant, str(r["launches"]), f"{r['gbps']:.0f}", f"{r['gbps'] / r['flat_gbps']:.2f}",
                      kernel, f"{r['flat_gbps']:.0f}", f"{r['bind_s']:.1f}", _verify_ms(r),
                      str(r["exact"] and r.get("verified", True)))
    (console or Console(width=200)).print(table)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=[c for c in CASES if c != "dense 8B tp1->tp1"], choices=list(CASES))
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--slices-reps", type=int, default=2)
    ap.add_argument("--ipc", action="store_true", help="add the two-process CUDA IPC case")
    ap.add_argument("--ipc-bucket-mb", type=int, nargs="*", default=[256, 4096])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--replan", action="store_true",
                    help="only: a refresh after an expert placement change against one without (the MoE case)")
    ap.add_argument("--tile-kb", type=int, nargs="*", default=[64],
                    help="with --replan: the copy programs' tile sizes to compare, one session each")
    ap.add_argument("--moving-tile-kb", type=int, nargs="*", default=[256],
                    help="with --replan: the routed experts' local programs' tile sizes, each with every --tile-kb")
    ap.add_argument("--profile", action="store_true", help="with --replan: profile the last rebind and first sync")
    ap.add_argument("--timeline", action="store_true",
                    help="with --replan: the GPU's kernels and idle stretches in a first sync after a change and in an unchanged one")
    ap.add_argument("--address-check", type=int, default=0, metavar="TENSORS",
                    help="only: what checking that this many tensors have not moved costs, by way of checking")
    ap.add_argument("--kernel-sweep", action="store_true",
                    help="only: the copy kernel's knobs (tile size, block, warps) on the MoE and dense cases, and "
                         "syncs with and without the address check alternating")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("the GPU benchmark needs a CUDA device")
    card = torch.cuda.get_device_name()
    from sync.addresses import native_check

    t0 = time.perf_counter()  # every case checks addresses as a user's syncs will, once the C++ part is built
    built = native_check.wait(900) is not None
    print(f"C++ address check {'built' if built else f'not built ({native_check.error})'} in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    if args.address_check:
        row = run_address_check(args.address_check, 16, 20)
        print(json.dumps(row), flush=True)
        if args.out:
            Path(args.out).write_text(json.dumps(dict(card=card, rows=[row]), indent=1))
        return
    if args.kernel_sweep:
        name = "dsv3-like tp2ep4->dp8ep8+32"
        rows = run_kernel_sweep(name, CASES[name], args.reps)
        rows += run_kernel_sweep("dense 1.7B tp1->tp1", CASES["dense 1.7B tp1->tp1"], args.reps, alternate=False)
        if args.out:
            Path(args.out).write_text(json.dumps(dict(card=card, rows=rows), indent=1))
        return
    if args.replan:
        name = "dsv3-like tp2ep4->dp8ep8+32"
        rows = []
        for tile_kb, moving_kb, collect in [(kb, m, c) for kb in args.tile_kb for m in args.moving_tile_kb
                                            for c in (True, False)]:
            rows.append(run_replan(name, CASES[name], args.reps, args.profile, tile_kb, collect, moving_kb, args.timeline))
            print(json.dumps(rows[-1]), flush=True)
            gc.collect()  # the session's tensors, before the next one allocates its own
            torch.cuda.empty_cache()
        if args.out:
            Path(args.out).write_text(json.dumps(dict(card=card, rows=rows), indent=1))
        return
    rows = [r for name in args.cases for r in run_case(name, CASES[name], args.reps, args.slices_reps)]
    if args.ipc:
        name = "dense 1.7B tp1->tp1"
        for mb in args.ipc_bucket_mb:
            rows.append(run_ipc(name, CASES[name], args.reps, mb))
            print(json.dumps(rows[-1]), flush=True)
        for name in (name, "dense 8B tp1->tp1"):  # one copy: what a fixed cost per sync weighs at two sizes
            rows.append(run_ipc(name, CASES[name], args.reps, args.ipc_bucket_mb[0], "direct"))
            print(json.dumps(rows[-1]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(dict(card=card, rows=rows), indent=1))
    print_table(rows, card)
