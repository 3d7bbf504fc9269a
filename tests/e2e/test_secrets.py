"""A judge API key never leaves the process environment: a short training run with an HTTP judge (a stub
server on loopback that sometimes echoes the presented key back, as some providers do in auth errors) and a
canary key; the canary then appears nowhere in the run directory, the run's output, the metrics endpoint or
the Ray session logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from ports import free_ports

pytestmark = [pytest.mark.slow]

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")
CANARY = "sk-canary-3b7e91d04f2a"
PORTS = range(21800, 21900)


class EchoingJudge(BaseHTTPRequestHandler):
    """Every third request answers 401 quoting the presented key; every third answers with the key in its text."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.auth.append(self.headers.get("Authorization", ""))  # type: ignore[attr-defined]
        n = len(self.server.auth)  # type: ignore[attr-defined]
        status, payload = 200, {"choices": [{"message": {"role": "assistant", "content": "yes"}}]}
        if n % 3 == 1:
            status, payload = 401, {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}}
        elif n % 3 == 2:
            payload = {"choices": [{"message": {"role": "assistant", "content": f"key {CANARY} is not an answer"}}]}
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


def _files_holding(root: Path, needle: bytes, newer_than: float) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and p.stat().st_mtime >= newer_than and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            pass
    return hits


def test_a_judge_api_key_appears_in_no_file_log_or_metric(tmp_path: Path, tiny_model_dir: str) -> None:
    judge_port, metrics_port = free_ports(PORTS, 2)
    server = ThreadingHTTPServer(("127.0.0.1", judge_port), EchoingJudge)
    server.auth = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    run = tmp_path / "run"
    started = time.time() - 1
    spec = ("[{name: length, kind: length, params: {min_chars: 10, max_chars: 50}}, "
            f"{{name: polite, kind: http, params: {{base_url: 'http://127.0.0.1:{judge_port}/v1', model: m, "
            "rubric: 'Is it polite?', api_key_env: RVPO_CANARY_JUDGE_KEY}}]")
    cmd = [sys.executable, "-m", "rvpo_async.cli", "train", "--config", CONFIG, f"run.output_dir={run}",
           f"model.path={tiny_model_dir}", "run.steps=3", "rollout.group_size=4", "rollout.groups_per_step=2",
           "rollout.max_new_tokens=8", "judges.num_workers=1", "checkpoint.every=1", "run.progress=false",
           "rollout.compile=false",
           "ray.num_cpus=4", f"metrics.port={metrics_port}", "learner.master_port=21950", f"judges.specs={spec}"]
    env = dict(os.environ, RAY_ADDRESS="", RVPO_CANARY_JUDGE_KEY=CANARY)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    scraped: list[str] = []

    def scrape() -> None:
        while proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=2) as r:
                    scraped.append(r.read().decode())
            except OSError:
                pass
            time.sleep(0.5)

    t = threading.Thread(target=scrape, daemon=True)
    t.start()
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        server.shutdown()
        server.server_close()
    t.join(timeout=5)
    assert proc.returncode == 0, out[-3000:]

    # the key was really used: the judge presented it, and the stub sent it back in errors and replies
    assert server.auth and all(a == f"Bearer {CANARY}" for a in server.auth)  # type: ignore[attr-defined]
    assert scraped and any("rvpo_judge" in s for s in scraped)
    assert CANARY not in out
    assert not any(CANARY in s for s in scraped)
    assert not _files_holding(run, CANARY.encode(), 0)
    report = json.loads((run / "report.json").read_text())
    failures = json.dumps(report["judges"])
    assert "polite" in failures
    ray_tmp = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray"
    assert not _files_holding(ray_tmp, CANARY.encode(), started), "the key reached Ray's session logs"
