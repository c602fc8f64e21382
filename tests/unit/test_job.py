"""Job specs: bad input fails early with the field named."""

from __future__ import annotations

import numpy as np
import pytest

from planners import JobError, JobSpec

BASE = dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2), inference=dict(tp=2, dp=2, enable_ep=True))


def job(**changes):
    d = {k: dict(v) for k, v in BASE.items()}
    for path, value in changes.items():
        section, _, key = path.partition("__")
        if key:
            d.setdefault(section, {})[key] = value
        else:
            d[section] = value
    return JobSpec.from_dict(d)


@pytest.mark.parametrize("changes,message", [
    (dict(trainer__tpp=2), r"trainer.tpp: unknown key"),
    (dict(trainer__tp="two"), r"trainer.tp: Input should be a valid integer"),
    (dict(inference__enable_ep="yes"), r"inference.enable_ep"),
    (dict(model={}), r"give exactly one of model.preset .*, model.hf_config or model.config"),
    (dict(model=dict(preset="nope")), r"model.preset 'nope' is unknown"),
    (dict(trainer__tp=3), r"trainer.tp=3 must divide model.preset\[tiny_qwen3_moe\].num_key_value_heads=2 \(Megatron splits "
                          r"query groups over TP\); valid: \[1, 2\]"),
    (dict(trainer__ep=3), r"trainer.ep=3 must divide the routed experts \(model.preset\[tiny_qwen3_moe\].num_experts=8\); "
                          r"valid: \[1, 2, 4, 8\]"),
    (dict(trainer__pp=3), r"num_hidden_layers=4 does not split over trainer.pp=3: .*do not split over pp=3"),
    (dict(inference__tp=3), r"inference.tp=3 must divide model.preset\[tiny_qwen3_moe\].num_attention_heads=8$"),
    (dict(inference__tp=2, trainer=dict(tp=1), model=dict(preset="tiny_qwen3", overrides=dict(num_key_value_heads=3, num_attention_heads=12))),
     r"inference.tp=2 must divide model.overrides.num_key_value_heads=3, or be a multiple of it when larger"),
    (dict(inference__dp=8), r"inference EP size \(inference dp\*tp = 8\*2 = 16\) exceeds the routed experts "
                            r"\(model.preset\[tiny_qwen3_moe\].num_experts=8\)"),
    (dict(inference__vocab_padding=5, inference__tp=4),
     r"inference.tp=4 must divide the vocabulary \(model.preset\[tiny_qwen3_moe\].vocab_size=250\) padded to a "
     r"multiple of inference.vocab_padding=5 \(250\)"),
    (dict(model=dict(preset="tiny_deepseek_v3", overrides=dict(moe_intermediate_size=15)), trainer=dict(tp=2, ep=2, etp=1)),
     r"trainer.tp=2 must divide the shared experts' width \(model.overrides.moe_intermediate_size=15 x "
     r"model.preset\[tiny_deepseek_v3\].n_shared_experts=1 = 15\)"),
    (dict(eplb=dict(num_redundant_experts=3)),
     r"eplb.num_redundant_experts=3: the model.preset\[tiny_qwen3_moe\].num_experts=8 \+ 3 = 11 physical expert slots must divide over the inference EP group "
     r"\(inference dp\*tp = 2\*2 = 4\); e.g. num_redundant_experts: 4"),
    (dict(eplb=dict(num_redundant_experts=4), inference=dict(tp=2)), r"eplb.num_redundant_experts=4 needs inference.enable_ep"),
    (dict(deployment=dict(mode="colocated"), inference__engines=2),
     r"deployment.mode=colocated needs the inference world size \(inference tp\*pp\*dp\*engines = 2\*1\*2\*2 = 8\) <= "
     r"the trainer world size \(trainer tp\*cp\*dp\*pp = 2\*1\*2\*1 = 4\)"),
    (dict(model=dict(preset="tiny_qwen3_moe", overrides=dict(num_hidden_layers=3)), trainer__pp=2),
     r"model.overrides.num_hidden_layers=3 does not split over trainer.pp=2"),
    (dict(inference__pp=5), r"model.preset\[tiny_qwen3_moe\].num_hidden_layers=4 does not split over inference.pp=5"),
    (dict(model=dict(preset="tiny_deepseek_v3", overrides=dict(first_k_dense_replace=3))),
     r"trainer.ep=2 needs a MoE model: model 'deepseek_v3' has no MoE layers \("
     r"model.preset\[tiny_deepseek_v3\].num_hidden_layers=3, model.preset\[tiny_deepseek_v3\].n_routed_experts=8, "
     r"model.overrides.first_k_dense_replace=3, model.preset\[tiny_deepseek_v3\].moe_layer_freq=1\); set trainer.ep: 1"),
    (dict(model=dict(preset="tiny_deepseek_v3", overrides=dict(first_k_dense_replace=3)), trainer=dict(tp=2)),
     r"inference.enable_ep needs a MoE model: model 'deepseek_v3' has no MoE layers .*; set inference.enable_ep: false"),
    (dict(model=dict(preset="tiny_llama"), trainer=dict(tp=2), inference=dict(tp=2), eplb=dict(enabled=True)),
     r"eplb.enabled need a MoE model: model 'llama' has no MoE layers \(model.preset\[tiny_llama\].num_hidden_layers=4\)"),
    (dict(deployment=dict(mode="shared")), r"deployment.mode"),
    (dict(deployment=dict(gpus_per_node=4, nodes=1)), r"deployment.nodes=1 is too few"),
    (dict(links=dict(nic_gbps=-1)), r"links.nic_gbps: Input should be greater than 0, got -1"),
    (dict(links=dict(nvlink_gbps=float("inf"))), r"links.nvlink_gbps: Input should be a finite number, got inf"),
    (dict(links=dict(nic_gbps=float("nan"))), r"links.nic_gbps: Input should be a finite number"),
    (dict(links=dict(nic_gbps="50")), r"links.nic_gbps: Input should be a valid number, got '50'"),
    (dict(sync=dict(bucket_mb=0)), r"sync.bucket_mb: Input should be greater than or equal to"),
    (dict(sync=dict(bucket_mb=float("nan"))), r"sync.bucket_mb: Input should be a finite number"),
    (dict(sync=dict(timeout_s=float("inf"))), r"sync.timeout_s: Input should be a finite number, got inf"),
    (dict(sync=dict(timeout_s=float("nan"))), r"sync.timeout_s: Input should be a finite number"),
    (dict(sync=dict(timeout_s=-1)), r"sync.timeout_s: Input should be greater than 0, got -1"),
    (dict(sync=dict(timeout_s=1e300)), r"sync.timeout_s: Input should be less than or equal to"),
    (dict(sync=dict(verify="no")), r"sync.verify: Input should be a valid boolean.*, got 'no'"),
    (dict(eplb=dict(enabled="yes")), r"eplb.enabled: Input should be a valid boolean, got 'yes'"),
    (dict(eplb=dict(num_redundant_experts=4.0)), r"eplb.num_redundant_experts: Input should be a valid integer"),
    (dict(eplb=dict(window=0)), r"eplb.window: Input should be greater than or equal to 1, got 0"),
    (dict(deployment=dict(nodes=0)), r"deployment.nodes must be a positive integer, got 0"),
    (dict(inference__engines=1 << 20), r"exceed 1048576; check trainer.tp"),
    (dict(trainer__tpp=2), r"valid keys: cp, dp, ep, etp, .*tp"),
    # layouts vLLM's model classes refuse at start-up (tests/vllm shows vLLM refusing them)
    (dict(model=dict(preset="tiny_glm4_moe"), trainer=dict(tp=1), inference=dict(tp=1, pp=3)),
     r"inference.pp=3: pipeline stage 0 holds layers \[0\] and no MoE layer \(.*first_k_dense_replace=1\); vLLM's "
     r"glm4_moe model refuses such a stage"),
    (dict(model=dict(preset="tiny_qwen3_moe", overrides=dict(num_experts=2)), trainer=dict(tp=1), inference=dict(tp=4)),
     r"inference.tp=4 exceeds the routed experts \(model.overrides.num_experts=2\): vLLM's qwen3_moe model refuses it"),
    (dict(trainer__kind="fsdp"), r"trainer.kind 'fsdp' is not supported; use one of \['megatron'\]"),
    (dict(inference__kind="sglang"), r"inference.kind 'sglang' is not supported; use one of \['vllm'\]"),
    (dict(model=dict(hf_config=dict(model_type="gpt2"))), r"model.hf_config.model_type 'gpt2' is not supported; use one of"),
    (dict(model=dict(hf_config=dict(model_type=3))), r"model.hf_config.model_type 3 is not supported"),
    (dict(model=dict(hf_config=dict(hidden_size=8))), r"model.hf_config.model_type is required; use one of"),
    (dict(model=dict(hf_config=dict(model_type="llama"))),
     r"model.hf_config.hidden_size is required for model_type 'llama'; give a positive integer"),
])
def test_bad_jobs_name_the_field(changes, message):
    with pytest.raises(JobError, match=message):
        job(**changes)


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny_llama\ntrainer: [")
    with pytest.raises(JobError, match="not valid YAML"):
        JobSpec.from_yaml(bad)
    with pytest.raises(JobError, match="cannot read job spec"):
        JobSpec.from_yaml(tmp_path / "missing.yaml")
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(JobError, match="must be a mapping"):
        JobSpec.from_yaml(listy)


def test_examples_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].glob("examples/*.yaml")):
        JobSpec.from_yaml(path)


