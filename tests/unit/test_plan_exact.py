"""Exact plans on small layouts, written out by hand."""

from __future__ import annotations

import numpy as np

from planners import JobSpec, build_plan

DENSE = dict(model_type="llama", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, head_dim=8, vocab_size=250, intermediate_size=64)


def _rows(plan, stage):
    c = plan.chunks[plan.chunks["stage"] == stage]
    return {(int(r["src"]), int(r["dst"]), plan.tensors[r["tensor"]].name, int(r["lo"]), int(r["hi"])) for r in c}


def test_tp2_pp2_to_tp4_on_one_node():
    """Trainer ranks 0-3 (rank = tp + 2*pp), engine ranks 4-7 (tp 0-3), all on one node."""
    job = JobSpec.from_dict(dict(model=dict(hf_config=DENSE), trainer=dict(tp=2, pp=2), inference=dict(tp=4),
                                 deployment=dict(gpus_per_node=8)))
    plan = build_plan(job).validate()
    want = set()
    for layer in (0, 1):
        p = f"model.layers.{layer}"
        for r in range(4):
            src = r // 2 + 2 * layer  # trainer TP rank holding inference TP rank r's half, in this layer's stage
            for name, width in (("self_attn.q_proj", 8), ("self_attn.k_proj", 8), ("self_attn.v_proj", 8),
                                ("self_attn.o_proj", 8), ("mlp.gate_proj", 16), ("mlp.up_proj", 16),
                                ("mlp.down_proj", 16)):
                want.add((src, 4 + r, f"{p}.{name}.weight", width * r, width * (r + 1)))
    # vocabulary: trainer pads 250 to 256 (128 per TP rank), vLLM pads to 256 (64 per TP rank)
    for r in range(4):
        lo, hi = 64 * r, min(64 * (r + 1), 250)
        want.add((0 if r < 2 else 1, 4 + r, "model.embed_tokens.weight", lo, hi))
        want.add((2 if r < 2 else 3, 4 + r, "lm_head.weight", lo, hi))
    replicated = {f"model.layers.{i}.{n}.weight" for i in (0, 1) for n in ("input_layernorm", "post_attention_layernorm")}
    replicated.add("model.norm.weight")

    stage1 = _rows(plan, 1)
    assert {r for r in stage1 if r[2] not in replicated} == want
    # replicated tensors: the holders share the node with every engine rank, so relaying through one
    # of them would gain nothing; each engine rank gets its own copy from the least-busy holder
    assert not _rows(plan, 2)
    for name in replicated:
        s1 = [r for r in stage1 if r[2] == name]
        holders = [0, 1] if name.startswith("model.layers.0") else [2, 3]
        assert sorted(r[1] for r in s1) == [4, 5, 6, 7]
        assert {r[0] for r in s1} <= set(holders)
    assert set(plan.chunks["link"].tolist()) == {1}  # all on one node, no shared GPUs


def test_experts_land_in_their_physical_slots():
    """Trainer EP2 (4 experts each) -> one engine EP4 with 4 redundant slots: 12 slots, 3 per rank.
    Slot s serves expert s % 8; slots 8-11 replicate experts 0-3."""
    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=1, ep=2, dp=4),
                                 inference=dict(tp=2, dp=2, enable_ep=True), eplb=dict(num_redundant_experts=4),
                                 deployment=dict(gpus_per_node=4)))
    plan = build_plan(job).validate()
    T = 4  # trainer on node 0 (rank = ep + 2 * expert-dp), engine on node 1
    w2 = {}  # (dst rank, slot index on that rank) -> expert written there
    for r in plan.chunks:
        name = plan.tensors[r["tensor"]].name
        if name.startswith("model.layers.0.mlp.experts.") and name.endswith("down_proj.weight"):
            expert = int(name.split(".")[5])
            slot = r["dst_base"] // (64 * 32)
            w2[(int(r["dst"]), int(slot))] = (expert, int(r["src"]), int(r["stage"]))
    assert {k: v[0] for k, v in w2.items()} == {
        (T + rank, j): (3 * rank + j) % 8 for rank in range(4) for j in range(3)
    }
    # stage 1 comes from the trainer EP rank owning the expert; a redundant copy on the same node
    # arrives once through stage 1 and once through stage 2
    for (dst, j), (expert, src, stage) in w2.items():
        if stage == 1:
            assert src in (expert // 4, expert // 4 + 2)
    assert sorted(v[2] for v in w2.values()).count(2) == 4


def test_colocated_prefers_local_copies():
    job = JobSpec.from_dict(dict(model=dict(hf_config=DENSE), trainer=dict(tp=2, dp=2), inference=dict(tp=2, engines=2),
                                 deployment=dict(mode="colocated", gpus_per_node=4)))
    plan = build_plan(job).validate()
    # every engine rank sits on a trainer rank with the same TP shard: all local, nothing on the wire
    assert plan.bytes_by_link() == {"same device": sum(int(n) for n in plan.chunks["nbytes"]), "same node": 0,
                                    "cross node": 0}
    assert np.all(plan.devices[plan.chunks["src"]] == plan.devices[plan.chunks["dst"]])


def test_replicated_tensors_relay_inside_a_node_over_faster_links():
    """Trainer on node 0, engine on node 1: a replicated tensor crosses into node 1 once, then fans out."""
    job = JobSpec.from_dict(dict(model=dict(hf_config=DENSE), trainer=dict(tp=2, pp=2), inference=dict(tp=4),
                                 deployment=dict(gpus_per_node=4)))
    plan = build_plan(job).validate()
    stage1, stage2 = _rows(plan, 1), _rows(plan, 2)
    for name in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):
        s1 = [r for r in stage1 if r[2] == name]
        s2 = [r for r in stage2 if r[2] == name]
        assert len(s1) == 1 and sorted(r[1] for r in s2) == sorted({4, 5, 6, 7} - {s1[0][1]})
        assert all(r[0] == s1[0][1] for r in s2)
