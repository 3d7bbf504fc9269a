"""A learner killed with SIGKILL ends the run; `--resume` then continues it from the last checkpoint.

The crashed run had scored (and trained) groups after its last checkpoint, with weights newer than the
checkpoint's: the resume drops and counts the scored copies, generates every group open at the checkpoint
again, and trains the same number of steps with policy versions that continue the checkpoint's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

pytestmark = [pytest.mark.slow]

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")


def _rows(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []


def _learner_pids(proc: subprocess.Popen) -> list[int]:
    out = []
    for c in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any("LearnerRank" in part for part in c.cmdline()):
                out.append(c.pid)
        except psutil.Error:
            pass
    return out


def test_resume_after_the_learner_was_killed_trains_every_step(tmp_path: Path, tiny_model_dir: str) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS="")  # its own local Ray instance, not the test session's
    cmd = [sys.executable, "-m", "rvpo_async.cli", "train", "--config", CONFIG, f"run.output_dir={run}",
           f"model.path={tiny_model_dir}", "run.steps=8", "rollout.group_size=4", "rollout.groups_per_step=4",
           "rollout.max_new_tokens=12", "judges.num_workers=1", "metrics.enabled=false", "checkpoint.every=3",
           "rollout.compile=false", "run.progress=false", "ray.num_cpus=4", "learner.master_port=21730",
           "staleness.max_staleness=2",
           "run.max_restarts=0"]  # no in-run recovery: this test is about resuming a crashed run
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    killed = False
    while time.time() < deadline and proc.poll() is None:
        if len(_rows(run)) >= 4:  # a checkpoint at step 3, and at least one step trained after it
            pids = _learner_pids(proc)
            if pids:
                for pid in pids:
                    os.kill(pid, signal.SIGKILL)
                killed = True
                break
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=300)
    assert killed, f"the run ended before the learner could be killed:\n{out[-3000:]}"
    if proc.returncode == 0:
        pytest.skip("the run finished its last step before the kill took effect")
    assert "learner" in out, out[-3000:]
    crashed_steps = len(_rows(run))
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert crashed_steps > 3 and latest.endswith("3"), (crashed_steps, latest)

    res = subprocess.run(cmd + ["--resume"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:]
    assert "newer than the learner" not in res.stdout
    rows = _rows(run)
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [r["policy_version"] for r in rows] == list(range(1, 9))
    assert max(s for r in rows for s in r["staleness_values"]) <= 2
    trained = [g for r in rows for g in r["group_ids"]]
    assert len(trained) == len(set(trained)) == 8 * 4, "a group was trained twice, or one went missing"
    report = json.loads((run / "report.json").read_text())
    assert report["steps"] == 8 and report["policy_version"] == 8
    led = report["ledger"]
    assert led["trained"] == 8 * 4
    assert led["admitted"] == led["trained"] + sum(led["dropped"].values()) + led["in_flight"], led