def test_overrides_and_hf_config():
    j = job(model=dict(preset="tiny_qwen3_moe", overrides=dict(num_experts=16)))
    assert j.model.num_experts == 16
    assert j.placement().phy2log.shape == (4, 16)


LLAMA = dict(model_type="llama", hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
             head_dim=8, vocab_size=256, intermediate_size=128)


def hf(base, **changes):
    return JobSpec.from_dict(dict(model=dict(hf_config={**base, **changes}), trainer=dict(tp=1), inference=dict(tp=1)))


@pytest.mark.parametrize("model,message", [
    # wrong types inside hf_config / overrides: the HF key named, and what would be valid
    (dict(hf_config=dict(LLAMA, intermediate_size="128")),
     r"^model.hf_config.intermediate_size must be a positive integer, got '128'$"),
    (dict(hf_config=dict(LLAMA, num_key_value_heads="2")),
     r"^model.hf_config.num_key_value_heads must be a positive integer, got '2'$"),
    (dict(hf_config=dict(LLAMA, num_key_value_heads=True)), r"num_key_value_heads must be a positive integer, got True"),
    (dict(hf_config=dict(LLAMA, hidden_size=64.0)), r"model.hf_config.hidden_size must be a positive integer, got 64.0"),
    (dict(hf_config=dict(LLAMA, vocab_size=0)), r"model.hf_config.vocab_size must be a positive integer, got 0"),
    (dict(hf_config=dict(LLAMA, tie_word_embeddings="no")),
     r"model.hf_config.tie_word_embeddings must be a boolean \(true or false\), got 'no'"),
    (dict(hf_config=dict(LLAMA, attention_bias=1)), r"model.hf_config.attention_bias must be a boolean"),
    (dict(hf_config=dict(LLAMA, rope_theta=float("inf"))), r"model.hf_config.rope_theta must be a positive finite number"),
    (dict(hf_config=dict(LLAMA, rms_norm_eps="1e-6")), r"model.hf_config.rms_norm_eps must be a positive finite number"),
    (dict(hf_config=dict(LLAMA, rope_parameters=dict(rope_theta=-1.0))),
     r"model.hf_config.rope_parameters.rope_theta must be a positive finite number, got -1.0"),
    (dict(hf_config=dict(LLAMA, torch_dtype=16)), r"model.hf_config.torch_dtype must be a string, got 16"),
    (dict(hf_config=dict(LLAMA, torch_dtype="int8")), r"model.hf_config.torch_dtype 'int8' is not supported; use one of"),
    (dict(hf_config=dict(LLAMA, num_key_value_heads=3)),
     r"model.hf_config.num_attention_heads \(8\) must be a multiple of model.hf_config.num_key_value_heads \(3\)"),
    (dict(hf_config=dict(LLAMA, head_dim=None, hidden_size=4)), r"model.hf_config.head_dim is required when"),
    (dict(preset="tiny_llama", overrides=dict(intermediate_size="128")),
     r"model.overrides.intermediate_size must be a positive integer, got '128'"),
    (dict(preset="tiny_qwen3_moe", overrides=dict(moe_intermediate_size="32")),
     r"model.overrides.moe_intermediate_size must be a positive integer, got '32'"),
    (dict(preset="tiny_qwen3_moe", overrides=dict(mlp_only_layers=[1, "2"])),
     r"model.overrides.mlp_only_layers must be a list of layer indices"),
    (dict(preset="tiny_qwen3_moe", overrides=dict(mlp_only_layers=[9])), r"model.overrides.mlp_only_layers holds layer indices \[9\]"),
    (dict(preset="tiny_qwen3_moe", overrides=dict(decoder_sparse_step=2, intermediate_size=0)),
     r"model.overrides.intermediate_size must be a positive integer: layers \[0, 2\] are dense"),
    (dict(preset="tiny_qwen3_moe", overrides=dict(num_expert=16)),
     r"model.overrides.num_expert: unknown key for model_type 'qwen3_moe'; known keys: .*num_experts"),
    (dict(preset="tiny_deepseek_v3", overrides=dict(kv_lora_rank="16")),
     r"model.overrides.kv_lora_rank must be a positive integer, got '16'"),
    (dict(preset="tiny_deepseek_v3", overrides=dict(n_routed_experts="8")),
     r"model.overrides.n_routed_experts must be a non-negative integer, got '8'"),
    (dict(preset="tiny_deepseek_v3", overrides=dict(q_lora_rank=0)), r"model.overrides.q_lora_rank must be a positive integer"),
    (dict(preset="tiny_deepseek_v3", overrides=dict(intermediate_size=0)),
     r"model.overrides.intermediate_size must be a positive integer: layers \[0\] are dense"),
    (dict(preset="tiny_mixtral", overrides=dict(num_local_experts=None)),
     r"model.overrides.num_local_experts is required for model_type 'mixtral'; give a positive integer"),
])
def test_bad_hf_configs_name_the_key(model, message):
    with pytest.raises(JobError, match=message):
        JobSpec.from_dict(dict(model=model, trainer=dict(tp=1), inference=dict(tp=1)))


