"""``rlsync bench sync``: local processes, the plan executor beside the broadcast baseline."""

from __future__ import annotations

import json
from pathlib import Path

from sync.cli import main

ROOT = Path(__file__).parents[2]


def test_bench_sync_json(capsys):
    assert main(["bench", "sync", str(ROOT / "examples/tiny_moe.yaml"), "--reps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("sync_seconds", "verify_seconds", "baseline_seconds", "bound_seconds", "bytes_moved", "verified"):
        assert key in out
    assert out["verified"] is True and out["bytes_moved"] > 0 and out["bound_seconds"] > 0
    assert out["verify_seconds"] > 0  # the checksums of the second sync, timed apart from it
    # every process's CPU time of a sync (threads and kernel time), and the share of the cores it keeps busy
    assert out["process_cpu_seconds"]["unverified"] > 0 and out["process_cpu_seconds"]["verified"] > 0
    assert out["cpu_busy"] > 0 and out["cores"] >= 1


def test_bench_sync_hosted_runs_one_process_per_device(capsys):
    job = ROOT / "examples/tiny_moe_colocated.yaml"
    assert main(["bench", "sync", str(job), "--reps", "1", "--hosted", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["verified"] is True and out["baseline_seconds"] is None
    assert out["processes"] < out["ranks"]  # a trainer rank and an engine rank share each process
    assert out["link_gbps"] and all(v > 0 for v in out["link_gbps"].values())


def test_bench_quantize_is_exact_against_torchs_quantizer(tmp_path):
    """``rlsync bench quantize`` on the CPU: the numba quantizer's bits and scales equal
    ``quantize_blocks`` over DeepSeek-V3-shaped matrices, timed beside a flat copy."""
    out = tmp_path / "q.json"
    assert main(["bench", "quantize", "--", "--gb", "0.05", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows][:2] == ["flat copy", "torch per tensor"]
    kernels = rows[2:]
    assert kernels and all(r["exact"] for r in kernels)
    assert all(r["median_s"] > 0 and r["over_flat"] > 0 for r in rows)
