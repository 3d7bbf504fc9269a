"""Run a learner-rank probe script in a child process (world size 1) and read its RESULT line.

A rank initialises torch.distributed, which must not leak into the test session. The script sees the
repository root as ROOT and the model as MODEL_DIR, and prints `RESULT <json>` last.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from ports import free_ports

ROOT = Path(__file__).resolve().parents[1]


def run_rank_probe(code: str, model_dir: str, ports: range) -> Any:
    port = free_ports(ports)[0]
    env = dict(os.environ, ROOT=str(ROOT), MODEL_DIR=model_dir, PYTHONPATH=str(ROOT), RANK="0", LOCAL_RANK="0",
               WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])
