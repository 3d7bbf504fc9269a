"""Each shipped CPU config trains a few steps on the real stack with its own judges, algorithm, learner and
engine settings. Only the run length, the batch (two groups per step, at most 16 new tokens), the output
folder and the ports change; where a config names the converted SmolLM2-135M model and it has not been
built (`rvpo-async make-model smollm2-135m`, a 538 MB conversion), the tiny model stands in for it.
tiny-cpu.yaml, tiny-cpu-rubric.yaml and tiny-cpu-rubric-rules.yaml run in test_train.py, test_rubric_run.py and
test_compare_study_run.py. tiny-cpu-frequent.yaml is tiny-cpu.yaml less one rule judge (tests/unit/test_config.py
checks that, and the long study of BENCHMARKS.md trains it for 300 steps a run), so it is not trained here. The GPU configs need
GPUs and hub models; tests/unit/test_config.py loads and validates them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ports import free_ports
from rvpo_async.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
PORTS = range(24200, 24260)  # this file's loopback ports (metrics endpoint, learner rendezvous)
SMOLLM2 = ".cache/smollm2-135m"
CONFIGS = ["smollm2-cpu.yaml", "tiny-cpu-rubric-smollm2.yaml"]


def _stand_in(cfg_path: Path, tiny: str) -> list[str]:
    """Overrides that put the tiny model where the config names a SmolLM2 model that is not built."""
    cfg = load_config(str(cfg_path))
    out = []
    if cfg.model.path == SMOLLM2 and not (ROOT / SMOLLM2 / "config.json").exists():
        out.append(f"model.path={tiny}")
    if cfg.judges.engine.model_path == SMOLLM2 and not (ROOT / SMOLLM2 / "config.json").exists():
        out.append(f"judges.engine.model_path={tiny}")
    return out


@pytest.mark.parametrize("name", CONFIGS)
def test_shipped_config_trains_two_steps(name: str, tmp_path: Path, tiny_model_dir: str, ray_local,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from rvpo_async.driver import train

    monkeypatch.chdir(ROOT)  # the configs name paths relative to the checkout (.cache/..., rvpo_async/data/...)
    path = ROOT / "configs" / name
    metrics_port, master_port = free_ports(PORTS, 2)
    run = tmp_path / "run"
    overrides = [f"run.output_dir={run}", "run.steps=2", "run.progress=false", "rollout.groups_per_step=2",
                 "rollout.max_new_tokens=16", f"metrics.port={metrics_port}",
                 f"learner.master_port={master_port}", *_stand_in(path, tiny_model_dir)]
    if load_config(str(path)).model.build_if_missing:  # the tiny model of the fixture, not a build in .cache
        overrides += [f"model.path={tiny_model_dir}", "model.build_if_missing=false"]
    cfg = load_config(str(path), overrides)
    report = train(cfg)

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert report["steps"] == 2 and [r["policy_version"] for r in rows] == [1, 2]
    assert all(len(r["group_ids"]) == cfg.rollout.groups_per_step for r in rows)
    assert rows[-1]["trained_samples_total"] == 2 * cfg.rollout.groups_per_step * cfg.rollout.group_size
    assert set(report["rewards"]) == set(cfg.reward_names)
    assert report["staleness"]["max"] <= cfg.staleness.max_staleness
