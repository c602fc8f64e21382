"""A reference inference engine: vLLM-layout shards and a real forward pass on them (not a server).

One :class:`ReferenceEngine` per engine rank holds the rank's parameters (a sync target) and runs
the model's forward pass for a batch of token ids the way a TP/EP engine would: vocabulary-parallel
embedding, TP attention with GQA (KV heads replicated when tp > kv heads), RMSNorm, RoPE, gated MLP,
MoE with top-k routing where each (token, expert) goes to one of the expert's physical replicas
(spread over them, from ``log2phy``), and sums over the TP group (attention, MLP) and the engine's
DP x TP group (experts). Every DP rank runs the same tokens. It counts tokens per physical slot for
EPLB statistics. What it runs follows the model's block kinds, not its family: GQA attention (q/k/v
biases, per-head q/k norms, RoPE on all or part of each head), dense SwiGLU MLPs, MoE with a softmax
router (Qwen3-MoE, Mixtral) or a sigmoid router with correction bias, group-limited top-k and a
routing scale (DeepSeek-style, GLM-4.5), and shared experts. One pipeline stage; not MLA.
"""

from __future__ import annotations

import numpy as np
import torch

from planners.job import JobSpec
from planners.layouts import InferenceLayout
from planners.models import GQA, ModelSpec, router_prefix
from planners.plan import SyncPlan
from sync.ends.synthetic import BufferTarget
from sync.fp8 import dequantized
from sync.tensors import TORCH_DTYPES
from sync.transport import Transport

__all__ = ["ReferenceEngine", "engine_groups", "unsupported"]


def unsupported(spec: ModelSpec, layout: InferenceLayout) -> str | None:
    """Why this engine cannot run ``spec`` on ``layout`` (None when it can)."""
    if layout.pp != 1:
        return f"inference.pp={layout.pp}: the reference engine runs one pipeline stage"
    if not isinstance(spec.attention, GQA):
        return f"model {spec.model_type!r}: the reference engine runs GQA attention, not {type(spec.attention).__name__}"
    return None


def engine_groups(plan: SyncPlan, job: JobSpec, transport: Transport, rank: int) -> tuple[Transport, Transport]:
    """(TP group, DP x TP group) of engine ``rank``; every rank of the sync group must call this."""
    lay, T = job.inference, plan.num_trainer
    mine_tp = mine_ep = None
    for group in lay.grid.groups("tp"):
        g = transport.subgroup([T + r for r in group])
        mine_tp = g or mine_tp
    for group in lay.grid.groups("tp-dp"):
        g = transport.subgroup([T + r for r in group])
        mine_ep = g or mine_ep
    return mine_tp, mine_ep


