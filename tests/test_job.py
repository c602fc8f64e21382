"""Job specs: bad input fails early with the field named."""

from __future__ import annotations

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
    (dict(model={}), r"model.preset .* or model.hf_config"),
    (dict(model=dict(preset="nope")), r"model.preset 'nope' is unknown"),
    (dict(trainer__tp=3), r"trainer.tp must divide model.num_key_value_heads"),
    (dict(trainer__ep=3), r"trainer.ep must divide the number of routed experts"),
    (dict(trainer__pp=3), r"do not split over pp=3"),
    (dict(inference__tp=3), r"inference.tp must divide model.num_attention_heads"),
    (dict(inference__dp=8), r"inference EP size dp\*tp=16 exceeds the 8 experts"),
    (dict(eplb=dict(num_redundant_experts=3)), r"must divide the number of physical expert slots"),
    (dict(deployment=dict(mode="colocated"), inference__engines=2), r"colocated needs inference world size"),
    (dict(deployment=dict(mode="shared")), r"deployment.mode"),
    (dict(deployment=dict(gpus_per_node=4, nodes=1)), r"deployment.nodes=1 is too few"),
    (dict(links=dict(nic_gbps=-1)), r"links.nic_gbps must be a positive"),
    (dict(sync=dict(bucket_mb=0)), r"sync.bucket_mb"),
    (dict(model=dict(hf_config=dict(model_type="gpt2"))), r"model.model_type 'gpt2' is not supported"),
    (dict(model=dict(hf_config=dict(model_type="llama"))), r"model.hidden_size is required"),
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

    for path in sorted(Path(__file__).parent.parent.glob("examples/*.yaml")):
        JobSpec.from_yaml(path)


def test_overrides_and_hf_config():
    j = job(model=dict(preset="tiny_qwen3_moe", overrides=dict(num_experts=16)))
    assert j.model.num_experts == 16
    assert j.placement().phy2log.shape == (4, 16)
