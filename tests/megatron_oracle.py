"""Megatron-core "oracle" for per-rank parameter names and shapes.

Builds megatron-core's ``GPTModel`` (local / non-Transformer-Engine layer spec) for ONE
global rank of a parallel layout, under torch's fake process group and on the meta
device (no memory is allocated, no communication happens), and reports
``{param_name: shape}``.  Intended as a reference for tests of our own sharding code.

``model_cfg`` keys (missing keys take the defaults in ``_DEFAULTS``):

  Common / dense (llama, qwen2, qwen3):
    num_layers, hidden_size, num_attention_heads, ffn_hidden_size, vocab_size
    num_query_groups      GQA kv heads (default: num_attention_heads)
    kv_channels           head dim (default: hidden_size // num_attention_heads)
    add_qkv_bias          bias on linear_qkv only (qwen2)               default False
    qk_layernorm          per-head q/k RMSNorm (qwen3)                  default False
    share_embeddings_and_output_weights  tied embeddings               default False
    make_vocab_size_divisible_by  vocab is padded to a multiple of this*tp (default 128);
                          set to None/0/1 to pass vocab_size to GPTModel unpadded.
    normalization         "RMSNorm" (default) or "LayerNorm"
    max_position_embeddings  default 4096 (irrelevant for shapes with rope)

  MoE (qwen3_moe, mixtral) -- enabled when num_moe_experts is set:
    num_moe_experts, moe_ffn_hidden_size, moe_router_topk (default 2)
    (always: moe_token_dispatcher_type="allgather", moe_grouped_gemm=False, swiglu)

  DeepSeek-V3 style:
    multi_latent_attention=True, q_lora_rank (None -> no q compression; uses linear_q_proj),
    kv_lora_rank, qk_head_dim, qk_pos_emb_head_dim, v_head_dim,
    moe_shared_expert_intermediate_size (None -> no shared experts),
    moe_layer_freq        int N (every N-th layer MoE) or list of 0/1 per layer (0 = dense),
                          default 1 (all MoE),
    qk_layernorm          default True when multi_latent_attention (DeepSeek's
                          q_a_layernorm / kv_a_layernorm -> self_attention.q_layernorm /
                          kv_layernorm); with it False MLA has no q/kv norm at all
    moe_router_enable_expert_bias  default False (a buffer 'mlp.router.expert_bias')
    moe_router_score_function      "softmax" (default) or "sigmoid"
    moe_shared_expert_gate         default False (param 'mlp.shared_experts.gate_weight')

Fixed choices: no linear biases (add_bias_linear=False), swiglu MLPs, rope, fp32 params,
sequence_parallel=False (shapes are identical with SP).  The local spec keeps every norm as
a separate module (input_layernorm / pre_mlp_layernorm); nothing is fused into a linear.

Layout arguments follow ``parallel_state.initialize_model_parallel``: world size is
tp*pp*cp*dp and must equal etp*ep*expert_dp*pp (megatron derives expert_dp itself).
``pp_first_stage_layers`` / ``pp_last_stage_layers`` map to TransformerConfig's
``num_layers_in_first_pipeline_stage`` / ``num_layers_in_last_pipeline_stage``.
Layer indices ``decoder.layers.{i}`` in the result are LOCAL to the pipeline stage (model chunk).

``vpp > 1`` is virtual pipeline parallelism (``virtual_pipeline_model_parallel_size``, interleaved
schedule): the rank's model chunks are built the way Megatron-LM's ``get_model`` builds them (chunk
``v`` with ``vp_stage=v``, ``pre_process``/``post_process`` from ``parallel_state`` with
``ignore_virtual=False``), and chunk ``v``'s names are reported as ``model{v}.<name>`` (Megatron-LM's
checkpoint key of chunk ``v``).  ``megatron_rank`` also reports each chunk's global layer indices
(``TransformerLayer.layer_number - 1``, i.e. what ``get_transformer_layer_offset`` gave).
"""

from __future__ import annotations

import sys
from unittest import mock
from typing import Any, Optional

import torch