class ReferenceEngine(BufferTarget):
    def __init__(self, plan: SyncPlan, job: JobSpec, rank: int, tp_group: Transport, ep_group: Transport) -> None:
        why = unsupported(job.model, job.inference)
        if why is not None:
            raise NotImplementedError(why)
        super().__init__(plan, rank)
        self.job, self.spec, self.lay = job, job.model, job.inference
        self.coords = self.lay.coords(rank - plan.num_trainer)
        self.tp_group, self.ep_group = tp_group, ep_group
        self.placement = plan.placement_of(rank)
        self.slot_counts: np.ndarray | None = None  # [moe layers, slots] tokens served per physical slot
        self._w = self.tensors  # the weights the forward pass computes with
        self.fp8 = job.inference.quantization is not None
        self.spec_dtype = TORCH_DTYPES[job.model.dtype]

    def set_placement(self, placement) -> None:
        self.placement = placement

    # -- helpers ----------------------------------------------------------------------------
    def _sum(self, x: torch.Tensor, group: Transport) -> torch.Tensor:
        group.all_reduce(x).wait()
        return x

    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.spec.rms_norm_eps)).to(x.dtype)

    def _rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE on the first ``rotary_dim`` dimensions of each head (all of them by default)."""
        d = self.spec.attention.rotary_dim or x.shape[-1]
        rot, rest = x[..., :d], x[..., d:]
        inv = 1.0 / (self.spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float) / d))
        freqs = positions[:, None].float() * inv
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos().to(x.dtype)[:, None, :], emb.sin().to(x.dtype)[:, None, :]
        half = torch.cat((-rot[..., d // 2:], rot[..., : d // 2]), dim=-1)
        return torch.cat((rot * cos + half * sin, rest), dim=-1)

    # -- forward ----------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Logits ``[seq, vocab]`` for one sequence of token ids, or ``[batch, seq, vocab]`` for a batch of
        equal-length sequences (every rank returns them); ``dtype``: compute in it (float32 to compare
        with a reference) instead of the weights' own."""
        if tokens.dim() == 1:
            return self.forward(tokens[None], dtype)[0]
        # an FP8 engine computes with its weights dequantized per block (its kernels' arithmetic)
        self._w = dequantized(self.tensors, dtype or self.spec_dtype) if self.fp8 else \
            self.tensors if dtype is None else {k: v.to(dtype) for k, v in self.tensors.items()}
        W, spec = self._w, self.spec
        tp, tp_rank = self.lay.tp, self.coords.tp
        self._batch, seq = tokens.shape
        tokens = tokens.reshape(-1)  # one row per token; attention alone sees the sequences
        emb = W["model.embed_tokens.weight"]
        vp = emb.shape[0]
        local = tokens - tp_rank * vp
        mask = (local >= 0) & (local < vp)
        x = emb[local.clamp(0, vp - 1)] * mask[:, None].to(emb.dtype)
        x = self._sum(x, self.tp_group)
        positions = torch.arange(seq).repeat(self._batch)
        moe_layers = list(spec.moe_layers)
        counts = []
        for i in range(spec.num_layers):
            p = f"model.layers.{i}"
            x = x + self._attention(self._rms(x, W[f"{p}.input_layernorm.weight"]), p, positions)
            h = self._rms(x, W[f"{p}.post_attention_layernorm.weight"])
            if i in moe_layers:
                out, served = self._moe(h, i, moe_layers.index(i))
                counts.append(served)
            else:
                out = self._sum(self._gated(h, f"{p}.mlp"), self.tp_group)
            x = x + out
        x = self._rms(x, W["model.norm.weight"])
        head = W["model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight"]
        logits = torch.zeros(x.shape[0], vp * tp, dtype=x.dtype)
        logits[:, tp_rank * vp:(tp_rank + 1) * vp] = x @ head.T
        self.slot_counts = np.stack(counts) if counts else None
        return self._sum(logits, self.tp_group)[:, : spec.vocab_size].reshape(self._batch, seq, -1)

    def _gated(self, h: torch.Tensor, prefix: str) -> torch.Tensor:
        """This rank's part of a TP-sharded SwiGLU MLP (``gate_up_proj``, ``down_proj``)."""
        g, u = (h @ self._w[f"{prefix}.gate_up_proj.weight"].T).chunk(2, dim=-1)
        return torch.nn.functional.silu(g) * u @ self._w[f"{prefix}.down_proj.weight"].T

    def _attention(self, h: torch.Tensor, p: str, positions: torch.Tensor) -> torch.Tensor:
        W, a, tp = self._w, self.spec.attention, self.lay.tp
        d = a.head_dim
        nq = a.num_heads // tp
        nkv = max(a.num_kv_heads // tp, 1)
        qkv = h @ W[f"{p}.self_attn.qkv_proj.weight"].T
        if a.qkv_bias:
            qkv = qkv + W[f"{p}.self_attn.qkv_proj.bias"]
        q, k, v = qkv.split([nq * d, nkv * d, nkv * d], dim=-1)
        rows = h.shape[0]
        q, k, v = q.reshape(rows, nq, d), k.reshape(rows, nkv, d), v.reshape(rows, nkv, d)
        if a.qk_norm:
            q, k = self._rms(q, W[f"{p}.self_attn.q_norm.weight"]), self._rms(k, W[f"{p}.self_attn.k_norm.weight"])
        q, k = self._rope(q, positions), self._rope(k, positions)
        k = k.repeat_interleave(nq // nkv, dim=1)
        v = v.repeat_interleave(nq // nkv, dim=1)
        batch, seq = self._batch, rows // self._batch
        q, k, v = (t.reshape(batch, seq, nq, d) for t in (q, k, v))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * d ** -0.5
        causal = torch.ones(seq, seq, dtype=torch.bool).tril()
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")).float(), dim=-1).to(q.dtype)
        attn = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(rows, nq * d)
        return self._sum(attn @ W[f"{p}.self_attn.o_proj.weight"].T, self.tp_group)

    def _route(self, h: torch.Tensor, router: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights, experts) ``[tokens, top_k]`` each token is sent to."""
        m, W = self.spec.moe, self._w
        logits = h.float() @ W[f"{router}.weight"].float().T
        if m.router == "softmax":
            weight, expert = torch.topk(torch.softmax(logits, dim=-1), m.top_k, dim=-1)
            if m.norm_topk_prob:
                weight = weight / weight.sum(dim=-1, keepdim=True)
        else:  # sigmoid scores; the correction bias steers the choice only; top-k within the best groups
            scores = logits.sigmoid()
            choice = scores + W[f"{router}.e_score_correction_bias"].float() if m.router_bias else scores
            grouped = choice.view(-1, m.n_group, m.num_experts // m.n_group)
            best = torch.topk(grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1), m.topk_group, dim=-1)[1]
            keep = torch.zeros_like(grouped[..., 0]).scatter_(1, best, 1).bool()
            choice = choice.masked_fill(~keep.repeat_interleave(m.num_experts // m.n_group, dim=1), float("-inf"))
            expert = torch.topk(choice, m.top_k, dim=-1)[1]
            weight = scores.gather(1, expert)
            if m.norm_topk_prob:
                weight = weight / (weight.sum(dim=-1, keepdim=True) + 1e-20)
        return (weight * m.routed_scaling_factor).to(h.dtype), expert

    def _moe(self, h: torch.Tensor, layer: int, moe_layer: int) -> tuple[torch.Tensor, np.ndarray]:
        W, m, lay = self._w, self.spec.moe, self.lay
        router = router_prefix(self.spec, layer)
        block = router.rsplit(".", 1)[0]
        weight, expert = self._route(h, router)
        phy2log = self.placement.phy2log[moe_layer] if self.placement is not None else np.arange(m.num_experts)
        P = len(phy2log)
        log2phy = [np.flatnonzero(phy2log == e) for e in range(m.num_experts)]
        group_rank = self.coords.ep_rank(lay.tp)
        w13, w2 = W[f"{block}.experts.w13_weight"], W[f"{block}.experts.w2_weight"]
        first = lay.expert_slots(P, group_rank).start
        out = torch.zeros_like(h)
        served = np.zeros(P, dtype=np.int64)
        for t in range(h.shape[0]):
            for j in range(m.top_k):
                e = int(expert[t, j])
                slot = int(log2phy[e][(t + j) % len(log2phy[e])])  # spread tokens over the replicas
                served[slot] += 1
                s = slot - first
                if not 0 <= s < w13.shape[0]:
                    continue  # another EP rank serves this replica
                g, u = (h[t] @ w13[s].T).chunk(2, dim=-1)
                out[t] += weight[t, j] * ((torch.nn.functional.silu(g) * u) @ w2[s].T)
        out = self._sum(out, self.ep_group)
        if m.num_shared_experts:
            out = out + self._sum(self._gated(h, f"model.layers.{layer}.mlp.shared_experts"), self.tp_group)
        return out, served
