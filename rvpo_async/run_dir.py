"""A run's directory: a fresh run refuses to mix with an old one's files, and run.auto_resume decides whether
a (re)started driver continues the run in output_dir or starts afresh."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from rvpo_async.config import Config

log = logging.getLogger("rvpo_async")


def prepare_run_dir(cfg: Config) -> Path:
    """A fresh run refuses to mix with a previous run's files unless run.overwrite says so."""
    run_dir = Path(cfg.run.output_dir)
    leftovers = [n for n in ("checkpoints", "buffer", "metrics.jsonl") if (run_dir / n).exists()]
    if leftovers and not cfg.run.resume:
        if not cfg.run.overwrite:
            raise FileExistsError(f"run.output_dir {run_dir} already holds a run ({', '.join(leftovers)}); "
                                  f"continue it with --resume, or set run.overwrite=true to replace it")
        for n in leftovers + ["final_model", "tracking", "eval.png"]:  # tracker files would mix two runs
            target = run_dir / n
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# keys that may differ between a run and its continuation
_RESUMABLE_CHANGES = {"run.steps", "run.resume", "run.overwrite", "run.auto_resume", "run.progress"}


def resolve_auto_resume(cfg: Config) -> Config:
    """run.auto_resume: continue the run in output_dir when it holds a checkpoint of the same config (a retried
    driver resumes its own run), or start afresh, replacing what a run that never checkpointed left behind."""
    if not cfg.run.auto_resume:
        return cfg
    from learner.checkpoint import find_latest
    from rvpo_async.config import load_config

    run_dir = Path(cfg.run.output_dir)
    if find_latest(str(run_dir / "checkpoints")) is None:
        log.info("run.auto_resume: no checkpoint under %s, starting a fresh run", run_dir)
        return cfg.override("run.auto_resume=false", "run.overwrite=true")
    now = _flat(cfg.to_dict())
    before = _flat(load_config(run_dir / "config.yaml").to_dict()) if (run_dir / "config.yaml").is_file() else {}
    differ = sorted(k for k in now.keys() | before.keys() if k not in _RESUMABLE_CHANGES and now.get(k) != before.get(k))
    if differ:
        raise ValueError(f"run.auto_resume: {run_dir} holds a checkpoint of a different config (keys that differ: "
                         f"{', '.join(differ[:8])}); use another run.output_dir or run.overwrite=true")
    log.info("run.auto_resume: resuming the run in %s", run_dir)
    return cfg.override("run.auto_resume=false", "run.resume=true", "run.overwrite=false")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the config sections (mappings that are values, like resources, stay whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and (not prefix or k == "engine"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
