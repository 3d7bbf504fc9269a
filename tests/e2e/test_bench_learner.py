"""`rvpo-async bench learner` end to end on the tiny model (two real DeepSpeed ranks in one child process, one
timed step each): both modes run on the task's batch layout and the table prints. What it measures is in
BENCHMARKS.md; no timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ports import free_ports

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_bench_learner_times_both_forwards_and_prints_their_ratio(tmp_path: Path) -> None:
    port = free_ports(range(21460, 21490))[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "rvpo_async.cli", "bench", "learner", "--groups", "2",
                           "--group-size", "4", "--response-len", "4", "--repeat", "1", "--warmup", "0",
                           "--port", str(port)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "8 rows of" in out and "2 prompts x 4 responses of 4 tokens" in out
    assert "plain forward (shared_prefix=false)" in out and "each prompt once (shared_prefix=true)" in out
    assert "plain/shared:" in out


def test_bench_learner_mixed_lengths_adds_the_one_forward_mode(tmp_path: Path) -> None:
    port = free_ports(range(21490, 21520))[0]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "rvpo_async.cli", "bench", "learner", "--groups", "2",
                           "--group-size", "4", "--response-len", "8", "--mixed", "--repeat", "1", "--warmup", "0",
                           "--port", str(port)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "2 prompts x 4 responses of 2..8 tokens" in out
    assert "each prompt once, length_buckets=1" in out and "one forward/length buckets:" in out
