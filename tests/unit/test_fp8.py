"""Block-FP8 engines: every engine tensor equals DeepSeek-V3's reference quantizer applied to the full
weights, then sliced by vLLM's layout; half the bytes cross every link; layouts that cut blocks are
refused naming the field."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from conftest import random_weights
from planners import JobError, JobSpec, build_plan
from planners.errors import ShardError
from planners.eplb.stats import synthetic_load
from planners.quant import BLOCK, FP8, _e4m3_bits, reference_quantize
from vllm_reference import reference_rank

from fp8_cases import CASES, DENSE, FP8_BLOCK, MLA, MOE


def expected_fp8(job: JobSpec, plan, full: dict[str, np.ndarray]) -> dict[int, dict[str, np.ndarray]]:
    """Every engine tensor from the reference quantizer applied to the full weights, then sliced as vLLM
    slices them: FP8 bits by vLLM's layout of the quantized weights, each scale grid by that layout of the
    weight's per-element scale (then one value per 128 x 128 block of the engine tensor)."""
    spec, lay = job.model, replace(job.inference, quantization=None)
    bits, scales = {}, {}
    for name in {t.name[: -len(":fp8")] for t in plan.tensors if t.name.endswith(":fp8")}:
        b, s = reference_quantize(full[name])
        rows, cols = full[name].shape
        bits[name] = b
        scales[name] = np.repeat(np.repeat(s, BLOCK, axis=0), BLOCK, axis=1)[:rows, :cols]
    out = {}
    for r in range(lay.world_size):
        rank = job.trainer.world_size + r
        placement = plan.placement_of(rank)
        phy2log = placement.phy2log if placement is not None else None
        plain = reference_rank(spec, lay, phy2log, r % lay.engine_size, full)
        as_bits = reference_rank(spec, lay, phy2log, r % lay.engine_size, {**full, **bits})
        per_element = reference_rank(spec, lay, phy2log, r % lay.engine_size, {**full, **scales})
        want = {}
        for i in plan.locals_of(rank):
            name = plan.local_name[i]
            if ":" in name:
                continue  # the plan's own receiving buffer
            if plan.local_dtype[i] == FP8:
                want[name] = as_bits[name]
            elif name.endswith("_scale_inv"):
                want[name] = per_element[name[: -len("_scale_inv")]][..., ::BLOCK, ::BLOCK]
            else:
                want[name] = plain[name]
        out[rank] = want
    return out


def assert_fp8_exact(job: JobSpec, plan, seed: int = 0) -> None:
    full = random_weights(job, seed)
    got = plan.simulate(full)
    for rank, want in expected_fp8(job, plan, full).items():
        for name, w in want.items():
            have = got[rank][name]
            assert have.shape == w.shape, (rank, name, have.shape, w.shape)
            np.testing.assert_array_equal(have, w, err_msg=f"rank {rank} {name}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp8_plans_give_engines_the_reference_quantizer_sliced(name):
    job = JobSpec.from_dict(CASES[name])
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.3, seed=1) if job.eplb.enabled else None
    plan = build_plan(job, load).validate()
    assert any(d == FP8 for d in plan.local_dtype)
    assert_fp8_exact(job, plan)


@settings(max_examples=15, deadline=None)
@given(st.integers(0, 2**16), st.integers(0, 3))
def test_fp8_experts_follow_every_placement(seed, weights_seed):
    job = JobSpec.from_dict(CASES["moe ep eplb"])
    load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.5, seed=seed)
    assert_fp8_exact(job, build_plan(job, load).validate(), weights_seed)


def test_the_kv_down_projection_cut_by_megatron_is_quantized_on_arrival():
    plan = build_plan(JobSpec.from_dict(CASES["mla tp2"]))
    T = plan.num_trainer
    names = set(plan.local_name[i] for i in plan.locals_of(T))
    assert "model.layers.0.self_attn.fused_qkv_a_proj.weight:wire" in names  # received in bfloat16
    assert "model.layers.0.self_attn.q_b_proj.weight:wire" not in names  # whole blocks on the trainer: FP8
    wire = np.array([plan.local_name[i].endswith(":wire") for i in plan.chunks["dst_local"]])
    assert wire.any() and {plan.tensors[t].dtype for t in plan.chunks["tensor"][wire]} == {"bfloat16"}


