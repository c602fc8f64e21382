"""Syncs into engines built by vLLM's own start-up path, received by the ``rlsync`` weight-transfer backend.

Every plan rank is a process: trainer ranks send seeded weights (``SyntheticSource``); each engine rank
builds its model with vLLM's real loader (``get_model_loader(...).load_model``: model classes, dummy
weights, then vLLM's real ``process_weights_after_loading``, which the rlsync plugin watches), gets the
backend from vLLM's ``WeightTransferEngineFactory`` (the plugin registered it, as it does in every vLLM
process) and runs vLLM's lifecycle through the base class: ``init_transfer_engine``,
``start_weight_update``, ``update_weights`` (the base class parses the update info and calls
``receive_weights``), ``finish_weight_update``.

After each version the engine builds a *reference* model the way vLLM serves a checkpoint of that
version -- its model class, ``load_weights`` of the full Hugging Face weights, ``process_weights_after_loading``
-- and hands back both models' tensors, so a test can require the synced kernel tensors to equal vLLM's
own load bit for bit.

Two things this CPU machine lacks are stood in for, and only these: torch's CPU build has no
accelerator (vLLM calls ``torch.accelerator.empty_cache``/``synchronize`` unconditionally: no-ops here),
and this CUDA wheel of vLLM lacks its compiled CPU kernels:

* ``prepack_moe_weight``, which vLLM's CPU MoE processing calls to re-lay expert weights for its kernel.
  The stand-in re-lays them as a permutation (``prepack="permute"``: each expert's rows reversed, as a
  prepack reorders them) or leaves them as they are (``"identity"``, the way unquantized Triton MoE on
  CUDA leaves them);
* with ``onednn=True``, oneDNN's matmul (``create_onednn_mm``/``onednn_mm``), which vLLM's CPU platform
  gives every linear and ``lm_head``: the handle keeps its own copy of the weights, and linears drop
  theirs (shape ``[0]``), as in a real CPU engine. The stand-in's handle holds that copy as a tensor, so
  the comparison with vLLM's own load sees what the kernel reads.
"""

from __future__ import annotations

import vllm_cpu  # noqa: F401  (first: vLLM's platform)

import json
import os
import socket
from pathlib import Path
from typing import Any

import torch

from engine_ranks import ARCHITECTURES, engine_args

