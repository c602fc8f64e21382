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
    from sync.run.loop import run_job

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
    from sync.run.loop import run_job

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


def test_colocated_run_recovers_from_a_killed_engine_and_checks_logits(tmp_path):
    """One run through the CLI: colocated ranks share their GPU's bundle; a rank killed mid-sync in
    iteration 2 fails that iteration (exit code 1), staged engines keep serving version 1, and after
    the restart iterations 3 and 4 verify, logits included."""
    import json

    import yaml

    from sync.cli import main

    spec = dict(name="colocated", model=dict(preset="tiny_qwen3_moe"), trainer=dict(tp=2, ep=2),
                inference=dict(tp=2, enable_ep=True, engines=2), deployment=dict(mode="colocated", gpus_per_node=4),
                eplb=dict(enabled=True, num_redundant_experts=4),
                sync=dict(timeout_s=20, bucket_mb=1, verify="logits", staging=True))
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    try:
        code = main(["run", str(path), "--iterations", "4", "--trainer", "synthetic", "--fault", "kill:5:1:2",
                     "--report", str(tmp_path / "report")])
    finally:
        ray.shutdown()
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert code == 1 and not report["verified"]
    first, failed, *after = report["iterations"]
    assert first["verified"] and all(r["verified"] for r in after)
    assert all(gap is None for r in [first, *after] for gap in r["logits_gap"].values()) and after[0]["logits_gap"]
    assert "rank 5 died" in failed["errors"]["5"]
    for rank, state in failed["engine_states"].items():  # staged: the old version is still served, complete
        assert state["serving"] == 1 and state["complete"] and state["error"], (rank, state)
    assert {s["serving"] for s in after[-1]["engine_states"].values()} == {4}
    by_device: dict[int, set] = {}
    for p in report["placement"]:
        by_device.setdefault(p["device"], set()).add(p["placement_group"])
    assert len(by_device) == 4 and all(len(groups) == 1 for groups in by_device.values())
