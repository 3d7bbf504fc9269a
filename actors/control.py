"""Live control of a running job: resize the judge pool without touching rollout or the learner.

Each run registers a named actor `<run_id>-control` in the Ray namespace `rvpo`. The driver reads it
about once a second; `rvpo-async scale-judges N` writes to it from any process that can reach the cluster.
"""

from __future__ import annotations

from typing import Any

import ray

from rvpo_async.config import Config
from rvpo_async.placement import actor_options

NAMESPACE = "rvpo"


class RunControl:
    def __init__(self) -> None:
        self._judge_workers: int | None = None

    def scale_judges(self, n: int) -> int:
        if n < 1:
            raise ValueError(f"judge workers must be >= 1, got {n}")
        self._judge_workers = int(n)
        return self._judge_workers

    def take_judge_workers(self) -> int | None:
        n, self._judge_workers = self._judge_workers, None
        return n


RunControlActor = ray.remote(RunControl)


def create_control(run_id: str, cfg: Config, **options: Any) -> "ray.actor.ActorHandle":
    """The run's named control actor; `options` add remote options to placement's (the driver pins it to its node)."""
    opts = actor_options("control", cfg, name=f"{run_id}-control", namespace=NAMESPACE, lifetime=None, **options)
    return RunControlActor.options(**opts).remote()


def find_controls() -> list[str]:
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == NAMESPACE and a["name"].endswith("-control"))


def scale_judges(n: int, run_id: str | None = None) -> str:
    """Ask a running job (the only one, or `run_id`) to resize its judge pool; returns the run id."""
    runs = [c[: -len("-control")] for c in find_controls()]
    if run_id is None:
        if len(runs) != 1:
            raise RuntimeError(f"{len(runs)} running jobs found ({', '.join(runs) or 'none'}); name one with --run")
        run_id = runs[0]
    elif run_id not in runs:
        raise RuntimeError(f"no running job {run_id!r}; running: {', '.join(runs) or 'none'}")
    ctl = ray.get_actor(f"{run_id}-control", namespace=NAMESPACE)
    ray.get(ctl.scale_judges.remote(n))
    return run_id
