"""Shared by the tests/deploy/test_kuberay_*.py files: deploy/kuberay overlays rendered with
`kubectl kustomize` (once per overlay per pytest run), the objects and config they hold, and readers
for the pod fields the tests compare (worker groups, Ray custom resources, Kubernetes quantities)."""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from rvpo_async.config import Config, load_config

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
OVERLAYS = sorted(p.name for p in (KUBERAY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"  # the shared folder sits beside the checkout
ACTOR_GROUP = {"rollout": "rollout", "learner": "learner", "judge": "judge"}  # actor kind -> worker group
ENTRYPOINT = "rvpo-async train --config /etc/rvpo/config.yaml"
CONFIG_MAP = "rvpo-config"
DASHBOARD_MAP = "rvpo-grafana-dashboard"


def missing(what: str) -> None:
    """A tool or file the deploy tests need is absent: skipped on a developer's machine, a failure in CI, so
    CI cannot pass without validating anything."""
    if os.environ.get("CI"):
        pytest.fail(f"{what} (CI is set: the deploy tests must run)")
    pytest.skip(what)


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        missing("kubectl is not on PATH; install kubectl (it has kustomize built in) to render deploy/kuberay "
                "overlays")
    out = subprocess.run([kubectl, "kustomize", str(KUBERAY / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    objs = [d for d in render(overlay) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(objs) == 1, f"{overlay}: expected one {kind} {name or ''}, got {len(objs)}"
    return copy.deepcopy(objs[0])


def overlay_config(overlay: str, tmp_path: Path) -> Config:
    cm = one(overlay, "ConfigMap", CONFIG_MAP)
    p = tmp_path / f"{overlay}-config.yaml"
    p.write_text(cm["data"]["config.yaml"])
    return load_config(p)


def groups_by_name(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Head and worker groups by name ('head' for the head group)."""
    out = {"head": cluster["spec"]["headGroupSpec"]}
    for g in cluster["spec"]["workerGroupSpecs"]:
        assert g["groupName"] not in out, f"duplicate group {g['groupName']}"
        out[g["groupName"]] = g
    return out


def ray_resources(group: dict[str, Any]) -> dict[str, int]:
    """Custom resources a group advertises, parsed the way the Ray autoscaler's KubeRay provider does:
    drop the outer quotes, remove the backslashes, load JSON, integer amounts only."""
    raw = group.get("rayStartParams", {}).get("resources")
    if raw is None:
        return {}
    assert isinstance(raw, str) and raw.startswith('"') and raw.endswith('"'), \
        f"rayStartParams.resources must be a quoted string like '\"{{\\\"rvpo_judge\\\": 4}}\"', got {raw!r}"
    parsed = json.loads(raw[1:-1].replace("\\", ""))
    assert isinstance(parsed, dict) and all(isinstance(v, int) and not isinstance(v, bool) for v in parsed.values()), \
        f"rayStartParams.resources must map names to integers, got {parsed!r}"
    return parsed


def quantity(q: Any) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]
