"""Block-FP8 engines: which weights an engine holds in FP8, how a plan carries them, and the reference
quantizer.

With ``inference.quantization: fp8_block`` the engine holds the linear weights of attention and MLPs
and every routed expert's weights as vLLM's block-FP8 method does: the weight in ``float8_e4m3fn`` and
``weight_scale_inv`` in float32, one scale per 128 x 128 block of the weight
(``[ceil(rows / 128), ceil(cols / 128)]``; per expert slot for fused MoE; a fused tensor keeps each
part's blocks). Embeddings, norms, the head and (except where vLLM quantizes it) the router stay in the
model dtype.

The plan moves FP8 bytes and scales, quantized where they leave the trainer: the catalog keeps each
quantized weight ``W`` in the model dtype (what the trainer holds) and adds ``W:fp8`` (its FP8 values)
and ``W_scale_inv`` (named as DeepSeek-V3's FP8 checkpoints name it). A trainer rank's local tensor that
holds parts of ``W`` gets two *derived* locals beside it, ``<local>:fp8`` (same shape, FP8) and
``<local>:scale_inv`` (its block grid), which the executor computes from the local before the bytes move
(``plan.derived``). That is exact only where the rank's part is made of whole blocks of the logical
tensor: every piece starting on a block boundary and ending on one or at the tensor's end. Where a
trainer shard cuts a block (Megatron's column-parallel MLA down projections, say), the engine receives
that weight in full precision and quantizes it on arrival (``<local>:wire``); engine shards must be whole
blocks in every case (vLLM refuses others too), else the layout is refused, naming the field.

Quantization (DeepSeek-V3's reference weight quantizer): per 128 x 128 block, ``s = max|x| / 448`` in
float32, ``q = x / s`` in float32 cast to ``float8_e4m3fn`` (round to nearest even), ``weight_scale_inv
= s``; an all-zero block has ``s = 0`` and zeros. :func:`reference_quantize` is a numpy implementation,
independent of torch's casts, that tests hold the executor to.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from planners.errors import ShardError
from planners.models import Catalog, LogicalTensor, ModelSpec, router_prefix
from planners.sides.shards import LocalTensor, Piece

__all__ = ["FP8", "BLOCK", "FP8_MAX", "QUANTIZATIONS", "quantized_ids", "quantize_catalog", "quantize_templates",
           "reference_quantize", "reference_dequantized", "scale_shape", "is_internal", "is_derived_tensor", "FP8_SUFFIX", "SCALE_SUFFIX"]

FP8 = "float8_e4m3fn"
BLOCK = 128
FP8_MAX = 448.0
QUANTIZATIONS = ("fp8_block",)
FP8_SUFFIX = ":fp8"  # a trainer local's FP8 copy
SCALE_SUFFIX = ":scale_inv"  # and its scales
# families whose vLLM MoE router is a quantized linear under block FP8 (vLLM 0.33: Qwen3-MoE's mlp.gate
# takes the quant config; DeepSeek-V3's, GLM-4.5's and Mixtral's routers do not)
_QUANTIZED_ROUTERS = {"qwen3_moe"}
_NEVER = ("model.embed_tokens.weight", "lm_head.weight")


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


def scale_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale grid of a weight (or a stack of them): its last two dimensions in 128-blocks."""
    return (*shape[:-2], _blocks(shape[-2]), _blocks(shape[-1]))


def quantized_ids(spec: ModelSpec, cat: Catalog) -> list[int]:
    """Logical tensors an FP8 engine holds in FP8: 2-D linear weights (attention, MLPs, shared and routed
    experts; the router where vLLM quantizes it), not embeddings, norms or the head."""
    routers = {f"{router_prefix(spec, layer)}.weight" for layer in spec.moe_layers}
    quantize_router = spec.family in _QUANTIZED_ROUTERS
    out = []
    for i, t in enumerate(cat.tensors):
        last = t.name.rsplit(".", 2)[-2] if t.name.count(".") >= 2 else t.name
        if (len(t.shape) != 2 or not t.name.endswith(".weight") or t.name in _NEVER or "norm" in last
                or (t.name in routers and not quantize_router)):
            continue
        out.append(i)
    return out


def quantize_catalog(spec: ModelSpec, cat: Catalog) -> Catalog:
    """The catalog an FP8 plan moves: after each quantized weight ``W`` (kept, in the model dtype: what
    the trainer holds), ``W:fp8`` (its FP8 values) and ``W_scale_inv`` (its block scales)."""
    ids = set(quantized_ids(spec, cat))
    tensors: list[LogicalTensor] = []
    for i, t in enumerate(cat.tensors):
        tensors.append(t)
        if i in ids:
            tensors.append(replace(t, name=t.name + FP8_SUFFIX, dtype=FP8))
            tensors.append(LogicalTensor(t.name + "_scale_inv", scale_shape(t.shape), "float32", t.split_dim, t.layer,
                                         t.expert))
    return Catalog(tensors)


def is_derived_tensor(name: str) -> bool:
    """A logical tensor of an FP8 plan's catalog that the plan computes from a weight (``W:fp8``,
    ``W_scale_inv``), not one the trainer holds."""
    return name.endswith(FP8_SUFFIX) or name.endswith("_scale_inv")


