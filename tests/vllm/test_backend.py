"""The ``rlsync`` weight-transfer backend inside engines built by vLLM's own start-up path (``engine_sync``).

Trainer ranks sync seeded weights; each engine rank receives them through vLLM's factory and base
class. After every version the synced model must hold, bit for bit, what vLLM itself holds after
loading a checkpoint of that version and processing it: parameters, buffers and derived tensors.
"""

from __future__ import annotations

import vllm_cpu  # noqa: F401  (first: vLLM's platform)

import re

import numpy as np
import pytest

from engine_sync import run
from planners import JobSpec, build_plan
from planners.eplb.stats import synthetic_load

FP32 = dict(overrides=dict(torch_dtype="float32"))  # vLLM's CPU platform computes bf16 models in fp32 here


def job(preset: str, overrides: dict | None = None, **inference) -> dict:
    model = dict(preset=preset, overrides=dict(FP32["overrides"], **(overrides or {})))
    return dict(model=model, trainer=dict(tp=1), inference=dict(tp=1, **inference))


def assert_holds_what_vllm_loads(engine: dict, versions: int) -> None:
    for v in range(versions):
        synced, reference = engine["synced"][v], engine["reference"][v]
        assert set(synced) == set(reference)
        differ = sorted(n for n in reference if not np.array_equal(synced[n], reference[n]))
        assert not differ, f"version {v + 1}: {len(differ)} tensors differ from vLLM's own load, e.g. {differ[:4]}"


def test_in_place_where_processing_is_the_identity(tmp_path):
    """Unquantized MoE whose expert processing leaves the weights (as Triton MoE on CUDA does)."""
    # the job's small buckets and staging: both ends derive the same rounds from the plan, or nothing arrives
    small = dict(job("tiny_qwen3_moe"), sync=dict(bucket_mb=0.05, staging=True))
    results = run(small, [dict(version=1), dict(version=2)], tmp_path, prepack="identity")
    engine = results[1]
    assert engine["mode"] == "in_place", engine["mode_reason"]
    assert engine["staging_bytes"] > 0
    assert [r["verified"] for r in engine["reports"]] == [True, True], engine["reports"]
    assert [r["engine"]["serving"] for r in engine["reports"]] == [1, 2]
    assert_holds_what_vllm_loads(engine, 2)
    # the two versions differ: the comparison can fail
    w13 = "model.layers.0.mlp.experts.routed_experts.w13_weight"
    assert not np.array_equal(engine["synced"][0][w13], engine["synced"][1][w13])


def test_reload_reruns_vllms_processing_where_it_derives_tensors(tmp_path):
    """DeepSeek-V3's MLA attention derives its absorbed weights from kv_b_proj while processing: a sync
    written in place would leave them stale, so the backend reloads and vLLM's processing runs again.
    (Dense layers only: vLLM 0.33's CPU MoE pads and prepacks experts at load but not on an update,
    which the next tests show refused.)"""
    dense = job("tiny_deepseek_v3", overrides=dict(first_k_dense_replace=3))
    results = run(dense, [dict(version=1), dict(version=2)], tmp_path, prepack="identity")
    engine = results[1]
    assert engine["mode"] == "reload" and "added W_UK_T,W_UV" in engine["mode_reason"], engine["mode_reason"]
    assert [r["verified"] for r in engine["reports"]] == [True, True], engine["reports"]
    assert_holds_what_vllm_loads(engine, 2)
    absorbed = [n for n in engine["synced"][0] if n.endswith(("W_UK_T", "W_UV"))]
    assert len(absorbed) == 6, absorbed  # three layers, both absorbed weights: compared above, and they moved
    assert all(not np.array_equal(engine["synced"][0][n], engine["synced"][1][n]) for n in absorbed)


def test_reload_reprocesses_a_tied_lm_head_with_its_own_packed_copy(tmp_path):
    """vLLM's CPU platform gives every linear and ``lm_head`` a oneDNN matmul holding its own copy of the
    weights. With tied word embeddings the plan writes ``embed_tokens`` only; ``lm_head`` shares that
    tensor but packs its own copy, which vLLM's layerwise reload alone leaves stale (seen in a running
    CPU engine: tokens off Hugging Face's while every sync said verified). The backend reloads it too."""
    tied = job("tiny_qwen3")
    assert tied["model"]["preset"] == "tiny_qwen3" and JobSpec.from_dict(tied).model.config["tie_word_embeddings"]
    results = run(tied, [dict(version=1), dict(version=2)], tmp_path, prepack="identity", onednn=True)
    engine = results[1]
    assert engine["mode"] == "reload", engine["mode_reason"]
    assert [r["verified"] for r in engine["reports"]] == [True, True], engine["reports"]
    packed = [n for n in engine["synced"][0] if n.startswith("lm_head:")]
    assert packed, sorted(engine["synced"][0])[:8]  # the copy the logits read is compared below
    assert_holds_what_vllm_loads(engine, 2)
    assert all(not np.array_equal(engine["synced"][0][n], engine["synced"][1][n]) for n in packed)


def test_vllm_moe_padding_skipped_on_update_is_refused_with_the_old_version_kept(tmp_path):
    results = run(job("tiny_deepseek_v3"), [dict(version=1)], tmp_path, prepack="identity", reference=False)
    engine = results[1]
    assert "ReloadError" in engine["error"] and "does not reproduce its load" in engine["error"]
    assert engine["reports"][0]["engine"]["serving"] is None and engine["reports"][0]["engine"]["complete"]
    assert all(np.array_equal(engine["before"][n], engine["synced"][0][n]) for n in engine["before"])


