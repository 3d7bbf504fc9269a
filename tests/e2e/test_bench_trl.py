"""`rvpo-async bench trl` with TRL's real GRPOTrainer on the tiny model (3 small steps): the TRL side runs,
its reward functions are the config's rule judges, and the table prints. The rvpo-async side of the bench
is `rvpo-async train`, run end to end by tests/e2e/test_train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_bench_trl_runs_grpo_trainer_and_prints_its_rate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    pytest.importorskip("trl", reason="the bench extra (trl) is not installed")
    from rvpo_async.bench.trl import bench_trl

    rc = bench_trl(["--systems", "trl", "--repeats", "1", "--steps", "3", "--window", "1:3", "--out", str(tmp_path),
                    "rollout.groups_per_step=2", "rollout.group_size=4", "rollout.max_new_tokens=8"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "samples/s, steps 2-3" in out and "how the setups differ" in out
    rows = [json.loads(x) for x in (tmp_path / "trl-0" / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and all(r["samples"] == 8 for r in rows[1:])
    log = (tmp_path / "trl-0" / "log.txt").read_text()
    for name in ("length", "format", "safety", "keyword"):
        assert f"rewards/{name}/mean" in log  # TRL logged each rule judge as a reward function