def test_hf_config_nulls_and_defaults():
    j = hf(LLAMA, num_key_value_heads=None, head_dim=None, tie_word_embeddings=None, rope_theta=None,
           rope_parameters=dict(rope_type="default", rope_theta=5e5), dtype="torch.float16")
    m = j.model
    assert (m.attention.num_kv_heads, m.attention.head_dim, m.tie_word_embeddings, m.rope_theta, m.dtype) == (8, 8, False, 5e5, "float16")
    assert hf(dict(LLAMA, model_type="qwen2")).model.attention.qkv_bias
    assert not hf(dict(LLAMA, model_type="qwen2", attention_bias=False)).model.attention.qkv_bias


@pytest.mark.parametrize("load,message", [
    (np.ones((4, 6)), r"^load has shape \(4, 6\); expected \[4 MoE layers, 8 experts\]"),
    (np.ones((3, 8)), r"^load has shape \(3, 8\); expected \[4 MoE layers, 8 experts\]"),
    (np.ones(8), r"^load has shape \(8,\)"),
    ("hot", r"^load must be a numeric array \[4 MoE layers, 8 experts\]"),
    (np.where(np.eye(4, 8) > 0, np.nan, 1.0), r"^load\[0, 0\] is nan \(4 bad entries\)"),
    (np.where(np.arange(32).reshape(4, 8) == 13, -2.0, 1.0), r"^load\[1, 5\] is -2.0 \(1 bad entries\)"),
    (np.full((4, 8), np.inf), r"^load\[0, 0\] is inf"),
])
def test_bad_loads_name_the_load(load, message):
    from planners import build_plan
    from planners.eplb import EplbError

    j = job(eplb=dict(enabled=True, num_redundant_experts=4))
    with pytest.raises(EplbError, match=message):
        build_plan(j, load)