def is_internal(name: str) -> bool:
    """A local tensor the plan adds and the executor keeps (an FP8 copy, its scales, a receiving buffer)."""
    return ":" in name


def quantize_templates(templates: list[tuple[LocalTensor, ...]], cat: Catalog, num_trainer: int,
                       model_dtype: str) -> list[tuple[LocalTensor, ...]]:
    """Every rank's local tensors for an FP8 plan (``cat``: :func:`quantize_catalog`'s; the templates made
    with it, pieces naming the full-precision weights). Each quantized weight is sent in FP8 where every
    trainer rank's part of it is made of whole blocks: the rank quantizes it (derived ``<local>:fp8`` and
    ``<local>:scale_inv`` beside its local) and engines receive FP8 values and scales. Where a trainer
    shard cuts a block, no rank could quantize it alone: the engine receives it in full precision
    (``<local>:wire``) and quantizes it on arrival; its parts must still be whole blocks. Ranks sharing a
    template share its transform."""
    fp8_of = {i: cat.index[t.name + FP8_SUFFIX] for i, t in enumerate(cat.tensors) if t.name + FP8_SUFFIX in cat.index}
    at_receiver = _cut_by_trainer(templates[:num_trainer], cat, fp8_of)
    for tensors in templates[num_trainer:]:  # an engine tensor mixing both ways is quantized on arrival
        for local in tensors:
            ids = {p.tensor for p in local.pieces if p.tensor in fp8_of}
            if ids & at_receiver:
                at_receiver |= ids
    done: dict[int, tuple[LocalTensor, ...]] = {}
    out = []
    for rank, tensors in enumerate(templates):
        key = id(tensors)
        if key not in done:
            make = _trainer_local if rank < num_trainer else _engine_local
            done[key] = tuple(t for local in tensors for t in make(local, cat, fp8_of, at_receiver, model_dtype))
        out.append(done[key])
    return out


def _cut_by_trainer(templates, cat: Catalog, fp8_of: dict[int, int]) -> set[int]:
    """Quantized weights some trainer rank holds a part of that is not made of whole blocks."""
    cut: set[int] = set()
    seen: set[int] = set()
    for tensors in templates:
        if id(tensors) in seen:
            continue
        seen.add(id(tensors))
        for local in tensors:
            for p in local.pieces:
                if p.tensor in fp8_of and p.tensor not in cut and _block_cut(p, local, cat) is not None:
                    cut.add(p.tensor)
    return cut


def _block_cut(p: Piece, local: LocalTensor, cat: Catalog) -> str | None:
    """Why piece ``p`` of a quantized weight is not whole blocks of it in ``local`` (None if it is)."""
    w = cat.tensors[p.tensor]
    matrix = local.shape[-2] * local.shape[-1] if len(local.shape) >= 2 else 0
    block = w.outer * p.dim * w.inner
    if block != matrix or p.base % block:
        return f"its part of {w.name} is not a whole matrix of it"
    extent = w.shape[w.split_dim]
    cuts = [x for x in (p.lo, p.off) if x % BLOCK] + ([p.hi] if p.hi % BLOCK and p.hi != extent else [])
    if cuts or ((p.hi - p.lo) % BLOCK and p.off + p.hi - p.lo != p.dim):
        return f"it holds {w.name}[{p.lo}:{p.hi}] (at {p.off} of {p.dim}), which cuts its {BLOCK}x{BLOCK} FP8 blocks"
    return None


def _trainer_local(local: LocalTensor, cat: Catalog, fp8_of: dict[int, int], at_receiver: set[int],
                   model_dtype: str) -> list[LocalTensor]:
    sent = [p for p in local.pieces if p.tensor in fp8_of and p.tensor not in at_receiver]
    if not sent:
        return [local]
    value = [replace(p, tensor=fp8_of[p.tensor]) for p in sent]
    scales = [_scale_piece(p, local, cat) for p in sent]
    return [local,
            LocalTensor(local.rank, local.name + FP8_SUFFIX, local.shape, FP8, value, source=local.name),
            LocalTensor(local.rank, local.name + SCALE_SUFFIX, scale_shape(local.shape), "float32", scales,
                        source=local.name)]


def _engine_local(local: LocalTensor, cat: Catalog, fp8_of: dict[int, int], at_receiver: set[int],
                  model_dtype: str) -> list[LocalTensor]:
    quantized = [p for p in local.pieces if p.tensor in fp8_of]
    if not quantized:
        return [local]
    if len(quantized) != len(local.pieces):
        raise ShardError(f"inference tensor {local.name} holds FP8 and unquantized tensors together; the FP8 engine "
                         "cannot hold it (inference.quantization)")
    for p in quantized:
        why = _block_cut(p, local, cat)
        if why is not None:
            raise ShardError(f"inference tensor {local.name}: {why} (inference.quantization: fp8_block; vLLM refuses "
                             f"such shards too): pick inference.tp (and dp without enable_ep) so that its shards of "
                             f"it are multiples of {BLOCK}")
    scale_name = local.name + "_scale_inv"
    if quantized[0].tensor in at_receiver:  # received in full precision, quantized on arrival
        wire = local.name + ":wire"
        return [LocalTensor(local.rank, wire, local.shape, model_dtype, quantized),
                LocalTensor(local.rank, local.name, local.shape, FP8, [], source=wire),
                LocalTensor(local.rank, scale_name, scale_shape(local.shape), "float32", [], source=wire)]
    value = [replace(p, tensor=fp8_of[p.tensor]) for p in quantized]
    scales = [_scale_piece(p, local, cat) for p in quantized]
    return [LocalTensor(local.rank, local.name, local.shape, FP8, value),
            LocalTensor(local.rank, scale_name, scale_shape(local.shape), "float32", scales)]


