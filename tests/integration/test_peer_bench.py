"""``rlsync bench peer`` on its smallest setting: megatron-core's resharding and rlsync's plan executor
refresh the same tiny MoE model (TP2 x EP2 -> EP4) on 4 local processes, both bit-exactly.

The tiny model (1.6 MB of weights) and one launch of each implementation with 2 syncs keep this to
about half a minute on two cores; the launch timeout bounds it if a process hangs."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("megatron.core")

from sync.bench.peer import main  # noqa: E402


def test_both_sides_of_the_peer_bench_are_bit_exact_and_count_their_bytes(tmp_path):
    report = tmp_path / "peer.json"
    code = main(["--cases", "moe_ep2_to_ep4", "--size", "tiny", "--syncs", "2", "--launches", "1",
                 "--timeout", "120", "--json", str(report)])
    row = json.loads(report.read_text())["rows"][0]
    details = row["details"]
    assert row["megatron_exact"], details["megatron-core"]["mismatched"]
    assert row["rlsync_exact"], details["rlsync"]["mismatched"] + details["rlsync verify"]["mismatched"]
    assert row["rlsync_checksums_agree"] is True
    assert code == 0
    assert row["megatron_bytes_moved"] > 0 and row["rlsync_bytes_moved"] > 0
    for side in ("megatron-core", "rlsync", "rlsync verify"):
        assert len(details[side]["samples_s"]) == 1, side  # one timed sync after each launch's warm-up
        assert details[side]["median_s"] > 0, side
