"""Trainer groups equal megatron-core's RankGenerator; inference coordinates follow vLLM's order."""

from __future__ import annotations

import itertools

import pytest

from planners.layouts import Deployment, InferenceLayout, LayoutError, TrainerLayout, vllm_pp_layers
from planners.rankgrid import RankGrid

LAYOUTS = [
    dict(tp=2, pp=2, ep=1, cp=1, dp=2),
    dict(tp=2, pp=2, ep=2, etp=1, cp=1, dp=2),
    dict(tp=4, pp=2, ep=4, etp=2, cp=1, dp=2),
    dict(tp=2, pp=1, ep=4, etp=1, cp=2, dp=2),
    dict(tp=1, pp=3, ep=2, cp=1, dp=4),
    dict(tp=2, pp=2, ep=2, etp=2, cp=2, dp=2, order="tp-cp-ep-pp-dp"),
    dict(tp=3, pp=2, ep=3, etp=1, cp=1, dp=1),
]


@pytest.fixture(scope="module")
def rank_generator():
    from megatron.core.parallel_state import RankGenerator

    return RankGenerator


@pytest.mark.parametrize("kw", LAYOUTS)
def test_groups_equal_megatron(rank_generator, kw):
    lay = TrainerLayout(**kw)
    dense = rank_generator(tp=lay.tp, ep=1, dp=lay.dp, pp=lay.pp, cp=lay.cp, order=lay.order)
    expert = rank_generator(tp=lay.etp, ep=lay.ep, dp=lay.edp, pp=lay.pp, cp=1, order=lay.order)
    for token in ("tp", "pp", "dp", "cp", "tp-pp", "tp-dp-cp", "dp-cp", "tp-cp"):
        assert lay.dense_grid.groups(token) == dense.get_ranks(token), token
    for token in ("tp", "ep", "dp", "tp-ep", "tp-ep-pp", "pp"):
        assert lay.expert_grid.groups(token) == expert.get_ranks(token), token
    # coordinates agree with group membership
    for rank in range(lay.world_size):
        c = lay.coords(rank)
        assert dense.get_ranks("tp")[[rank in g for g in dense.get_ranks("tp")].index(True)].index(rank) == c.tp
        ep_group = next(g for g in expert.get_ranks("ep") if rank in g)
        assert ep_group.index(rank) == c.ep


def test_rank_grid_round_trip():
    grid = RankGrid(("tp", "pp", "dp"), (2, 3, 4))
    for r in range(grid.world_size):
        assert grid.rank(**grid.coords(r)) == r


def test_dp_defaults_to_smallest_that_fits_ep():
    assert TrainerLayout(tp=2, pp=1, ep=4, etp=1).dp == 2
    assert TrainerLayout(tp=2, pp=1, ep=2).dp == 2  # etp defaults to tp: 2*2 experts ranks
    assert TrainerLayout(tp=4, pp=2).dp == 1


def test_trainer_layout_errors_name_the_field():
    with pytest.raises(LayoutError, match="trainer.tp"):
        TrainerLayout(tp=0, pp=1)
    with pytest.raises(LayoutError, match="etp\\*ep\\*pp"):
        TrainerLayout(tp=2, pp=1, ep=3, dp=1)
    with pytest.raises(LayoutError, match="trainer.order"):
        TrainerLayout(tp=1, pp=1, order="tp-dp-pp")


def test_inference_order_is_engine_dp_pp_tp():
    lay = InferenceLayout(tp=2, pp=2, dp=2, enable_ep=True, engines=2)
    for engine, dp, pp, tp in itertools.product(range(2), repeat=4):
        rank = ((engine * 2 + dp) * 2 + pp) * 2 + tp
        c = lay.coords(rank)
        assert (c.engine, c.dp, c.pp, c.tp) == (engine, dp, pp, tp)
    # EP groups: DP x TP of one engine and PP stage
    assert lay.ep_groups()[0] == [0, 1, 4, 5]
    assert lay.ep_size == 4 and lay.moe_tp_size == 1
    assert InferenceLayout(tp=2, dp=3).moe_tp_size == 6


def test_pp_splits():
    assert [len(r) for r in vllm_pp_layers(10, 4)] == [2, 3, 3, 2]
    assert [len(r) for r in vllm_pp_layers(61, 4)] == [15, 15, 16, 15]
    lay = TrainerLayout(tp=1, pp=4, first_stage_layers=1, last_stage_layers=3)
    assert [len(r) for r in lay.stage_layers(10)] == [1, 3, 3, 3]
    with pytest.raises(LayoutError, match="do not split"):
        TrainerLayout(tp=1, pp=4).stage_layers(10)


def test_deployments():
    t, i = TrainerLayout(tp=2, pp=2), InferenceLayout(tp=2, engines=2)
    assert Deployment("colocated").device_ids(t, i) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert Deployment("disaggregated", gpus_per_node=4).num_nodes(t, i) == 2
    with pytest.raises(LayoutError, match="colocated"):
        Deployment("colocated").device_ids(t, InferenceLayout(tp=8))