def _scale_piece(p: Piece, local: LocalTensor, cat: Catalog) -> Piece:
    """The piece of ``W_scale_inv`` that the blocks of piece ``p`` (of ``W``, whole blocks) have in the
    local's scale grid."""
    w = cat.tensors[p.tensor]
    block = w.outer * p.dim * w.inner
    grid = _blocks(local.shape[-2]) * _blocks(local.shape[-1])
    scale = cat.index[w.name + "_scale_inv"]
    return Piece(scale, p.lo // BLOCK, _blocks(p.hi), (p.base // block) * grid, _blocks(p.dim), p.off // BLOCK)


def reference_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek-V3's block quantizer on ``x [..., rows, cols]`` (any float dtype; computed in float32):
    the FP8 values as ``float8_e4m3fn`` bit patterns (uint8) and the float32 scales ``[..., ceil(rows/128),
    ceil(cols/128)]``. Rounding to FP8 is done here in float64 arithmetic, not by any library's cast."""
    x = np.asarray(x, dtype=np.float32)
    *lead, rows, cols = x.shape
    gr, gc = _blocks(rows), _blocks(cols)
    padded = np.zeros((*lead, gr * BLOCK, gc * BLOCK), dtype=np.float32)
    padded[..., :rows, :cols] = x
    blocks = padded.reshape(*lead, gr, BLOCK, gc, BLOCK)
    amax = np.abs(blocks).max(axis=(-3, -1))  # [..., gr, gc]
    scale = (amax / np.float32(FP8_MAX)).astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)
    q = (blocks / safe[..., :, None, :, None]).astype(np.float32)  # float32 division, as the quantizer does
    q = np.where((scale == 0)[..., :, None, :, None], np.float32(0), q)
    bits = _e4m3_bits(q.reshape(padded.shape)[..., :rows, :cols])
    return bits, scale


def _e4m3_bits(v: np.ndarray) -> np.ndarray:
    """float32 values (|v| <= 448 up to rounding) to float8_e4m3fn bits, rounding to nearest even and
    saturating at 448 as torch's cast does."""
    a = np.abs(v.astype(np.float64))
    sign = (np.signbit(v).astype(np.uint8) << 7)
    _, exp2 = np.frexp(a)  # a = m * 2**exp2, m in [0.5, 1)
    e = np.maximum(exp2 - 1, -6)  # below 2**-6: the subnormal quantum 2**-9
    quantum = np.ldexp(1.0, e - 3)
    r = np.rint(a / quantum) * quantum  # half to even
    r = np.minimum(r, FP8_MAX)
    _, exp_r = np.frexp(r)
    e_r = exp_r - 1
    normal = r >= 2.0 ** -6
    exp_field = np.where(normal, e_r + 7, 0)
    mant = np.where(normal, np.rint((r / np.ldexp(1.0, e_r) - 1) * 8), np.rint(r / 2.0 ** -9))
    bits = (exp_field.astype(np.int64) << 3) | mant.astype(np.int64)
    bits = np.where(r == 0, 0, bits)
    return (bits.astype(np.uint8) | sign).astype(np.uint8)


def _e4m3_values(bits: np.ndarray) -> np.ndarray:
    """float8_e4m3fn bit patterns (uint8) as float32 values (no NaN patterns arise from the quantizer)."""
    bits = bits.astype(np.int64)
    sign = np.where(bits & 0x80, -1.0, 1.0)
    exp, mant = (bits >> 3) & 0xF, bits & 0x7
    value = np.where(exp == 0, mant * 2.0 ** -9, (1 + mant / 8.0) * np.ldexp(1.0, exp - 7))
    return (sign * value).astype(np.float32)


def reference_dequantized(spec: ModelSpec, cat: Catalog, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Full weights as an FP8 engine computes with them: each weight it quantizes (:func:`quantized_ids`,
    over the unquantized ``cat``) through :func:`reference_quantize`, then its values times their block
    scales in float32; the rest as given."""
    out = dict(weights)
    for i in quantized_ids(spec, cat):
        name = cat.tensors[i].name
        bits, scale = reference_quantize(weights[name])
        rows, cols = bits.shape
        per_element = np.repeat(np.repeat(scale, BLOCK, axis=0), BLOCK, axis=1)[:rows, :cols]
        out[name] = _e4m3_values(bits) * per_element
    return out
