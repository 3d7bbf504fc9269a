"""Ray remote options for every actor kind, applied in one place.

Each kind's CPUs, GPUs and custom resources come from its config section. The custom resources are the
ones the KubeRay worker groups declare in `rayStartParams` (deploy/kuberay), so an actor lands only on
its own group; tests/deploy checks that both sides name the same resources.

GPUs: each kind's `num_gpus` goes to Ray as given. A fraction lets Ray pack several actors onto one GPU;
the config loader has already checked that no vLLM engine's memory share exceeds its fraction
(rvpo_async.gpu_share), and `gpu_plan` shows the packing Ray's fractions allow.
"""

from __future__ import annotations

from typing import Any, Literal

from rvpo_async.config import Config

ActorKind = Literal["rollout", "judge", "judge_engine", "learner", "buffer", "judge_service", "control"]


def actor_options(kind: ActorKind, cfg: Config, **extra: Any) -> dict[str, Any]:
    """Options for `ActorClass.options(**actor_options(kind, cfg))`."""
    if kind == "rollout":
        opts: dict[str, Any] = dict(num_cpus=cfg.rollout.num_cpus, num_gpus=cfg.rollout.num_gpus,
                                    resources=dict(cfg.rollout.resources), max_restarts=cfg.rollout.max_restarts)
    elif kind == "judge":
        opts = dict(num_cpus=cfg.judges.num_cpus, resources=dict(cfg.judges.resources), max_restarts=0)
    elif kind == "judge_engine":
        e = cfg.judges.engine
        opts = dict(num_cpus=cfg.judges.num_cpus if e.num_cpus is None else e.num_cpus, num_gpus=e.num_gpus,
                    resources=dict(cfg.judges.resources if e.resources is None else e.resources),
                    # a dead judge engine is started again and the grading calls it held are sent again
                    max_restarts=e.max_restarts, max_task_retries=1 if e.max_restarts else 0)
    elif kind == "learner":
        opts = dict(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus,
                    resources=dict(cfg.learner.resources), max_restarts=0)
    elif kind in ("buffer", "judge_service", "control"):
        # bookkeeping on the driver's node (the pipeline pins them there): no resources, not restarted
        opts = dict(num_cpus=0, max_restarts=0)
    else:
        raise ValueError(f"unknown actor kind {kind!r}")
    if not opts.get("resources"):
        opts.pop("resources", None)
    opts.update(extra)
    return opts


def gpu_plan(cfg: Config, num_gpus: int | None = None) -> list[list[Any]]:
    """The GPU-holding actors packed by their fractions (first fit, largest first), one list per GPU;
    ValueError naming the keys when more than `num_gpus` GPUs would be needed."""
    from rvpo_async.gpu_share import gpu_shares, pack_gpus

    return pack_gpus(gpu_shares(cfg), num_gpus)


def requested_resources(cfg: Config) -> dict[str, dict[str, float]]:
    """The custom resources each actor kind requests: what a cluster's node groups must provide."""
    return {
        "rollout": dict(cfg.rollout.resources),
        "judge": dict(cfg.judges.resources),
        "learner": dict(cfg.learner.resources),
    }
