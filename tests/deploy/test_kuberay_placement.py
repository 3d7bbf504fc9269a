"""deploy/kuberay: each overlay's worker groups hold the actors its rvpo-async config places there, with
the Ray custom resources, replica counts, CPUs and GPUs those actors request."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from manifests import (ACTOR_GROUP, OVERLAYS, container, groups_by_name, one, overlay_config, quantity,
                       ray_resources)

from rvpo_async.placement import requested_resources


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_actor_kinds_custom_resource_is_provided_only_by_its_worker_group(overlay: str,
                                                                               tmp_path: Path) -> None:
    cfg = overlay_config(overlay, tmp_path)
    groups = groups_by_name(one(overlay, "RayCluster"))
    provided = {name: ray_resources(g) for name, g in groups.items()}
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
    cluster = one(overlay, "RayCluster")
    judge = groups_by_name(cluster)["judge"]
    assert judge["minReplicas"] <= judge["replicas"] <= judge["maxReplicas"]
    assert judge["minReplicas"] < judge["maxReplicas"], "the judge group must be able to scale"
    assert cluster["spec"]["enableInTreeAutoscaling"] is True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_fixed_groups_are_pinned_so_the_autoscaler_leaves_them_alone(overlay: str) -> None:
    groups = groups_by_name(one(overlay, "RayCluster"))
    for name in ("rollout", "learner"):
        g = groups[name]
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_worker_group_replicas_hold_the_configured_actor_counts(overlay: str, tmp_path: Path) -> None:
    cfg = overlay_config(overlay, tmp_path)
    groups = groups_by_name(one(overlay, "RayCluster"))
    req = requested_resources(cfg)

    def per_pod(kind: str) -> int:
        (res, amount), = req[kind].items()
        return math.floor(ray_resources(groups[ACTOR_GROUP[kind]])[res] / amount)

    assert groups["rollout"]["replicas"] * per_pod("rollout") >= cfg.rollout.num_engines
    assert groups["learner"]["replicas"] * per_pod("learner") >= cfg.learner.num_ranks
    judge = groups["judge"]
    assert judge["minReplicas"] * per_pod("judge") >= cfg.judges.min_workers
    assert judge["maxReplicas"] * per_pod("judge") >= cfg.judges.max_workers
    # no judge pod beyond what max_workers can use
    assert (judge["maxReplicas"] - 1) * per_pod("judge") < cfg.judges.max_workers


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_have_the_cpus_and_gpus_their_actors_request(overlay: str, tmp_path: Path) -> None:
    cfg = overlay_config(overlay, tmp_path)
    groups = groups_by_name(one(overlay, "RayCluster"))
    req = requested_resources(cfg)
    need = {"rollout": (cfg.rollout.num_cpus, cfg.rollout.num_gpus),
            "learner": (cfg.learner.num_cpus, cfg.learner.num_gpus),
            "judge": (cfg.judges.num_cpus, 0.0)}
    for kind, (cpus, gpus) in need.items():
        g = groups[ACTOR_GROUP[kind]]
        (res, amount), = req[kind].items()
        actors = math.floor(ray_resources(g)[res] / amount)
        limits = container(g)["resources"]["limits"]
        assert quantity(limits["cpu"]) >= actors * cpus, f"{kind}: {actors} actors x {cpus} CPUs"
        pod_gpus = quantity(limits.get("nvidia.com/gpu", 0))
        assert pod_gpus >= actors * gpus, f"{kind}: {actors} actors x {gpus} GPUs, pod has {pod_gpus}"
        if gpus == 0:
            assert pod_gpus == 0, f"{kind} actors use no GPU, but the pod asks for {pod_gpus}"
    assert "nvidia.com/gpu" not in container(groups["head"])["resources"]["limits"]


def test_gpu_overlay_puts_rollout_and_learner_on_gpus(tmp_path: Path) -> None:
    cfg = overlay_config("gpu", tmp_path)
    assert cfg.rollout.num_gpus >= 1 and cfg.learner.num_gpus >= 1
    groups = groups_by_name(one("gpu", "RayCluster"))
    for name in ("rollout", "learner"):
        res = container(groups[name])["resources"]
        assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
        assert any(t.get("key") == "nvidia.com/gpu" for t in groups[name]["template"]["spec"]["tolerations"])
    env = {e["name"]: e.get("value") for e in container(groups["learner"])["env"]}
    assert env["DS_ACCELERATOR"] == "cuda"
    assert one("gpu", "RayJob")["spec"]["submitterPodTemplate"]["spec"]["containers"][0]["image"].endswith("-cuda")
