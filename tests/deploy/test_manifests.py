"""deploy/kuberay: every overlay renders, validates against KubeRay's CRD schemas, and agrees with the
rvpo-async config it ships (placement resources, pod counts, metrics port, secrets)."""

from __future__ import annotations

import copy
import functools
import json
import math
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rvpo_async.config import Config, load_config
from rvpo_async.placement import requested_resources

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "deploy" / "kuberay"
OVERLAYS = sorted(p.name for p in (KUBERAY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
CRDS = Path("/work/shared/schemas/kuberay")
if not CRDS.is_dir():  # the shared folder sits beside the checkout
    CRDS = ROOT.parent / "shared" / "schemas" / "kuberay"
ACTOR_GROUP = {"rollout": "rollout", "learner": "learner", "judge": "judge"}  # actor kind -> worker group
ENTRYPOINT = "rvpo-async train --config /etc/rvpo/config.yaml"
CONFIG_MAP = "rvpo-config"
DASHBOARD_MAP = "rvpo-grafana-dashboard"


# ---------------------------------------------------------------- rendering

@functools.cache
def _render(overlay: str) -> tuple[dict[str, Any], ...]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH; install kubectl (it has kustomize built in) to render "
                    "deploy/kuberay overlays")
    out = subprocess.run([kubectl, "kustomize", str(KUBERAY / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def _one(overlay: str, kind: str, name: str | None = None) -> dict[str, Any]:
    objs = [d for d in _render(overlay) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(objs) == 1, f"{overlay}: expected one {kind} {name or ''}, got {len(objs)}"
    return copy.deepcopy(objs[0])


def _config(overlay: str, tmp_path: Path) -> Config:
    cm = _one(overlay, "ConfigMap", CONFIG_MAP)
    p = tmp_path / f"{overlay}-config.yaml"
    p.write_text(cm["data"]["config.yaml"])
    return load_config(p)


def _groups(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Head and worker groups by name ('head' for the head group)."""
    out = {"head": cluster["spec"]["headGroupSpec"]}
    for g in cluster["spec"]["workerGroupSpecs"]:
        assert g["groupName"] not in out, f"duplicate group {g['groupName']}"
        out[g["groupName"]] = g
    return out


def _ray_resources(group: dict[str, Any]) -> dict[str, int]:
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


def _quantity(q: Any) -> float:
    s = str(q)
    if s.endswith("m"):
        return float(s[:-1]) / 1000
    return float(s)


def _container(group: dict[str, Any]) -> dict[str, Any]:
    return group["template"]["spec"]["containers"][0]


# ---------------------------------------------------------------- CRD schemas

def _to_jsonschema(node: Any) -> Any:
    """An OpenAPI v3 structural schema as JSON Schema. Kubernetes extensions: int-or-string becomes
    integer|string, nullable adds null, and objects with declared properties reject unknown fields (the
    API server would silently prune them, hiding a misspelt field)."""
    if not isinstance(node, dict):
        return node
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k.startswith("x-kubernetes-") or k == "nullable":
            continue
        if k == "properties":
            out[k] = {name: _to_jsonschema(s) for name, s in v.items()}
        elif k in ("items", "additionalProperties", "not") and isinstance(v, dict):
            out[k] = _to_jsonschema(v)
        elif k in ("anyOf", "allOf", "oneOf"):
            out[k] = [_to_jsonschema(s) for s in v]
        else:
            out[k] = v
    if node.get("x-kubernetes-int-or-string") and "type" not in out and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and \
            not node.get("x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    return out


@functools.cache
def _validator(kind: str) -> jsonschema.protocols.Validator:
    fname = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}[kind]
    path = CRDS / fname
    assert path.is_file(), f"KubeRay CRD not found at {path}"
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRD files are large: libyaml is 10x faster
    crd = next(d for d in yaml.load_all(path.read_text(), Loader=loader) if d)
    assert crd["spec"]["names"]["kind"] == kind
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = _to_jsonschema(version["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def _schema_errors(obj: dict[str, Any]) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in _validator(obj["kind"]).iter_errors(obj)]


# ---------------------------------------------------------------- tests

def test_the_cpu_smoke_and_gpu_overlays_exist() -> None:
    assert OVERLAYS == ["cpu-smoke", "gpu"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_with_kubectl_kustomize(overlay: str) -> None:
    objs = sorted((d["kind"], d["metadata"]["name"]) for d in _render(overlay))
    assert objs == sorted([("ConfigMap", CONFIG_MAP), ("ConfigMap", DASHBOARD_MAP),
                           ("PersistentVolumeClaim", "rvpo-data"), ("PodMonitor", "rvpo"),
                           ("PrometheusRule", "rvpo"), ("RayCluster", "rvpo"), ("RayJob", "rvpo-train")])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayclusters_and_rayjobs_validate_against_the_crd_schemas(overlay: str) -> None:
    ray_objs = [d for d in _render(overlay) if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray_objs} == {"RayCluster", "RayJob"}
    for obj in ray_objs:
        errors = _schema_errors(obj)
        assert not errors, f"{overlay} {obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(errors)


def test_crd_schema_check_rejects_misspelt_fields_and_wrong_types() -> None:
    cluster = _one(OVERLAYS[0], "RayCluster")
    cluster["spec"]["enableInTreeAutoscalling"] = True
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 2
    errors = "\n".join(_schema_errors(cluster))
    assert "enableInTreeAutoscalling" in errors
    assert "workerGroupSpecs/0/rayStartParams/num-cpus: 2 is not of type 'string'" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_a_config_that_load_config_accepts(overlay: str, tmp_path: Path) -> None:
    cfg = _config(overlay, tmp_path)
    assert cfg.judges.autoscale is True
    assert cfg.judges.min_workers < cfg.judges.max_workers
    assert cfg.reward_names, "the deployed config needs judge specs"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployed_judge_specs_build_with_their_params(overlay: str, tmp_path: Path) -> None:
    from actors.judges import build_judge

    for spec in _config(overlay, tmp_path).judges.specs:
        judge = build_judge(spec)
        assert judge.name == spec.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_actor_kinds_custom_resource_is_provided_only_by_its_worker_group(overlay: str,
                                                                               tmp_path: Path) -> None:
    cfg = _config(overlay, tmp_path)
    groups = _groups(_one(overlay, "RayCluster"))
    provided = {name: _ray_resources(g) for name, g in groups.items()}
    for kind, wanted in requested_resources(cfg).items():
        assert set(wanted) == {f"rvpo_{kind}"}, f"{kind} actors must request rvpo_{kind}, got {wanted}"
        for res, amount in wanted.items():
            providers = sorted(name for name, p in provided.items() if res in p)
            assert providers == [ACTOR_GROUP[kind]], f"{res}: provided by {providers}"
            assert 0 < amount <= provided[ACTOR_GROUP[kind]][res]
    assert provided["head"] == {}
    assert set(groups) == {"head", *ACTOR_GROUP.values()}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_judge_group_replicas_lie_within_min_and_max_and_the_autoscaler_is_enabled(overlay: str) -> None:
    cluster = _one(overlay, "RayCluster")
    judge = _groups(cluster)["judge"]
    assert judge["minReplicas"] <= judge["replicas"] <= judge["maxReplicas"]
    assert judge["minReplicas"] < judge["maxReplicas"], "the judge group must be able to scale"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fixed_groups_are_pinned_so_the_autoscaler_leaves_them_alone(overlay: str) -> None:
    groups = _groups(_one(overlay, "RayCluster"))
    for name in ("rollout", "learner"):
        g = groups[name]
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_group_replicas_hold_the_configured_actor_counts(overlay: str, tmp_path: Path) -> None:
    cfg = _config(overlay, tmp_path)
    groups = _groups(_one(overlay, "RayCluster"))
    req = requested_resources(cfg)

    def per_pod(kind: str) -> int:
        (res, amount), = req[kind].items()
        return math.floor(_ray_resources(groups[ACTOR_GROUP[kind]])[res] / amount)

    assert groups["rollout"]["replicas"] * per_pod("rollout") >= cfg.rollout.num_engines
    assert groups["learner"]["replicas"] * per_pod("learner") >= cfg.learner.num_ranks
    judge = groups["judge"]
    assert judge["minReplicas"] * per_pod("judge") >= cfg.judges.min_workers
    assert judge["maxReplicas"] * per_pod("judge") >= cfg.judges.max_workers
    # no judge pod beyond what max_workers can use
    assert (judge["maxReplicas"] - 1) * per_pod("judge") < cfg.judges.max_workers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_have_the_cpus_and_gpus_their_actors_request(overlay: str, tmp_path: Path) -> None:
    cfg = _config(overlay, tmp_path)
    groups = _groups(_one(overlay, "RayCluster"))
    req = requested_resources(cfg)
    need = {"rollout": (cfg.rollout.num_cpus, cfg.rollout.num_gpus),
            "learner": (cfg.learner.num_cpus, cfg.learner.num_gpus),
            "judge": (cfg.judges.num_cpus, 0.0)}
    for kind, (cpus, gpus) in need.items():
        g = groups[ACTOR_GROUP[kind]]
        (res, amount), = req[kind].items()
        actors = math.floor(_ray_resources(g)[res] / amount)
        limits = _container(g)["resources"]["limits"]
        assert _quantity(limits["cpu"]) >= actors * cpus, f"{kind}: {actors} actors x {cpus} CPUs"
        pod_gpus = _quantity(limits.get("nvidia.com/gpu", 0))
        assert pod_gpus >= actors * gpus, f"{kind}: {actors} actors x {gpus} GPUs, pod has {pod_gpus}"
        if gpus == 0:
            assert pod_gpus == 0, f"{kind} actors use no GPU, but the pod asks for {pod_gpus}"
    assert "nvidia.com/gpu" not in _container(groups["head"])["resources"]["limits"]


def test_gpu_overlay_puts_rollout_and_learner_on_gpus(tmp_path: Path) -> None:
    cfg = _config("gpu", tmp_path)
    assert cfg.rollout.num_gpus >= 1 and cfg.learner.num_gpus >= 1
    groups = _groups(_one("gpu", "RayCluster"))
    for name in ("rollout", "learner"):
        res = _container(groups[name])["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in groups[name]["template"]["spec"]["tolerations"])
    env = {e["name"]: e.get("value") for e in _container(groups["learner"])["env"]}
    assert env["DS_ACCELERATOR"] == "cuda"
    assert _one("gpu", "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"].endswith("-cuda")


def _all_containers(overlay: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(where, container, pod securityContext) for every container the overlay's objects create."""
    out = []
    cluster = _one(overlay, "RayCluster")
    for name, g in _groups(cluster).items():
        spec = g["template"]["spec"]
        for c in spec.get("initContainers", []) + spec["containers"]:
            out.append((f"{name}/{c['name']}", c, spec.get("securityContext", {})))
    out.append(("autoscaler", cluster["spec"]["autoscalerOptions"], {}))
    sub = _one(overlay, "RayJob")["spec"]["submitterPodTemplate"]["spec"]
    for c in sub["containers"]:
        out.append((f"submitter/{c['name']}", c, sub.get("securityContext", {})))
    return out


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_runs_as_non_root_with_requests_and_limits(overlay: str) -> None:
    for where, c, pod_sc in _all_containers(overlay):
        sc = {**pod_sc, **c.get("securityContext", {})}
        assert sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert isinstance(sc.get("runAsUser"), int) and sc["runAsUser"] > 0, f"{where}: runAsUser"
        res = c.get("resources", {})
        for part in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res.get(part, {})), f"{where}: resources.{part} needs cpu and memory"
        assert _quantity(res["requests"]["cpu"]) <= _quantity(res["limits"]["cpu"]), where


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_runs_train_on_the_rendered_cluster_with_the_mounted_config(overlay: str) -> None:
    job = _one(overlay, "RayJob")["spec"]
    cluster = _one(overlay, "RayCluster")
    cm = _one(overlay, "ConfigMap", CONFIG_MAP)
    assert job["entrypoint"] == ENTRYPOINT
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job and not job.get("shutdownAfterJobFinishes", False)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in _container({"template": {"spec": head}})["volumeMounts"]}
    vols = [v for v in head["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    assert len(vols) == 1, "the head pod must mount the rendered rvpo-config ConfigMap"
    mount = mounts[vols[0]["name"]]
    assert mount["mountPath"] == "/etc/rvpo" and "subPath" not in mount
    assert "config.yaml" in cm["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_judge_api_key_reaches_only_judge_pods_from_a_secret_reference_and_no_secret_is_shipped(overlay: str) -> None:
    assert not [d for d in _render(overlay) if d["kind"] == "Secret"]
    groups = _groups(_one(overlay, "RayCluster"))
    seen = []
    for name, g in groups.items():
        for e in _container(g).get("env", []):
            if e["name"] == "OPENAI_API_KEY":
                assert "value" not in e, f"{name}: the key must not be inlined"
                assert e["valueFrom"]["secretKeyRef"]["name"] == "rvpo-judge-keys"
                seen.append(name)
    assert seen == ["judge"], f"the key must reach the judge pods only, got {seen}"
    example = yaml.safe_load((KUBERAY / "base" / "judge-keys.secret.example.yaml").read_text())
    assert example["kind"] == "Secret" and example["metadata"]["name"] == "rvpo-judge-keys"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitor_selects_the_head_pods_metrics_port(overlay: str, tmp_path: Path) -> None:
    cfg = _config(overlay, tmp_path)
    pm = _one(overlay, "PodMonitor")
    groups = _groups(_one(overlay, "RayCluster"))

    def pod_labels(name: str) -> dict[str, str]:
        node_type = "head" if name == "head" else "worker"  # KubeRay adds ray.io/node-type
        return {**groups[name]["template"]["metadata"].get("labels", {}), "ray.io/node-type": node_type}

    selector = pm["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels("head").items()
    for name in groups.keys() - {"head"}:
        assert not selector.items() <= pod_labels(name).items(), f"the PodMonitor also selects {name} pods"
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    ports = {p["name"]: p["containerPort"] for p in _container(groups["head"]).get("ports", [])}
    assert ports.get(endpoint["port"]) == cfg.metrics.port
    assert cfg.metrics.enabled and cfg.metrics.host == "0.0.0.0"


def _alert_constant(record: str) -> int:
    groups = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())["groups"]
    exprs = [r["expr"] for g in groups for r in g["rules"] if r.get("record") == record]
    assert len(exprs) == 1, record
    m = re.fullmatch(r"\s*vector\((\d+)\)\s*", exprs[0])
    assert m, f"{record}: expected vector(<int>), got {exprs[0]!r}"
    return int(m.group(1))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alert_rule_constants_match_the_deployed_config(overlay: str, tmp_path: Path) -> None:
    cfg = _config(overlay, tmp_path)
    assert _alert_constant("rvpo:staleness_bound") == cfg.staleness.max_staleness
    assert _alert_constant("rvpo:buffer_capacity_groups") == cfg.buffer.capacity_groups


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_dashboard_configmap_carries_the_shipped_dashboard_for_the_grafana_sidecar(overlay: str) -> None:
    cm = _one(overlay, "ConfigMap", DASHBOARD_MAP)
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads((ROOT / "deploy" / "grafana" / "rvpo-dashboard.json").read_text())
    assert json.loads(cm["data"]["rvpo-dashboard.json"]) == shipped


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheusrule_holds_the_groups_of_alerts_yml(overlay: str) -> None:
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert _one(overlay, "PrometheusRule")["spec"]["groups"] == alerts["groups"]
