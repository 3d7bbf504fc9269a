"""Experiment trackers: TensorBoard, Weights & Biases, MLflow (`tracking.backends`, any subset).

Every row written to metrics.jsonl goes to every started backend, each numeric leaf under its path in
the row joined with '/' (`reward_mean/keyword`, `learner/loss`, `eval/all_met_share`), at the row's
`step`. A backend whose package is missing or that fails to start is a warning and is left out; one that
fails while logging is a warning and is dropped: a tracker never fails a run. W&B runs offline unless
WANDB_API_KEY is set (or WANDB_MODE says otherwise).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping

log = logging.getLogger("rvpo_async")

NOT_SCALARS = ("step", "time")  # the x axis, and a wall-clock timestamp


def flatten_scalars(row: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric leaves of a (nested) metrics row, named by their path joined with '/'. Lists, strings,
    booleans, None and non-finite numbers are left out."""
    out: dict[str, float] = {}
    for k, v in row.items():
        name = f"{prefix}{k}"
        if not prefix and k in NOT_SCALARS:
            continue
        if isinstance(v, Mapping):
            out.update(flatten_scalars(v, name + "/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[name] = float(v)
    return out


class _TensorBoard:
    def __init__(self, cfg: Any, run_dir: Path, tdir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.w = SummaryWriter(log_dir=str(tdir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.w.add_scalar(k, v, global_step=step)
        self.w.flush()

    def close(self) -> None:
        self.w.close()


class _WandB:
    def __init__(self, cfg: Any, run_dir: Path, tdir: Path) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        tdir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=cfg.tracking.project, name=cfg.tracking.run_name or run_dir.name,
                              dir=str(tdir), mode=mode, config=cfg.to_dict(), reinit="create_new")

    def log(self, scalars: dict[str, float], step: int) -> None:
        # metrics.jsonl interleaves eval rows of earlier steps with training rows: W&B's own step must only
        # grow, so the run's step travels as a metric and is each chart's x axis
        self.run.log({**scalars, "step": step})

    def close(self) -> None:
        self.run.finish()


class _MLflow:
    def __init__(self, cfg: Any, run_dir: Path, tdir: Path) -> None:
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            # no server configured: a local file store in the run directory (mlflow-skinny has no database
            # backend, and MLflow 3 refuses a file store unless allowed)
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((tdir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(cfg.tracking.project)
        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=cfg.tracking.run_name or run_dir.name)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


BACKENDS: dict[str, Callable[..., Any]] = {"tensorboard": _TensorBoard, "wandb": _WandB, "mlflow": _MLflow}
EXTRA = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}  # pyproject extras


class Trackers:
    """The started backends; `log` and `close` never raise."""

    def __init__(self, backends: dict[str, Any]) -> None:
        self.backends = dict(backends)

    def log(self, row: Mapping[str, Any]) -> None:
        if not self.backends or "step" not in row:
            return
        scalars = flatten_scalars(row)
        for name, b in list(self.backends.items()):
            try:
                b.log(scalars, int(row["step"]))
            except Exception as e:  # a tracker must never stop the run
                log.warning("tracker %s failed while logging (%s: %s); it is dropped for the rest of the run",
                            name, type(e).__name__, e)
                self.backends.pop(name, None)

    def close(self) -> None:
        for name, b in list(self.backends.items()):
            try:
                b.close()
            except Exception as e:
                log.warning("tracker %s failed to close: %s: %s", name, type(e).__name__, e)
        self.backends = {}


def start_trackers(cfg: Any, run_dir: Path) -> Trackers:
    tdir = Path(cfg.tracking.dir) if cfg.tracking.dir else run_dir / "tracking"
    started = {}
    for name in cfg.tracking.backends:
        try:
            started[name] = BACKENDS[name](cfg, run_dir, tdir)
            log.info("tracker %s started (%s)", name, tdir)
        except ImportError as e:
            log.warning("tracking.backends: %s is not installed (%s); install the extra: pip install "
                        "'rvpo-async[%s]'. The run continues without it.", name, e, EXTRA[name])
        except Exception as e:
            log.warning("tracking.backends: %s failed to start (%s: %s); the run continues without it.",
                        name, type(e).__name__, e)
    return Trackers(started)
