"""deploy/prometheus and deploy/grafana: promtool accepts the rules and config, the alerts fire when they
should, a real Prometheus scrapes a run with the shipped config, and every metric the dashboard and the
alerts query is one rvpo_async/metrics.py exports."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from rvpo_async.config import MetricsConfig
from ports import free_ports
from prometheus_server import prometheus, query, tool
from rvpo_async.metrics import METRICS, Metrics

ROOT = Path(__file__).resolve().parents[2]
PROM = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "rvpo-dashboard.json"
PORT_RANGE = range(21110, 21120)  # this suite's ports; tests/unit/test_metrics.py uses 21100-21109
def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), *args], cwd=PROM, capture_output=True, text=True, timeout=120)


# ---------------------------------------------------------------- PromQL metric names

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset",
             "bool", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects: what is left once strings, label matchers, grouping
    clauses, ranges, numbers, function calls and keywords are removed."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\boffset\s+\S+", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        rest = e[m.end():].lstrip()
        word = m.group(0)
        if rest.startswith("(") or word.lower() in _KEYWORDS:
            continue
        if m.start() > 0 and (e[m.start() - 1].isdigit() or e[m.start() - 1] in ".$"):
            continue  # 1e3, $var
        names.add(word)
    return names


def test_metric_name_extraction_finds_metrics_and_skips_functions_labels_and_keywords() -> None:
    expr = ('histogram_quantile(0.9, sum by (judge, le) (rate(rvpo_judge_latency_seconds_bucket{job=~"$job"}'
            '[$__rate_interval]))) > 0.5 * scalar(rvpo:staleness_bound) and on() (time() - '
            'process_start_time_seconds) > 1e3 unless rate(x_total[1h] offset 10m)')
    assert _metric_names(expr) == {"rvpo_judge_latency_seconds_bucket", "rvpo:staleness_bound",
                                   "process_start_time_seconds", "x_total"}


@pytest.fixture(scope="module")
def exported_names() -> set[str]:
    """Every sample name a scrape of a run's metrics endpoint can return."""
    m = Metrics(["r"], ["r"])
    m.record_rubric(0.5, 0.0, 0.1, [3], {"axis:any": 0.5})  # a tag's series exists once a batch carried the tag
    return {s.name for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}


@pytest.fixture(scope="module")
def recorded_names() -> set[str]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return {r["record"] for g in groups for r in g["rules"] if "record" in r}


def _dashboard_exprs() -> Iterator[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    for p in dash["panels"]:
        for t in p.get("targets", []):
            yield p["title"], t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*\w+\)", v["query"]["query"])
            assert m, f"template variable {v['name']}: unexpected query {v['query']}"
            yield f"variable {v['name']}", m.group(1)


def _alert_exprs() -> Iterator[tuple[str, str]]:
    for g in yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]:
        for r in g["rules"]:
            yield r.get("alert") or r["record"], r["expr"]


# ---------------------------------------------------------------- promtool

def test_promtool_check_rules_passes_on_alerts_yml() -> None:
    out = _promtool("check", "rules", "alerts.yml")
    assert out.returncode == 0, out.stdout + out.stderr


def test_promtool_check_config_passes_on_prometheus_yml() -> None:
    out = _promtool("check", "config", "prometheus.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "alerts.yml" in out.stdout  # the rule file was found and checked too


def test_alerts_fire_on_the_synthetic_runs_of_alerts_test_yml() -> None:
    out = _promtool("test", "rules", "alerts.test.yml")
    assert out.returncode == 0, out.stdout + out.stderr
    tests = yaml.safe_load((PROM / "alerts.test.yml").read_text())["tests"]
    alerts = {name for name, _ in _alert_exprs() if not name.startswith("rvpo:")}
    fired = {m for t in tests for q in t["promql_expr_test"] for s in q["exp_samples"]
             for m in re.findall(r'alertname="(\w+)"', s["labels"])}
    assert fired == alerts, f"alerts without a firing test case: {alerts - fired}"


def test_prometheus_yml_scrapes_the_default_metrics_port_every_5s() -> None:
    cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    (job,) = cfg["scrape_configs"]
    assert job["scrape_interval"] == "5s"
    assert job["static_configs"] == [{"targets": [f"127.0.0.1:{MetricsConfig().port}"]}]
    assert cfg["rule_files"] == ["alerts.yml"]


# ---------------------------------------------------------------- names

def test_dashboard_references_only_metric_names_declared_in_rvpo_async_metrics(exported_names: set[str],
                                                                               recorded_names: set[str]) -> None:
    bad = {(title, n) for title, e in _dashboard_exprs() for n in _metric_names(e)
           if n not in exported_names | recorded_names}
    assert not bad, f"dashboard queries undeclared metrics: {sorted(bad)}"


def test_alert_rules_reference_only_metric_names_declared_in_rvpo_async_metrics(exported_names: set[str],
                                                                                recorded_names: set[str]) -> None:
    bad = {(name, n) for name, e in _alert_exprs() for n in _metric_names(e)
           if n not in exported_names | recorded_names}
    assert not bad, f"alert rules query undeclared metrics: {sorted(bad)}"


def test_dashboard_plots_every_declared_metric() -> None:
    used = {n for _, e in _dashboard_exprs() for n in _metric_names(e)}
    base = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    missing = {m.name for m in METRICS} - base
    assert not missing, f"no dashboard panel for {sorted(missing)}"


def test_dashboard_draws_one_series_per_reward_for_the_reward_panels() -> None:
    dash = json.loads(DASHBOARD.read_text())
    for metric in ("rvpo_reward_mean", "rvpo_reward_std", "rvpo_reward_bottleneck_share"):
        targets = [t for p in dash["panels"] for t in p.get("targets", []) if metric in _metric_names(t["expr"])]
        assert targets, metric
        for t in targets:
            assert "{{reward}}" in t["legendFormat"]
            assert not re.search(r"\b(sum|avg|max|min)\b(?!\s*by\s*\([^)]*reward)", t["expr"]), t["expr"]


# ---------------------------------------------------------------- a real Prometheus

def test_prometheus_with_the_shipped_config_scrapes_a_runs_metrics_server(tmp_path: Path) -> None:
    metrics_port, prom_port = free_ports(PORT_RANGE, 2)
    m = Metrics(["length", "format"], ["length", "format"])
    m.set_policy_version(3)
    m.record_rewards(mean=[0.75, 0.5], std=[0.1, 0.2], inter_variance=0.3, bottleneck_share=[0.25, 0.75],
                     worst_mean=0.4)
    server = m.start_http_server("127.0.0.1", metrics_port)
    try:
        # the shipped config and alert rules, pointed at this test's port and made faster
        with prometheus(tmp_path, metrics_port, prom_port, rules=True) as proc:
            deadline = time.monotonic() + 30
            version: list[dict[str, Any]] = []
            bound: list[dict[str, Any]] = []
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    version = query(prom_port, "rvpo_policy_version")
                    bound = query(prom_port, "rvpo:staleness_bound")
                except OSError:
                    pass
                if version and bound:
                    break
                time.sleep(0.5)
            assert version, f"no rvpo_policy_version scraped; log:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}"
            assert version[0]["value"][1] == "3" and version[0]["metric"]["job"] == "rvpo"
            assert bound and bound[0]["value"][1] == "2"  # alerts.yml's recording rules were loaded
            means = {r["metric"]["reward"]: float(r["value"][1]) for r in query(prom_port, "rvpo_reward_mean")}
            assert means == {"length": 0.75, "format": 0.5}
    finally:
        server.shutdown()
        server.server_close()