PREPACKS = ("permute", "identity")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(job, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    config = dict(job.model.config, architectures=[ARCHITECTURES[job.model.model_type]], torch_dtype=job.model.dtype)
    config.pop("dtype", None)
    (folder / "config.json").write_text(json.dumps(config))


def full_weights(plan, version: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """The Hugging Face weights the trainer ranks' SyntheticSource holds shards of, for ``version``."""
    from sync.ends.synthetic import synthetic_tensor

    return {t.name: synthetic_tensor(t, i, seed, version) for i, t in enumerate(plan.tensors)}


class _OneDnnHandle:
    """What oneDNN's matmul handle is to vLLM: its own copy of the weight ``[K, N]``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.k, self.n = weight.shape
        self.packed = weight.contiguous().clone()


def _onednn_mm(handle: _OneDnnHandle, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out = x.reshape(-1, handle.k) @ handle.packed
    out = out if bias is None else out + bias
    return out.reshape(*x.shape[:-1], handle.n)


def _stand_ins(prepack: str, onednn: bool = False) -> None:
    if onednn:
        from vllm import _custom_ops as ops

        ops._supports_onednn = True
        ops.create_onednn_mm = lambda weight, primitive_cache_size=128: _OneDnnHandle(weight)
        ops.onednn_mm = _onednn_mm
    torch.accelerator.empty_cache = lambda: None
    torch.accelerator.synchronize = lambda *args: None
    library = torch.library.Library("_C", "FRAGMENT")
    library.define("prepack_moe_weight(Tensor weight, Tensor(a!) output, str isa) -> ()")

    def permute(weight, output, isa):
        output.copy_(weight.flip(-2))

    def identity(weight, output, isa):
        output.copy_(weight)

    library.impl("prepack_moe_weight", permute if prepack == "permute" else identity, "CPU")
    _stand_ins.library = library  # a Library unregisters its ops when collected


def _bits(t: torch.Tensor):
    """A tensor's bit pattern as numpy (tensors sent through a queue outlive their process badly)."""
    from sync.tensors import as_bits

    return as_bits(t.detach().contiguous()).numpy().copy()


def _held(model) -> dict[str, Any]:
    """Every tensor the model's kernels can read: parameters, buffers and what processing derived
    (MLA's absorbed attention weights), by name."""
    from sync.ends.vllm_processing import derived_tensors

    out = {n: _bits(p) for n, p in model.named_parameters()}
    out.update({n: _bits(b) for n, b in model.named_buffers()})
    for name, module in model.named_modules():
        # EPLB's maps and views are compared on their own (the reference has no EPLB state)
        out.update({f"{name}:{where}": _bits(t) for where, t in derived_tensors(module).items()
                    if "eplb_state" not in where and not where.startswith("expert_weights")})
    return out


def _maps(holder) -> dict[str, Any]:
    return {k: getattr(holder, k).numpy().copy() for k in ("physical_to_logical_map", "logical_to_physical_map",
                                                           "logical_replica_count")}


def rank_main(rank: int, plan_json: dict, sync_port: int, vllm_port: int, folder: str, case: dict) -> dict[str, Any]:
    """One plan rank (``sync.run.local.spawn_ranks`` runs every rank in its own process)."""
    from planners.plan import SyncPlan

    plan = SyncPlan.from_dict(plan_json)
    versions = case["versions"]
    if rank < plan.num_trainer:
        from sync.ends.synthetic import SyntheticSource
        from sync.session import Session

        source = SyntheticSource(plan, rank)
        session = Session.join(plan, rank, "127.0.0.1", sync_port, source=source)
        verified = []
        for step in versions:
            if step.get("plan") is not None:
                session.replan(SyncPlan.from_dict(step["plan"]))
            source.set_version(step["version"])
            verified.append(session.sync(step["version"]).verified)
        return {"verified": verified}
    return _engine_rank(rank - plan.num_trainer, plan, sync_port, vllm_port, folder, case)


def _engine_rank(local: int, plan, sync_port: int, vllm_port: int, folder: str, case: dict) -> dict[str, Any]:
    from planners import JobSpec

    job = JobSpec.from_dict(case["job"])
    world = job.inference.engine_size
    os.environ.update(VLLM_TARGET_DEVICE="cpu", RANK=str(local), LOCAL_RANK=str(local), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(vllm_port))
    torch.set_num_threads(1)
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # what every vLLM process does first: registers the backend, watches loading
    _stand_ins(case["prepack"], case.get("onednn", False))
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import initialize_model, process_weights_after_loading

    args = engine_args(job)
    config = EngineArgs(model=folder, skip_tokenizer_init=True, enforce_eager=True, load_format="dummy",
                        max_model_len=64, distributed_executor_backend="external_launcher",
                        weight_transfer_config={"backend": "rlsync"}, **args).create_engine_config()
    eplb = case.get("eplb", False)
    if eplb:  # vLLM refuses EPLB on CPU while validating its config: switched on afterwards, for this test only
        config.parallel_config.enable_eplb = True
        config.parallel_config.eplb_config.num_redundant_experts = job.eplb.num_redundant_experts
        config.parallel_config.eplb_config.communicator = "torch_gloo"
    out: dict[str, Any] = {"reports": [], "synced": [], "reference": [], "maps": [], "loads": []}
    device = torch.device("cpu")
    with set_current_vllm_config(config):
        init_distributed_environment(world_size=world, rank=local, distributed_init_method=f"tcp://127.0.0.1:{vllm_port}",
                                     local_rank=local, backend="gloo")
        initialize_model_parallel(args["tensor_parallel_size"], args["pipeline_parallel_size"])
        model = get_model_loader(config.load_config).load_model(vllm_config=config, model_config=config.model_config)
        state = None
        if eplb:  # as the model runner does after loading
            from vllm.distributed.eplb.eplb_state import EplbState

            state = EplbState(config.parallel_config, device)
            state.add_model(model, config.model_config)
        engine = WeightTransferEngineFactory.create_engine(config.weight_transfer_config, config, device, model)
        engine.init_transfer_engine(engine.parse_init_info(dict(plan=plan.to_dict(), engine_index=0, host="127.0.0.1",
                                                                port=sync_port, backend="gloo",
                                                                mode=case.get("mode", "auto"))))
        out["mode"] = engine.mode
        out["mode_reason"] = engine.end.mode_reason
        out["staging_bytes"] = getattr(engine.end.target.versioned, "staging_bytes", 0)
        for step in case["versions"]:
            if state is not None and step.get("counts") is not None:  # what the MoE kernels count, pass by pass
                for counts in step["counts"]:
                    holder = engine.end._model_state()
                    holder.expert_load_pass.copy_(torch.tensor(counts[local], dtype=holder.expert_load_pass.dtype))
                    state.step()
                out["loads"].append(engine.expert_load())
            before = _held(model)
            engine.start_weight_update()
            try:
                engine.update_weights(dict(version=step["version"], plan=step.get("plan")))
            except Exception as e:  # noqa: BLE001 - the test reads what the engine said and holds
                out["error"], out["before"] = f"{type(e).__name__}: {e}", before
                out["reports"].append(engine.report())
                out["synced"].append(_held(model))
                break
            finally:
                engine.finish_weight_update()
            out["reports"].append(engine.report())
            out["synced"].append(_held(model))
            if state is not None:
                out["maps"].append(_maps(engine.end._model_state()))
                out.setdefault("loads_after_finish", []).append(engine.expert_load())
            if case.get("reference", True):
                # its own prefix: vLLM registers attention layers by name, once per process
                reference = initialize_model(vllm_config=config, prefix=f"reference{step['version']}")
                weights = full_weights(SyncPlanOf(step, plan), step["version"])
                reference.load_weights(iter(weights.items()))
                process_weights_after_loading(reference, config.model_config, device)
                if state is not None and step.get("plan") is not None:  # vLLM's own way to a placement
                    from vllm.distributed.eplb.eplb_state import EplbState

                    ref_state = EplbState(config.parallel_config, device)
                    ref_state.add_model(reference, config.model_config)
                    phy2log = torch.as_tensor(SyncPlanOf(step, plan).placement.phy2log)
                    ref_state.update_mapping(config.model_config, phy2log[engine.end.target.experts.moe_rows])
                    out.setdefault("update_mapping", []).append(_maps(next(iter(ref_state.model_states.values()))))
                out["reference"].append(_held(reference))
                del reference
    return out


def SyncPlanOf(step: dict, plan):
    from planners.plan import SyncPlan

    return plan if step.get("plan") is None else SyncPlan.from_dict(step["plan"])


def run(job_dict: dict, versions: list[dict], folder: Path, prepack: str = "permute", timeout_s: float = 240.0,
        grace_s: float | None = None, **case) -> dict[int, dict]:
    """Sync ``versions`` (``{"version": v, "plan": new plan dict or None, "counts": [per pass: [per engine
    rank: slot counts]]}``) from trainer ranks into one engine of the job; results by plan rank."""
    from planners import JobSpec, build_plan
    from sync.run.local import spawn_ranks

    job = JobSpec.from_dict(job_dict)
    plan = build_plan(job)
    write_config(job, folder)
    case = dict(case, job=job_dict, versions=versions, prepack=prepack)
    results, _ = spawn_ranks(plan.num_ranks, rank_main, (plan.to_dict(), _free_port(), _free_port(), str(folder), case),
                             timeout_s=timeout_s, grace_s=grace_s)
    return results
