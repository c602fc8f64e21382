"""The rlsync command line."""

from __future__ import annotations

from pathlib import Path

from planners import SyncPlan
from sync.cli import main

ROOT = Path(__file__).parents[2]


def test_plan_summary_json_and_explain(tmp_path, capsys):
    out = tmp_path / "plan.json"
    rc = main(["plan", str(ROOT / "examples/tiny_moe.yaml"), "--json", str(out),
               "--explain", "model.layers.0.mlp.experts.1.down_proj.weight"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "plan valid" in text and "lower bound" in text and "busiest sender" in text
    assert "mlp.experts.w2_weight" in text  # the explained tensor lands in the engines' expert stacks
    SyncPlan.from_json(out).validate()


def test_bad_job_exits_2_with_the_field(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {preset: tiny_llama}\ntrainer: {tp: 3}\ninference: {tp: 1}\n")
    assert main(["plan", str(bad)]) == 2
    assert "trainer.tp" in capsys.readouterr().out
