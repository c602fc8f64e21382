"""Virtual pipeline parallelism (``trainer.vpp``, Megatron's interleaved schedule) in the planner.

* The layers of every model chunk equal megatron-core's own ``get_transformer_layer_offset`` /
  ``get_num_layers_to_build`` over a grid of layouts, and a layout is refused wherever Megatron refuses it
  (or would build nonsense).
* Plans of VPP jobs validate and ``simulate`` is bit-exact against direct slicing (hypothesis).
* Bad VPP settings fail as job errors naming ``trainer.vpp``.
"""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from planners import JobError, JobSpec
from planners.layouts import LayoutError, TrainerLayout
from planners.sides.megatron import trainer_chunk_layers, trainer_locals
from planners.models import catalog

LLAMA = dict(model_type="llama", hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             vocab_size=300, intermediate_size=128)


def _megatron_chunks(num_layers, pp, vpp, first, last):
    """Megatron's layers of every (pp rank, virtual stage), or None where it refuses the layout."""
    import torch
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    try:
        cfg = TransformerConfig(num_layers=num_layers, hidden_size=8, num_attention_heads=1,
                                pipeline_model_parallel_size=pp, pipeline_dtype=torch.float32,
                                virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
                                num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
        out = []
        for p in range(pp):
            row = []
            for v in range(vpp):
                stage = v if vpp > 1 else None
                n = get_num_layers_to_build(cfg, vp_stage=stage, pp_rank=p)
                start = get_transformer_layer_offset(cfg, vp_stage=stage, pp_rank=p)
                row.append(range(start, start + n))
            out.append(row)
    except (ValueError, AssertionError, ZeroDivisionError):  # ZeroDivisionError: pp=2, vpp>1, first and last set
        return None
    held = sorted(i for row in out for r in row for i in r)
    if any(r.stop < r.start for row in out for r in row) or held != list(range(num_layers)):
        return None  # accepted by Megatron but not a split of the layers (e.g. first_stage_layers > num_layers)
    return out


def test_chunk_layers_equal_megatron_offsets():
    pytest.importorskip("megatron.core")
    accepted = 0
    for n, pp, vpp, first, last in itertools.product(range(1, 13), range(2, 5), range(1, 5), [None, 1, 2, 4],
                                                     [None, 1, 2, 4]):
        want = _megatron_chunks(n, pp, vpp, first, last)
        try:
            got = TrainerLayout(tp=1, pp=pp, vpp=vpp, first_stage_layers=first,
                                last_stage_layers=last).chunk_layers(n)
        except LayoutError:
            got = None
        assert got == want, (n, pp, vpp, first, last)
        accepted += got is not None and vpp > 1
    assert accepted > 50


def test_interleaved_assignment():
    lay = TrainerLayout(tp=1, pp=2, vpp=2)
    assert lay.chunk_layers(8) == [[range(0, 2), range(4, 6)], [range(2, 4), range(6, 8)]]
    assert lay.stage_layers(8) == [[0, 1, 4, 5], [2, 3, 6, 7]]
    assert TrainerLayout(tp=1, pp=4, vpp=1).stage_layers(8) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]
    # chunk v of pp rank p starts at (v * pp + p) * layers per virtual stage
    lay = TrainerLayout(tp=1, pp=3, vpp=4)
    assert [[r.start for r in c] for c in lay.chunk_layers(24)] == [[(v * 3 + p) * 2 for v in range(4)] for p in range(3)]


@pytest.mark.parametrize("trainer,match", [
    (dict(tp=1, vpp=2), r"trainer.vpp=2 needs pp > 1"),
    (dict(tp=1, pp=2, vpp=0), r"trainer.vpp must be a positive integer"),
    (dict(tp=1, pp=2, vpp="2"), r"trainer.vpp: Input should be a valid integer"),
    (dict(tp=1, pp=2, vpp=4), r"4 layers over pp=2 give \[2, 2\] layers per stage, not all divisible by trainer.vpp=4; "
                              r"num_layers must be divisible by pp\*vpp = 8"),
    (dict(tp=1, pp=3, vpp=2, first_stage_layers=1, last_stage_layers=2), r"trainer.first_stage_layers=1 must be "
                                                                           r"divisible by trainer.vpp=2"),
    (dict(tp=1, pp=2, vpp=2, first_stage_layers=2, last_stage_layers=2), r"trainer.vpp=2 with both "
                                                                           r"first_stage_layers and last_stage_layers needs pp > 2"),
])
def test_bad_vpp_settings_are_job_errors_naming_the_field(trainer, match):
    with pytest.raises(JobError, match=match):
        JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=trainer, inference=dict(tp=1)))


def test_vpp_1_is_the_plain_pipeline():
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=dict(tp=1, pp=2), inference=dict(tp=1)))
    same = JobSpec.from_dict(dict(model=dict(preset="tiny_llama"), trainer=dict(tp=1, pp=2, vpp=1), inference=dict(tp=1)))
    cat = catalog(job.model)
    for r in range(2):
        assert trainer_locals(job.model, cat, job.trainer, r) == trainer_locals(same.model, cat, same.trainer, r)
    assert job.describe()["trainer"]["vpp"] == 1


@st.composite
def vpp_jobs(draw):
    pp, vpp, k = draw(st.sampled_from([2, 3, 4])), draw(st.sampled_from([2, 3])), draw(st.sampled_from([1, 2]))
    trainer = dict(tp=draw(st.sampled_from([1, 2])), pp=pp, vpp=vpp)
    layers = pp * vpp * k
    if pp > 2 and draw(st.booleans()):  # Megatron's uneven first/last stages, each a multiple of vpp
        a, b = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
        trainer.update(first_stage_layers=a * vpp, last_stage_layers=b * vpp)
        layers = (a + b + (pp - 2) * k) * vpp
    inference = dict(tp=draw(st.sampled_from([1, 2, 4])), pp=draw(st.sampled_from([1, 2])))
    if draw(st.booleans()):
        model = dict(preset="tiny_qwen3_moe", overrides=dict(num_hidden_layers=layers))
        trainer["ep"] = draw(st.sampled_from([1, 2]))
        inference["enable_ep"] = draw(st.booleans())
    else:
        model = dict(hf_config=dict(LLAMA, num_hidden_layers=layers, tie_word_embeddings=draw(st.booleans())))
    return JobSpec.from_dict(dict(model=model, trainer=trainer, inference=inference))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vpp_jobs())
def test_vpp_plans_validate_and_simulate_exactly(job):
    from conftest import assert_plan_exact

    lay, spec = job.trainer, job.model
    cat = catalog(spec)
    owner: dict[int, tuple[int, int]] = {}
    for rank in range(lay.world_size):
        c = lay.coords(rank)
        chunks = trainer_chunk_layers(spec, lay, rank)
        assert len(chunks) == lay.vpp
        for v, layers in enumerate(chunks):
            for i in layers:
                assert owner.setdefault(i, (c.pp, v)) == (c.pp, v)
        names = [t.name for t in trainer_locals(spec, cat, lay, rank)]
        assert len(set(names)) == len(names) and all(re.match(r"model\d\.", n) for n in names)
        # the embedding on the first chunk of the first stage, the final norm on the last chunk of the last
        assert ("model0.embedding.word_embeddings.weight" in names) == (c.pp == 0)
        assert (f"model{lay.vpp - 1}.decoder.final_layernorm.weight" in names) == (c.pp == lay.pp - 1)
    assert sorted(owner) == list(range(spec.num_layers))
    assert_plan_exact(job)
