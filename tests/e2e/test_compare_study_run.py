"""`rvpo-async compare` on the real stack (vLLM CPU engine, DeepSpeed, Ray, judges), kept tiny, on the verifiable
rubric task (configs/tiny-cpu-rubric-rules.yaml: per-prompt rubrics of 3-17 criteria graded by their checks), so
that the study's rubric measures and its reward slots that some steps lack are exercised too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ports import free_ports

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu-rubric-rules.yaml")
SMALL = ["run.steps=2", "rollout.group_size=4", "rollout.groups_per_step=2", "rollout.max_new_tokens=8",
         "judges.num_workers=1", "metrics.enabled=false", "run.progress=false", "learner.micro_batch_size=8",
         "checkpoint.every=0"]


def test_study_runs_every_variant_then_recomputes_nothing(tmp_path, tiny_model_dir, ray_local, monkeypatch):
    from rvpo_async import compare
    from rvpo_async.cli import main

    out = tmp_path / "study"
    argv = ["compare", "--config", CONFIG, "--out", str(out), "--seeds", "0",
            "--variants", "gdpo:algo.aggregator=gdpo", "rvpo-focus:algo.aggregator=rvpo_focus algo.k_risk=2",
            f"model.path={tiny_model_dir}", f"learner.master_port={free_ports(range(23600, 23700))[0]}", *SMALL]
    assert main(argv) == 0
    study = json.loads((out / "study.json").read_text())
    assert study["this_invocation"] == {"started": 2}
    assert set(study["variants"]) == {"gdpo", "rvpo-focus"}
    for name in ("gdpo", "rvpo-focus"):
        report = json.loads((out / name / "seed0" / "report.json").read_text())
        assert report["steps"] == 2
    assert json.loads((out / "rvpo-focus" / "seed0" / "report.json").read_text())["aggregator"] == "rvpo_focus"
    assert {"worst_reward_mean", "rubric_met_ratio", "pitfall_rate",
            "rubric_met/axis:instruction"} <= set(study["metrics"])  # every prompt has its own-word criterion
    assert not [m for m in study["metrics"] if m.startswith("reward/")]  # slot j: another criterion per prompt
    (pair,) = study["pairs"]
    assert pair["final"]["rubric_met_ratio"]["p_value"] == 1.0  # one seed each: nothing can be significant
    assert (out / "study.md").read_text().count("| gdpo |") == 3  # final, best, mean over the run
    assert (out / "study.png").stat().st_size > 0

    def never(cfg):
        raise AssertionError(f"recomputed {cfg.run.output_dir}")

    monkeypatch.setattr(compare, "_default_runner", never)
    assert main(argv) == 0
    assert json.loads((out / "study.json").read_text())["this_invocation"] == {"skipped": 2}