def test_a_checkpoints_config_json_is_read_with_the_spellings_transformers_writes(tmp_path):
    transformers = pytest.importorskip("transformers")
    shape = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                 vocab_size=250, intermediate_size=128, moe_intermediate_size=32, num_experts_per_tok=2)
    qwen = transformers.Qwen3MoeConfig(**shape, num_experts=8, rope_theta=5e5)
    assert "num_local_experts" in qwen.to_dict() and "num_experts" not in qwen.to_dict()  # transformers 5
    (tmp_path / "qwen").mkdir()
    qwen.to_json_file(tmp_path / "qwen" / "config.json")
    (tmp_path / "job.yaml").write_text("model: {config: qwen}\ntrainer: {tp: 2, ep: 2}\ninference: {tp: 2}\n")
    job = JobSpec.from_yaml(tmp_path / "job.yaml")  # a model directory, relative to the job file
    assert job.model.num_experts == 8 and job.model.rope_theta == 5e5 and len(job.model.moe_layers) == 4
    with pytest.raises(JobError, match=r"trainer.ep=3 must divide the routed experts \(model.config\[qwen\]"
                                       r".num_local_experts=8\)"):  # named as the config spells it
        JobSpec.from_dict(dict(model=dict(config="qwen"), trainer=dict(ep=3), inference=dict(tp=1)), base_dir=tmp_path)
    glm = transformers.Glm4MoeConfig(**shape, n_routed_experts=8, partial_rotary_factor=0.25, use_qk_norm=True)
    assert "partial_rotary_factor" in glm.to_dict()["rope_parameters"]
    glm.to_json_file(tmp_path / "glm.json")
    spec = JobSpec.from_dict(dict(model=dict(config=str(tmp_path / "glm.json")), trainer=dict(tp=2), inference=dict(tp=2))).model
    assert (spec.attention.rotary_dim, spec.attention.qk_norm, spec.moe_layers) == (4, True, (1, 2, 3))