_DEFAULTS: dict[str, Any] = dict(
    num_query_groups=None,
    kv_channels=None,
    add_qkv_bias=False,
    qk_layernorm=False,
    share_embeddings_and_output_weights=False,
    make_vocab_size_divisible_by=128,
    normalization="RMSNorm",
    max_position_embeddings=4096,
    num_moe_experts=None,
    moe_ffn_hidden_size=None,
    moe_router_topk=2,
    moe_shared_expert_intermediate_size=None,
    moe_layer_freq=1,
    moe_router_enable_expert_bias=False,
    moe_shared_expert_gate=False,
    moe_router_score_function="softmax",
    multi_latent_attention=False,
    q_lora_rank=None,
    kv_lora_rank=512,
    qk_head_dim=128,
    qk_pos_emb_head_dim=64,
    v_head_dim=128,
)


def padded_vocab_size(vocab_size: int, divisible_by: Optional[int], tp: int) -> int:
    """Megatron-LM's ``_vocab_size_with_padding``: round up to a multiple of divisible_by*tp."""
    if not divisible_by or divisible_by <= 1:
        return vocab_size
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def _build_config(cfg: dict[str, Any], tp: int, pp: int, ep: int, etp: int,
                  first: Optional[int], last: Optional[int], vpp: Optional[int] = None):
    from megatron.core.transformer.transformer_config import (
        MLATransformerConfig,
        TransformerConfig,
    )

    kw: dict[str, Any] = dict(
        num_layers=cfg["num_layers"],
        hidden_size=cfg["hidden_size"],
        num_attention_heads=cfg["num_attention_heads"],
        num_query_groups=cfg["num_query_groups"],
        ffn_hidden_size=cfg["ffn_hidden_size"],
        kv_channels=cfg["kv_channels"],
        add_qkv_bias=cfg["add_qkv_bias"],
        add_bias_linear=False,
        qk_layernorm=cfg["qk_layernorm"],
        normalization=cfg["normalization"],
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        # The local DotProductAttention asserts cp == 1 (only TE supports CP). CP never
        # changes parameter shapes; the process groups are still built with the real cp.
        context_parallel_size=1,
        sequence_parallel=False,  # torch-norm fallback (no apex/TE) rejects SP; shapes unaffected
        num_layers_in_first_pipeline_stage=first,
        num_layers_in_last_pipeline_stage=last,
        # allocation-free construction
        use_cpu_initialization=True,
        perform_initialization=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
    )
    if cfg["num_moe_experts"]:
        kw.update(
            num_moe_experts=cfg["num_moe_experts"],
            moe_ffn_hidden_size=cfg["moe_ffn_hidden_size"],
            moe_router_topk=cfg["moe_router_topk"],
            moe_token_dispatcher_type="allgather",
            moe_grouped_gemm=False,
            moe_shared_expert_intermediate_size=cfg["moe_shared_expert_intermediate_size"],
            moe_layer_freq=cfg["moe_layer_freq"],
            moe_router_enable_expert_bias=cfg["moe_router_enable_expert_bias"],
            moe_router_score_function=cfg["moe_router_score_function"],
            moe_shared_expert_gate=cfg["moe_shared_expert_gate"],
            moe_aux_loss_coeff=0.0,
        )
    if cfg["multi_latent_attention"]:
        kw.update(
            q_lora_rank=cfg["q_lora_rank"],
            kv_lora_rank=cfg["kv_lora_rank"],
            qk_head_dim=cfg["qk_head_dim"],
            qk_pos_emb_head_dim=cfg["qk_pos_emb_head_dim"],
            v_head_dim=cfg["v_head_dim"],
            rope_type="rope",
        )
        return MLATransformerConfig(**kw)
    return TransformerConfig(**kw)


def _mla_core_attention():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class _MLADotProductAttention(DotProductAttention):
        """megatron-core 0.16.1 bug: the local MLA spec uses DotProductAttention, but
        MLASelfAttention passes k_channels/v_channels, which it does not accept.
        (DotProductAttention has no parameters, so dropping them is harmless for shapes.)"""

        def __init__(self, *args, k_channels=None, v_channels=None, **kwargs):
            super().__init__(*args, **kwargs)

    return _MLADotProductAttention


def megatron_param_shapes(*layout, **options) -> dict[str, tuple[int, ...]]:
    """Return ``{name: shape}`` of megatron GPTModel params (+ ``*expert_bias`` buffers) held by a
    rank: the arguments of :func:`megatron_rank`."""
    return megatron_rank(*layout, **options)[0]


