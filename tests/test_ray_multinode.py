"""Two Ray nodes on one machine: ranks land on the nodes the plan puts them on, and the bytes that
cross between the nodes are exactly the plan's cross-node bytes."""

from __future__ import annotations

import pytest

from planners import JobSpec

ray = pytest.importorskip("ray")


@pytest.fixture
def two_nodes():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"rlsync_node_0": 100}})
    cluster.add_node(num_cpus=1, resources={"rlsync_node_1": 100})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_two_node_job_lands_where_planned(two_nodes):
    from sync.ray_run import run_job

    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                                 inference=dict(tp=2, dp=2, enable_ep=True),
                                 deployment=dict(gpus_per_node=4), eplb=dict(enabled=True, num_redundant_experts=4),
                                 sync=dict(timeout_s=60)))
    report = run_job(job, iterations=2, trainer="synthetic", address=two_nodes.address)
    assert report["verified"]
    node_of_resource = {k: n["NodeID"] for n in ray.nodes() if n["Alive"] for k in n["Resources"]
                        if k.startswith("rlsync_node_")}
    T = job.trainer.world_size
    for p in report["placement"]:
        want = node_of_resource["rlsync_node_0" if p["rank"] < T else "rlsync_node_1"]
        assert p["node_id"] == want, p
    assert report["cross_node_bytes_planned"] > 0
    assert report["cross_node_bytes_sent"] == report["cross_node_bytes_planned"]


def test_elastic_engines_join_and_leave():
    from sync.ray_run import run_job

    job = JobSpec.from_dict(dict(model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                                 inference=dict(tp=2, enable_ep=True, engines=1),
                                 eplb=dict(enabled=True, num_redundant_experts=2), sync=dict(timeout_s=60)))
    try:
        report = run_job(job, iterations=3, trainer="synthetic", engines_schedule=[1, 3, 2])
    finally:
        ray.shutdown()
    assert [r["engines"] for r in report["iterations"]] == [1, 3, 2]
    assert report["verified"]
    sizes = [r["bytes"] for r in report["iterations"]]
    assert sizes[1] > sizes[2] > sizes[0]  # every engine gets every weight
