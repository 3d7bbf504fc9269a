"""SIGTERM stops `rvpo-async train` cleanly: a final checkpoint, exit code 130, no orphan processes."""

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


def test_sigterm_writes_final_checkpoint_and_leaves_no_processes(tmp_path: Path, tiny_model_dir: str) -> None:
    run = tmp_path / "run"
    env = dict(os.environ, RAY_ADDRESS="")  # its own local Ray instance, not the test session's
    cmd = [sys.executable, "-m", "rvpo_async.cli", "train", "--config", CONFIG, f"run.output_dir={run}",
           f"model.path={tiny_model_dir}", "run.steps=500", "rollout.group_size=4", "rollout.groups_per_step=4",
           "rollout.max_new_tokens=12", "judges.num_workers=1", "metrics.enabled=false", "checkpoint.every=0",
           "rollout.compile=false", "run.progress=false", "ray.num_cpus=4"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    me = psutil.Process(proc.pid)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 600
    descendants: set[int] = set()
    while time.time() < deadline and proc.poll() is None:
        descendants |= {c.pid for c in me.children(recursive=True)}
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    descendants |= {c.pid for c in me.children(recursive=True)}
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out[-3000:]
    assert "stopped by SIGTERM" in out

    steps_done = len(metrics.read_text().splitlines())
    latest = (run / "checkpoints" / "latest").read_text().strip()
    manifest = json.loads((run / "checkpoints" / latest / "manifest.json").read_text())
    assert manifest  # a complete checkpoint of the step the run stopped at
    assert (run / "report.json").is_file()
    assert json.loads((run / "report.json").read_text())["steps"] == steps_done

    time.sleep(3)
    alive = [p for p in descendants if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"processes left behind: {[psutil.Process(p).cmdline()[:3] for p in alive]}"