def megatron_rank(
    model_cfg: dict,
    tp: int,
    pp: int,
    ep: int,
    etp: int,
    cp: int,
    dp: int,
    order: str,
    rank: int,
    pp_first_stage_layers: Optional[int] = None,
    pp_last_stage_layers: Optional[int] = None,
    vpp: int = 1,
) -> tuple[dict[str, tuple[int, ...]], list[list[int]]]:
    """``({name: shape}, [global layer indices of each model chunk])`` of global ``rank``."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer import multi_latent_attention as mla_module
    from megatron.core.transformer.multi_latent_attention import MLASelfAttention

    cfg = {**_DEFAULTS, **model_cfg}
    if cfg["multi_latent_attention"] and "qk_layernorm" not in model_cfg:
        cfg["qk_layernorm"] = True  # DeepSeek's q_a_layernorm / kv_a_layernorm
    world = tp * pp * cp * dp
    assert 0 <= rank < world, (rank, world)
    virtual = vpp if vpp > 1 else None

    if dist.is_initialized():
        raise RuntimeError("megatron_param_shapes needs torch.distributed to be uninitialized")
    excepthook = sys.excepthook  # init_process_group wraps it with a "[rankN]: " prefix
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        ps.initialize_model_parallel(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            virtual_pipeline_model_parallel_size=virtual,
            # The local DotProductAttention asserts cp == 1 (only TE supports CP). CP never
            # changes parameter shapes; the process groups are still built with the real cp.
            context_parallel_size=1,
            expert_model_parallel_size=ep,
            expert_tensor_parallel_size=etp,
            order=order,
            create_gloo_process_groups=False,
        )
        config = _build_config(cfg, tp, pp, ep, etp, pp_first_stage_layers, pp_last_stage_layers, virtual)
        vocab = padded_vocab_size(cfg["vocab_size"], cfg["make_vocab_size_divisible_by"], tp)
        shapes: dict[str, tuple[int, ...]] = {}
        layers: list[list[int]] = []
        for v in range(vpp):
            vp_stage = v if virtual else None
            # Handles moe_layer_freq (dense/MoE pattern) and slices the layers of this PP stage
            # and virtual stage (for a dense model every layer is get_gpt_layer_local_spec(num_experts=None)).
            spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                              normalization=cfg["normalization"], vp_stage=vp_stage)
            for layer_spec in spec.layer_specs:
                attn = layer_spec.submodules.self_attention
                if attn.module is MLASelfAttention:
                    attn.submodules.core_attention = _mla_core_attention()
            # Workarounds (CPU-only torch, no TE): MLA's RotaryEmbedding and the router's
            # expert_bias ignore use_cpu_initialization and ask CUDA for a device; tied
            # embeddings with pp>1 do `weight.data.cuda()` before an all_reduce; and MLA's
            # `HAVE_TE and isinstance(linear_proj, TELinear)` sees HAVE_TE=True with a MagicMock
            # TELinear (megatron's TE-extension import shim), so isinstance raises.
            with torch.device("meta"), \
                    mock.patch.object(torch.cuda, "current_device", lambda: "meta"), \
                    mock.patch.object(torch.Tensor, "cuda", lambda self, *a, **k: self), \
                    mock.patch.object(mla_module, "HAVE_TE", False):
                model = GPTModel(
                    config=config,
                    transformer_layer_spec=spec,
                    vocab_size=vocab,
                    max_sequence_length=cfg["max_position_embeddings"],
                    # as Megatron-LM's get_model: the first (last) virtual stage of the first (last) rank
                    pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                    post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                    share_embeddings_and_output_weights=cfg["share_embeddings_and_output_weights"],
                    position_embedding_type="rope",
                    vp_stage=vp_stage,
                )
            prefix = f"model{v}." if virtual else ""
            shapes.update({prefix + n: tuple(p.shape) for n, p in model.named_parameters()})
            shapes.update({prefix + n: tuple(b.shape) for n, b in model.named_buffers()
                           if n.endswith("expert_bias")})
            layers.append([layer.layer_number - 1 for layer in model.decoder.layers])
        return shapes, layers
    finally:
        ps.destroy_model_parallel()
        dist.destroy_process_group()
        sys.excepthook = excepthook
