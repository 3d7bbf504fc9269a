"""`rvpo-async chaos`, short: a run whose learner rank, buffer, rollout engine and a judge worker are killed
trains every step, and its group ledger reconciles exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rvpo_async.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")


def test_a_run_survives_killing_each_actor_kind_and_its_ledger_reconciles(tmp_path, tiny_model_dir, ray_local, capsys):
    from rvpo_async.chaos import chaos

    run = tmp_path / "run"
    cfg = load_config(CONFIG, ["rollout.group_size=4", "rollout.groups_per_step=4", "rollout.max_new_tokens=12",
                               "judges.num_workers=2", "metrics.enabled=false", "run.progress=false",
                               "rollout.compile=false", "learner.micro_batch_size=16", "run.steps=12",
                               "checkpoint.every=2", "learner.master_port=21760", f"run.output_dir={run}",
                               f"model.path={tiny_model_dir}"])
    rc = chaos(cfg, ["learner", "buffer", "rollout", "judge"], duration_s=10.0, judge_every_s=5.0)
    out = capsys.readouterr().out
    assert rc == 0, out
    kinds = [ln.split()[0] for ln in out.splitlines() if ln.startswith("  ") and len(ln.split()) == 4]
    assert {"learner", "buffer", "rollout", "judge"} <= set(kinds), out
    report = json.loads((run / "report.json").read_text())
    assert [r["actor"] for r in report["recoveries"]] == ["learner", "buffer"], report["recoveries"]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["policy_version"] for r in rows] == list(range(1, 13))
    trained = [g for r in rows for g in r["group_ids"]]
    assert len(trained) == len(set(trained)) == 12 * 4
    assert max(s for r in rows for s in r["staleness_values"]) <= cfg.staleness.max_staleness
    led = report["ledger"]
    assert led["trained"] == 48 and led["admitted"] == 48 + sum(led["dropped"].values()) + led["in_flight"]
