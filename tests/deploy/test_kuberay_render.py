"""deploy/kuberay: every overlay renders, its RayCluster and RayJob validate against KubeRay's CRD schemas,
its ConfigMap holds a config that rvpo-async loads, and the RayJob runs training on that config."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from manifests import (CONFIG_MAP, CRDS, DASHBOARD_MAP, ENTRYPOINT, OVERLAYS, container, missing, one, overlay_config,
                       render)


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
    if not path.is_file():
        missing(f"KubeRay CRD not found at {path}")
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
    objs = sorted((d["kind"], d["metadata"]["name"]) for d in render(overlay))
    assert objs == sorted([("ConfigMap", CONFIG_MAP), ("ConfigMap", DASHBOARD_MAP),
                           ("PersistentVolumeClaim", "rvpo-data"), ("PodMonitor", "rvpo"),
                           ("PrometheusRule", "rvpo"), ("RayCluster", "rvpo"), ("RayJob", "rvpo-train")])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayclusters_and_rayjobs_validate_against_the_crd_schemas(overlay: str) -> None:
    ray_objs = [d for d in render(overlay) if d["apiVersion"] == "ray.io/v1"]
    assert {d["kind"] for d in ray_objs} == {"RayCluster", "RayJob"}
    for obj in ray_objs:
        errors = _schema_errors(obj)
        assert not errors, f"{overlay} {obj['kind']} {obj['metadata']['name']}:\n" + "\n".join(errors)


def test_crd_schema_check_rejects_misspelt_fields_and_wrong_types() -> None:
    cluster = one(OVERLAYS[0], "RayCluster")
    cluster["spec"]["enableInTreeAutoscalling"] = True
    cluster["spec"]["workerGroupSpecs"][0]["rayStartParams"]["num-cpus"] = 2
    errors = "\n".join(_schema_errors(cluster))
    assert "enableInTreeAutoscalling" in errors
    assert "workerGroupSpecs/0/rayStartParams/num-cpus: 2 is not of type 'string'" in errors


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_holds_a_config_that_load_config_accepts(overlay: str, tmp_path: Path) -> None:
    cfg = overlay_config(overlay, tmp_path)
    assert cfg.judges.autoscale is True
    assert cfg.judges.min_workers < cfg.judges.max_workers
    assert cfg.reward_names, "the deployed config needs judge specs"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployed_judge_specs_build_with_their_params(overlay: str, tmp_path: Path) -> None:
    from actors.judges.factory import build_judge

    for spec in overlay_config(overlay, tmp_path).judges.specs:
        judge = build_judge(spec)
        assert judge.name == spec.name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjob_runs_train_on_the_rendered_cluster_with_the_mounted_config(overlay: str) -> None:
    job = one(overlay, "RayJob")["spec"]
    cluster = one(overlay, "RayCluster")
    cm = one(overlay, "ConfigMap", CONFIG_MAP)
    assert job["entrypoint"] == ENTRYPOINT
    assert job["clusterSelector"] == {"ray.io/cluster": cluster["metadata"]["name"]}
    assert "rayClusterSpec" not in job and not job.get("shutdownAfterJobFinishes", False)
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    mounts = {m["name"]: m for m in container({"template": {"spec": head}})["volumeMounts"]}
    vols = [v for v in head["volumes"] if v.get("configMap", {}).get("name") == cm["metadata"]["name"]]
    assert len(vols) == 1, "the head pod must mount the rendered rvpo-config ConfigMap"
    mount = mounts[vols[0]["name"]]
    assert mount["mountPath"] == "/etc/rvpo" and "subPath" not in mount
    assert "config.yaml" in cm["data"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_failed_rayjob_is_retried_and_the_retry_resumes_the_same_run(overlay: str, tmp_path: Path) -> None:
    assert one(overlay, "RayJob")["spec"]["backoffLimit"] > 0
    run = overlay_config(overlay, tmp_path).run
    assert run.auto_resume and not run.overwrite and run.output_dir.startswith("/data/"), run