def test_fp8_halves_the_bytes_crossing_into_engines():
    for spec, quantized in ((CASES["moe ep eplb"], None), (None, None)):
        job = JobSpec.from_dict(spec) if spec is not None else JobSpec.from_yaml("examples/deepseek_v3_plan.yaml")
        if spec is None:
            job = replace(job, inference=replace(job.inference, quantization="fp8_block"))
        fp8 = build_plan(job)
        bf16 = build_plan(replace(job, inference=replace(job.inference, quantization=None)))
        ratio = fp8.bytes_by_stage()[1] / bf16.bytes_by_stage()[1]
        assert ratio <= 0.53, (job.name, ratio)
        assert fp8.lower_bound() < 0.53 * bf16.lower_bound()


def test_engine_shards_that_cut_blocks_are_refused_naming_the_field():
    narrow = dict(DENSE, num_attention_heads=4, num_key_value_heads=4, head_dim=64)  # q_proj: 256 rows
    job = JobSpec.from_dict(dict(model=dict(hf_config=narrow), trainer=dict(tp=2), inference=dict(tp=4, **FP8_BLOCK)))
    build_plan(replace(job, inference=replace(job.inference, quantization=None)))  # fine in bfloat16
    with pytest.raises(ShardError, match=r"q_proj.*cuts its 128x128 FP8 blocks.*pick inference\.tp"):
        build_plan(job)  # shards of 64 rows


def test_the_numpy_quantizer_rounds_as_torch_casts():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(100_000).astype(np.float32) * s for s in (1e-4, 1e-2, 1, 50, 300)]
                            + [np.array([448, -448, 0, -0.0, 2**-10, 3 * 2**-10, 2**-9, 2**-6, 447.9], np.float32)])
    torch_bits = torch.from_numpy(values).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(_e4m3_bits(values), torch_bits)
    x = rng.standard_normal((300, 260)).astype(np.float32)
    x[:128, :128] = 0  # an all-zero block: scale 0 and zeros
    bits, scale = reference_quantize(x)
    assert scale.shape == (3, 3) and scale[0, 0] == 0 and not bits[:128, :128].any()
    # each block's largest magnitude lands on 448 (0x7e, or 0xfe when negative)
    block = np.abs(x[128:256, 128:256])
    at = np.unravel_index(block.argmax(), block.shape)
    assert bits[128 + at[0], 128 + at[1]] & 0x7F == 0x7E
    assert scale[1, 1] == np.float32(block.max()) / np.float32(448)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(st.sampled_from(["moe", "mla", "dense"]), st.sampled_from([1, 2]), st.sampled_from([1, 2]),
       st.sampled_from([1, 2, 4]), st.sampled_from([1, 2]), st.sampled_from([1, 2]), st.sampled_from([1, 2]),
       st.booleans(), st.sampled_from([1, 2]), st.booleans(), st.integers(0, 2**16))
def test_random_fp8_layouts_give_engines_the_reference_quantizer_sliced(family, tp, pp, ep, itp, idp, ipp, enable_ep,
                                                                        engines, colocated, seed):
    """Random valid layouts of the three families (trainer TP/PP/EP, engine TP/DP/PP, EP or not, engines,
    colocated or not, EPLB placements): blocks cut by trainer shards are quantized on arrival, the rest at
    the sender, and every engine tensor is the reference quantizer's, sliced."""
    config = {"moe": MOE, "mla": MLA, "dense": DENSE}[family]
    moe = family != "dense"
    spec = dict(model=dict(hf_config=config), trainer=dict(tp=tp, pp=pp, **(dict(ep=ep, etp=1) if moe else {})),
                inference=dict(tp=itp, dp=idp, pp=ipp, engines=engines, **(dict(enable_ep=enable_ep) if moe else {}),
                               **FP8_BLOCK),
                deployment=dict(mode="colocated" if colocated else "disaggregated", gpus_per_node=4))
    if moe and enable_ep:
        spec["eplb"] = dict(enabled=True, num_redundant_experts=8)  # 16 slots: any EP group of 1, 2 or 4
    try:
        job = JobSpec.from_dict(spec)
        load = synthetic_load(len(job.model.moe_layers), job.model.num_experts, 1.3, seed=seed) if job.eplb.enabled else None
        plan = build_plan(job, load)
    except (JobError, ShardError):
        assume(False)
        return
    assert_fp8_exact(job, plan.validate(), seed % 4)
    assert_every_sent_derivation_is_quantized(plan)


