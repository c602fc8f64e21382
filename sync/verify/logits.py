"""An independent reference for engine logits: a Hugging Face ``transformers`` model holding the full
weights the trainer holds (``sync.verify: logits``).

Checksums prove that every byte landed where the plan says; this proves that the plan says the right
thing: an engine that runs its shards (fused QKV, gate/up, expert slots of the placement) must give
the logits of the unsharded model. Both sides compute in float32 from the same (possibly bf16) values,
so they agree to float32 rounding. Small models only: the reference holds every weight in one process.
"""

from __future__ import annotations

import numpy as np
import torch

from planners.models import ModelSpec

__all__ = ["hf_config", "hf_logits", "hf_model", "logits_agree"]


def hf_config(spec: ModelSpec) -> dict:
    """The ``config.json`` the spec was read from: what transformers builds the same model from."""
    if not spec.config:
        raise ValueError("logits verification needs the model's config.json keys: build the spec from a config "
                         "(planners.models.spec_from_config or a job spec)")
    return {**spec.config, "max_position_embeddings": max(int(spec.config.get("max_position_embeddings") or 0), 4096)}


def _fused_experts(weights: dict[str, torch.Tensor], keys: set[str]) -> dict[str, torch.Tensor]:
    """Checkpoint names (one tensor per expert) -> the model's own: transformers 5 keeps a layer's
    experts as ``gate_up_proj [E, 2I, H]`` (gate rows, then up) and ``down_proj [E, H, I]``."""
    out = dict(weights)
    for key in keys:
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len("gate_up_proj")]
            count = sum(1 for k in weights if k.startswith(prefix) and k.endswith(".gate_proj.weight"))
            out[key] = torch.stack([torch.cat([out.pop(f"{prefix}{e}.gate_proj.weight"),
                                               out.pop(f"{prefix}{e}.up_proj.weight")]) for e in range(count)])
            out[f"{prefix}down_proj"] = torch.stack([out.pop(f"{prefix}{e}.down_proj.weight") for e in range(count)])
    return out


def hf_model(spec: ModelSpec, weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The float32 HF model (eval mode) holding ``weights`` (HF checkpoint names, one tensor per expert)."""
    import transformers

    cfg = transformers.AutoConfig.for_model(**hf_config(spec))
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    own = model.state_dict()
    state = _fused_experts({k: v.float() for k, v in weights.items()}, set(own))
    if spec.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    missing, unexpected = set(own) - set(state), set(state) - set(own)
    missing = {k for k in missing if not k.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise ValueError(f"weights do not fit transformers' {type(model).__name__}: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")
    model.load_state_dict(state, strict=False)
    return model


def hf_logits(spec: ModelSpec, weights: dict[str, torch.Tensor], tokens: list[int]) -> np.ndarray:
    """Float32 logits ``[len(tokens), vocab]`` of the HF model holding ``weights`` (HF checkpoint names)."""
    model = hf_model(spec, weights)
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def logits_agree(got: np.ndarray, want: np.ndarray, tol: float = 1e-4) -> float | None:
    """None when ``got`` matches ``want`` to ``tol`` relative to the logits' scale; else the worst gap."""
    gap = float(np.max(np.abs(got - want)))
    return None if gap <= tol * max(1.0, float(np.max(np.abs(want)))) else gap
