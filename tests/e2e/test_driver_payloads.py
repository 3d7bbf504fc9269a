"""The driver handles counts, versions and control: in async mode no sample payload (tokens, log-probs, texts,
rewards, the training batch) reaches it. Every object the driver process gets from Ray is recorded."""

from __future__ import annotations

import dataclasses
import pickle
from typing import Any

import numpy as np
import pytest
import ray

from rvpo_async.config import load_config

pytestmark = pytest.mark.slow

PAYLOAD_TYPES = ("RolloutGroup", "Sample", "Table", "RecordBatch", "JudgeResult")
SMALL = 64  # a statistic per reward (K values) is no payload; a row per sample or token is


def _payloads(obj: Any, depth: int = 0) -> list[str]:
    """Names of payload types found in `obj`, looking into containers."""
    name = type(obj).__name__
    if name in PAYLOAD_TYPES or (isinstance(obj, np.ndarray) and obj.size > SMALL):
        return [name]
    if name == "Tensor":
        return [name] if obj.numel() > SMALL else []
    if depth > 6:
        return []
    if isinstance(obj, dict):
        return [n for v in obj.values() for n in _payloads(v, depth + 1)]
    if isinstance(obj, (list, tuple, set)):
        return [n for v in obj for n in _payloads(v, depth + 1)]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return [n for f in dataclasses.fields(obj) for n in _payloads(getattr(obj, f.name), depth + 1)]
    return []


def test_async_driver_never_receives_sample_payloads(tmp_path, tiny_model_dir, ray_local, monkeypatch):
    from rvpo_async.driver import train

    cfg = load_config("configs/tiny-cpu.yaml", overrides=[
        f"model.path={tiny_model_dir}", "model.build_if_missing=false", f"run.output_dir={tmp_path / 'run'}",
        "run.steps=4", "run.progress=false", "metrics.enabled=false", "rollout.compile=false", "checkpoint.every=0",
        "rollout.groups_per_step=4", "rollout.group_size=4"])
    got: list[tuple[int, list[str]]] = []
    recording = {"on": False}
    real_get = ray.get

    def recording_get(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        if recording["on"]:
            for o in (out if isinstance(refs, list) else [out]):
                got.append((len(pickle.dumps(o)), _payloads(o)))
        return out

    monkeypatch.setattr(ray, "get", recording_get)

    def start_recording(_pipeline) -> None:  # once every actor is built: from here on the loops run
        recording["on"] = True

    report = train(cfg, on_pipeline=start_recording)
    assert report["steps"] == 4
    found = sorted({n for _, names in got for n in names})
    assert found == [], f"the driver received payloads: {found}"
    total = sum(b for b, _ in got)
    samples = 4 * 4 * 4
    # counts, ids, versions and statistics only: a few hundred bytes per trained sample at most (one sample's
    # tokens and log-probs alone are ~400 bytes pickled, its text more)
    assert total / samples < 2000, (total, len(got))