@pytest.mark.parametrize("model,message", [
    (dict(config="nowhere"), r"model.config\[nowhere\]: cannot read .*nowhere: No such file or directory; give a config.json"),
    (dict(config="bad.json"), r"model.config\[bad.json\]: .*bad.json is not valid JSON"),
    (dict(config="list.json"), r"model.config\[list.json\]: .* must hold a JSON object"),
    (dict(preset="tiny_llama", config="x"), r"give exactly one of model.preset"),
])
def test_bad_config_files_name_the_file(tmp_path, model, message):
    (tmp_path / "bad.json").write_text("{model_type")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(JobError, match=message):
        JobSpec.from_dict(dict(model=model, trainer=dict(tp=1), inference=dict(tp=1)), base_dir=tmp_path)


def test_defaults_are_transformers_own(tmp_path):
    """A config.json written by save_pretrained leaves out every key equal to its default: each family
    must read it as the full config (its defaults are transformers' own)."""
    transformers = pytest.importorskip("transformers")
    from planners.models import FAMILIES, spec_from_config

    shape = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=8, vocab_size=256, head_dim=16,
                 num_key_value_heads=8)
    per_family = dict(qwen3_moe=dict(num_experts=8, moe_intermediate_size=32, decoder_sparse_step=2),
                      mixtral=dict(num_local_experts=4, intermediate_size=32),
                      deepseek_v3=dict(n_routed_experts=8, moe_intermediate_size=16, kv_lora_rank=16, qk_nope_head_dim=8,
                                       qk_rope_head_dim=8, v_head_dim=16, first_k_dense_replace=1),
                      glm4_moe=dict(n_routed_experts=8, moe_intermediate_size=16))
    checked = 0
    for family in FAMILIES.values():
        for model_type in family.model_types:
            if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING:
                continue  # kimi_k2 ships its config with the checkpoint
            config = transformers.AutoConfig.for_model(model_type, **shape, **per_family.get(family.name, {}))
            config.to_json_file(tmp_path / f"{model_type}.json")  # the diff against the defaults
            full = config.to_dict()
            written = spec_from_config(tmp_path / f"{model_type}.json", "model.config")
            assert written == spec_from_config(full), model_type
            assert (written.rope_theta, written.rms_norm_eps) == (config.rope_parameters["rope_theta"], config.rms_norm_eps)
            if written.is_moe:
                m = written.moe
                assert m.top_k == config.num_experts_per_tok, model_type
                assert m.norm_topk_prob == getattr(config, "norm_topk_prob", True), model_type
                assert m.routed_scaling_factor == getattr(config, "routed_scaling_factor", 1.0), model_type
                assert m.n_group == getattr(config, "n_group", 1), model_type
            checked += 1
    assert checked == 8  # llama, mistral, qwen2, qwen3, qwen3_moe, mixtral, deepseek_v3, glm4_moe
    # DeepSeek's q_lora_rank: absent is transformers' default (1536), an explicit null is no q compression
    lite = {k: v for k, v in transformers.AutoConfig.for_model("deepseek_v3", **shape, **per_family["deepseek_v3"]).to_dict().items()
            if k != "q_lora_rank"}
    assert spec_from_config(lite).attention.q_lora_rank == 1536
    assert spec_from_config({**lite, "q_lora_rank": None}).attention.q_lora_rank is None