def assert_every_sent_derivation_is_quantized(plan) -> None:
    """Each trainer rank, hosted alone, quantizes exactly the derived pairs of which it sends the value or
    the scale (the planner may take the two from different data-parallel replicas); engines all theirs."""
    from sync.executor import _derivations

    sent = set(plan.chunks["src_local"].tolist())
    pairs: dict[int, set[int]] = {}
    for local, source in plan.derived.tolist():
        pairs.setdefault(source, set()).add(local)
    for rank in range(plan.num_ranks):
        hosted = np.zeros(plan.num_ranks, dtype=bool)
        hosted[rank] = True
        made = _derivations(plan, hosted)
        trainer = rank < plan.num_trainer
        want = sorted(source for source, locals_ in pairs.items() if plan.local_rank[source] == rank
                      and (not trainer or locals_ & sent))
        assert sorted(source for source, _, _ in made["trainer" if trainer else "engine"]) == want, rank
        assert not made["engine" if trainer else "trainer"], rank


def apply_block_table(table: np.ndarray, src: np.ndarray, val: np.ndarray, scale: np.ndarray) -> None:
    """What the Triton kernel does with each row of a block table, by the numpy reference quantizer."""
    for first, value_first, scale_at, stride, rows, cols in table.tolist():
        at = (np.arange(rows)[:, None] * stride + np.arange(cols)[None, :]).ravel()
        bits, s = reference_quantize(src[first + at].reshape(rows, cols))
        val[value_first + at] = bits.ravel()
        scale[scale_at] = s[0, 0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 300), st.integers(1, 300)), min_size=1, max_size=4),
       st.integers(0, 2**16))
def test_a_block_table_quantizes_each_tensor_as_the_reference(shapes, seed):
    """Tensors at scattered offsets of one base (stacks of matrices, edge blocks cut by the tensor's end):
    every block the table names, quantized where it says, gives each tensor the reference quantizer's bits
    and scales, and nothing outside the tensors is written."""
    from sync.fp8 import block_table

    rng = np.random.default_rng(seed)
    shapes = [(m, r, c) if m > 1 else (r, c) for m, r, c in shapes]
    sizes = [int(np.prod(s)) for s in shapes]
    grids = [int(np.prod(s[:-2], dtype=np.int64)) * -(-s[-2] // BLOCK) * -(-s[-1] // BLOCK) for s in shapes]
    gaps = rng.integers(0, 50, size=len(shapes))
    first = np.cumsum(np.concatenate([[0], (np.array(sizes) + gaps)[:-1]])) + gaps[0]
    scale_first = np.cumsum(np.concatenate([[0], np.array(grids)[:-1] + 3])) + 5
    src = rng.standard_normal(int(first[-1] + sizes[-1] + 7)).astype(np.float32)
    src[int(first[0]): int(first[0]) + min(sizes[0], 200)] = 0  # a zero block, where the first tensor has one
    val = np.full(len(src), 0xA5, dtype=np.uint8)
    scale = np.full(int(scale_first[-1] + grids[-1] + 2), -1.0, dtype=np.float32)
    apply_block_table(block_table(first, first, scale_first, shapes), src, val, scale)
    touched = np.zeros(len(src), dtype=bool)
    for shape, size, f, sf, grid in zip(shapes, sizes, first, scale_first, grids):
        x = src[f: f + size].reshape(-1, *shape[-2:])
        for m in range(len(x)):
            bits, s = reference_quantize(x[m])
            np.testing.assert_array_equal(val[f + m * x[m].size: f + (m + 1) * x[m].size], bits.ravel())
            np.testing.assert_array_equal(scale[sf + m * s.size: sf + (m + 1) * s.size], s.ravel())
        touched[f: f + size] = True
        assert (scale[sf: sf + grid] >= 0).all()
    assert (val[~touched] == 0xA5).all() and (scale < 0).sum() == len(scale) - sum(grids)


def test_the_quantize_program_off_triton_is_quantize_blocks():
    from sync.fp8 import QuantizeProgram, quantize_blocks

    gen = torch.Generator().manual_seed(0)
    shapes = [(300, 260), (2, 128, 200)]
    srcs = [torch.randn(s, generator=gen).to(torch.bfloat16) for s in shapes]
    jobs = [(x.view(-1), torch.empty(x.numel(), dtype=torch.float8_e4m3fn),
             torch.empty(int(np.prod(s[:-2], dtype=np.int64)) * -(-s[-2] // BLOCK) * -(-s[-1] // BLOCK)))
            for x, s in zip(srcs, shapes)]
    QuantizeProgram(jobs, shapes, kernels="torch")()
    for (x, val, scale), s in zip(jobs, shapes):
        want_val, want_scale = torch.empty(s, dtype=torch.float8_e4m3fn), torch.empty(scale.numel())
        quantize_blocks(x.view(s), want_val, want_scale.view(*s[:-2], -(-s[-2] // BLOCK), -(-s[-1] // BLOCK)))
        assert torch.equal(val.view(torch.uint8), want_val.view(-1).view(torch.uint8)) and torch.equal(scale, want_scale)
