"""Build every rank of a vLLM engine with vLLM's own classes, one process per rank (gloo), and read
what each rank holds.

Each rank runs vLLM's start-up path for an external launcher: ``EngineArgs(...).create_engine_config()``,
then under ``set_current_vllm_config``: ``init_distributed_environment`` (gloo), ``initialize_model_parallel``
and ``initialize_model``; then the model's real ``load_weights`` from Hugging Face checkpoint names.
``process_weights_after_loading`` is not run: what comes back is the loaded layout, the one the plan
writes. vLLM refuses EPLB on the CPU platform while it validates its config; a job with redundant expert
slots sets them on the config afterwards (the model classes size their expert stacks from it)."""

from __future__ import annotations

import vllm_cpu  # noqa: F401  (first: vLLM's platform)

import json
import multiprocessing as mp
import os
import socket
import traceback
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = dict(llama="LlamaForCausalLM", qwen2="Qwen2ForCausalLM", qwen3="Qwen3ForCausalLM",
                     mistral="MistralForCausalLM", qwen3_moe="Qwen3MoeForCausalLM", mixtral="MixtralForCausalLM",
                     deepseek_v3="DeepseekV3ForCausalLM", glm4_moe="Glm4MoeForCausalLM")


def engine_args(job) -> dict[str, Any]:
    """vLLM's engine settings for one engine of ``job`` (the list in ``sync/ends/vllm.py``)."""
    i = job.inference
    return dict(tensor_parallel_size=i.tp, pipeline_parallel_size=i.pp, data_parallel_size=i.dp,
                enable_expert_parallel=i.enable_ep, dtype=job.model.dtype)


def _rank(rank: int, world: int, port: int, folder: str, args: dict, redundant: int, results,
          quantized: bool = False) -> None:
    try:
        os.environ.update(VLLM_TARGET_DEVICE="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from vllm.config import set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel
        from vllm.engine.arg_utils import EngineArgs
        from vllm.model_executor.model_loader.utils import initialize_model

        if quantized:  # vLLM's CPU block-FP8 GEMMs need AMX (not on this CPU): the weights are loaded, never multiplied
            import vllm.model_executor.layers.quantization.fp8 as fp8

            fp8.init_fp8_linear_kernel = lambda *a, **k: None
        config = EngineArgs(model=folder, skip_tokenizer_init=True, enforce_eager=True, load_format="dummy",
                            max_model_len=64, distributed_executor_backend="external_launcher",
                            **args).create_engine_config()
        if redundant:
            config.parallel_config.enable_eplb = True
            config.parallel_config.eplb_config.num_redundant_experts = redundant
        with set_current_vllm_config(config):
            init_distributed_environment(world_size=world, rank=rank, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                         local_rank=rank, backend="gloo")
            initialize_model_parallel(args["tensor_parallel_size"], args["pipeline_parallel_size"])
            model = initialize_model(vllm_config=config)
            model.load_weights(iter(torch.load(Path(folder) / "weights.pt").items()))
            held = {n: p.detach().clone() for n, p in model.named_parameters()}
        torch.save(held, Path(folder) / f"rank{rank}.pt")  # tensors through a queue outlive their process badly
        results.put((rank, None))
    except BaseException:  # noqa: BLE001 - every failure goes back to the test
        results.put((rank, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_engine(job, weights: dict[str, torch.Tensor], folder: Path, timeout_s: float = 300.0,
                 quantization_config: dict | None = None) -> dict[int, dict]:
    """``{engine-local rank: {vLLM parameter name: tensor}}`` of one engine of ``job`` holding ``weights``
    (Hugging Face names), as vLLM's classes and loaders lay them out; ``quantization_config``: the
    checkpoint's (a block-FP8 one, say)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(job.model.config, architectures=[ARCHITECTURES[job.model.model_type]], torch_dtype=job.model.dtype)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(weights, folder / "weights.pt")
    args = engine_args(job)
    world = job.inference.engine_size
    ctx = mp.get_context("spawn")  # vLLM and torch.distributed want fresh interpreters
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, str(folder), args, job.eplb.num_redundant_experts, results,
                                             quantization_config is not None))
             for r in range(world)]
    for p in procs:
        p.start()
    errors = {}
    try:
        for _ in range(world):
            rank, error = results.get(timeout=timeout_s)
            if error:
                errors[rank] = error
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    if errors:
        first = min(errors)
        raise RuntimeError(f"vLLM rank {first} failed:\n{errors[first]}")
    return {r: torch.load(folder / f"rank{r}.pt") for r in range(world)}
