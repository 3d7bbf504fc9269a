"""A real Prometheus server for the tests: Debian's `prometheus` (installed by `make system-deps`) running
the shipped deploy/prometheus/prometheus.yml, scraping one metrics port every second, on loopback."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

PROM = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
MISSING = "{program} not found on PATH: run `make system-deps` (installs Debian's prometheus package, with promtool)"


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(MISSING.format(program=name))
    return path


@contextlib.contextmanager
def prometheus(tmp_path: Path, metrics_port: int, prom_port: int, *, rules: bool) -> Iterator[subprocess.Popen]:
    """The shipped config pointed at 127.0.0.1:`metrics_port`, scraping and evaluating every second, with
    alerts.yml's rules (`rules`) or none; its log is tmp_path/prometheus.log. Stopped on exit."""
    binary = tool("prometheus")
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["scrape_configs"][0].update(scrape_interval="1s",
                                    static_configs=[{"targets": [f"127.0.0.1:{metrics_port}"]}])
    if rules:
        shutil.copy(PROM / "alerts.yml", tmp_path / "alerts.yml")
    else:
        cfg.pop("rule_files", None)
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    with (tmp_path / "prometheus.log").open("w") as log:
        proc = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                 f"--storage.tsdb.path={tmp_path / 'data'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def query(port: int, q: str, at: float | None = None) -> list[dict[str, Any]]:
    """An instant query of the HTTP API (at time `at`, or now)."""
    params = {"query": q} if at is None else {"query": q, "time": f"{at:.3f}"}
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode(params)
    with urllib.request.urlopen(url, timeout=10) as r:
        body = json.loads(r.read())
    assert body["status"] == "success", body
    return body["data"]["result"]