@pytest.mark.parametrize("onednn", [False, True])
def test_a_relaid_engine_never_reports_verified_with_kernels_reading_other_bytes(tmp_path, onednn):
    """vLLM's CPU MoE processing prepacks the experts at load but skips that on a weight update (vLLM
    0.33.0): its reload would hand the kernels unpacked bytes. In place is refused; reload notices the
    skipped re-layout before any kernel byte changes and the engine keeps serving what it served.
    With oneDNN linears, the layers processed before the refusal (attention, lm_head) got new matmul
    handles holding the new weights: those are put back too (seen in a running CPU engine: tokens
    moved after a refused update)."""
    results = run(job("tiny_qwen3_moe"), [dict(version=1)], tmp_path, prepack="permute", reference=False,
                  onednn=onednn)
    engine = results[1]
    assert engine["mode"] == "reload" and "re-laid" in engine["mode_reason"]
    assert "ReloadError" in engine["error"] and "unprocessed layout" in engine["error"]
    report = engine["reports"][0]
    assert report["verified"] is None and report["engine"]["serving"] is None and report["engine"]["complete"]
    before, after = engine["before"], engine["synced"][0]
    assert set(before) == set(after)
    assert all(np.array_equal(before[n], after[n]) for n in before), "the kernel tensors were not touched"
    assert not onednn or any(":cpu_linear" in n for n in before)  # the handles' copies were compared
    assert results[0]["verified"] == [True]  # the bytes arrived; vLLM's processing is what fell short


def test_in_place_is_refused_where_processing_relaid_the_weights(tmp_path):
    from sync.run.local import RankFailure

    with pytest.raises(RankFailure) as failure:
        run(job("tiny_qwen3_moe"), [dict(version=1)], tmp_path, prepack="permute", reference=False, mode="in_place",
            grace_s=5.0)
    assert "in_place' asked for, but vLLM's post-load processing re-laid" in failure.value.errors[1]


def _eplb_job() -> dict:
    return dict(model=dict(preset="tiny_qwen3_moe", **FP32), trainer=dict(tp=1),
                inference=dict(tp=2, enable_ep=True), eplb=dict(enabled=True, num_redundant_experts=4))


def test_placement_loads_and_window_through_vllms_eplb_state(tmp_path):
    """Version 1 by the identity placement; version 2 by one rebalanced from loads. The engine's maps must
    equal vLLM's own ``update_mapping``; loads counted pass by pass through vLLM's EplbState must come back
    as [layers, experts] summed over both EP ranks; a new placement starts the count afresh."""
    spec = JobSpec.from_dict(_eplb_job())
    L, E, P = len(spec.model.moe_layers), spec.model.num_experts, spec.num_physical_experts
    rebalanced = build_plan(spec, synthetic_load(L, E, 1.3, seed=5))
    rng = np.random.default_rng(0)
    passes = [rng.integers(0, 50, size=(2, L, P)).tolist() for _ in range(3)]  # per pass, per EP rank
    # loads counted before each sync: under the placement then in effect
    versions = [dict(version=1, counts=passes), dict(version=2, plan=rebalanced.to_dict(), counts=passes),
                dict(version=3, counts=passes)]
    results = run(_eplb_job(), versions, tmp_path, prepack="identity", eplb=True)
    identity = build_plan(spec).placement.phy2log
    slots = P // 2
    routed = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.routed_experts\.(w13_weight|w2_weight)$")
    # vLLM loads a checkpoint by its initial placement (slot s < E holds expert s): each expert's weights
    # as vLLM lays them out, from whichever rank's reference holds them
    loaded = {}
    for rank in (1, 2):
        for name, value in results[rank]["reference"][1].items():
            if (m := routed.match(name)):
                for j in range(slots):
                    if (slot := (rank - 1) * slots + j) < E:
                        loaded[(name, slot)] = value[j]
    for rank in (1, 2):
        engine = results[rank]
        assert engine["mode"] == "in_place", engine["mode_reason"]
        assert [r["verified"] for r in engine["reports"]] == [True, True, True]
        assert_holds_what_vllm_loads(engine, 1)
        synced, reference = engine["synced"][1], engine["reference"][1]
        for name in reference:
            m = routed.match(name)
            if m is None:
                np.testing.assert_array_equal(synced[name], reference[name], err_msg=name)
                continue
            row = spec.model.moe_layers.index(int(m.group(1)))
            for j in range(slots):  # version 2 by the rebalanced placement: slot -> the expert it now serves
                expert = rebalanced.placement.phy2log[row, (rank - 1) * slots + j]
                np.testing.assert_array_equal(synced[name][j], loaded[(name, expert)], err_msg=f"{name} slot {j}")
        in_effect = (identity, identity, rebalanced.placement.phy2log)
        for placement, got in zip(in_effect, engine["loads"]):
            want = np.zeros((L, E), dtype=np.int64)
            for counts in passes:
                for ep_rank in range(2):
                    for layer in range(L):
                        np.add.at(want[layer], placement[layer], counts[ep_rank][layer])
            assert got["rows"] == list(range(L))
            np.testing.assert_array_equal(got["load"], want)
        for after in engine["loads_after_finish"]:  # every sync starts the count afresh, a new placement too
            np.testing.assert_array_equal(after["load"], np.zeros((L, E)))
        ours, vllms = engine["maps"][1], engine["update_mapping"][0]
        for key in ours:
            np.testing.assert_array_equal(ours[key], vllms[key], err_msg=key)
        assert engine["reports"][1]["placement_installed"] and engine["reports"][1]["placement_moved"]
