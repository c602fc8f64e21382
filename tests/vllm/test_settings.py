"""``check_engine_config`` reads vLLM 0.33.0's own config objects: the settings a sync cannot serve are
refused before any byte moves, naming the ``LLM(...)`` argument."""

from __future__ import annotations

import vllm_cpu  # noqa: F401  (first: vLLM's platform)

import pytest

from engine_sync import write_config
from planners import JobSpec, build_plan
from sync.ends.vllm import EngineConfigError, check_engine_config

JOB = dict(model=dict(preset="tiny_qwen3_moe", overrides=dict(torch_dtype="float32")), trainer=dict(tp=1),
           inference=dict(tp=1))


def vllm_config(folder, **args):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=str(folder), skip_tokenizer_init=True, enforce_eager=True, load_format="dummy",
                      max_model_len=64, distributed_executor_backend="external_launcher",
                      **{"dtype": "float32", **args}).create_engine_config()


@pytest.mark.parametrize("args, names", [
    (dict(), None),
    (dict(cpu_offload_gb=2), "cpu_offload_gb=2"),
    (dict(dtype="bfloat16"), "dtype=bfloat16, the plan's weights are float32"),
])
def test_vllm_settings_the_sync_cannot_serve_are_named(tmp_path, args, names):
    job = JobSpec.from_dict(JOB)
    write_config(job, tmp_path)
    plan = build_plan(job)
    config = vllm_config(tmp_path, **args)
    if names is None:
        check_engine_config(plan, plan.num_trainer, config)
        return
    with pytest.raises(EngineConfigError, match=names):
        check_engine_config(plan, plan.num_trainer, config)
