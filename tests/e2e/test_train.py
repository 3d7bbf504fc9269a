"""The main job on the real stack (vLLM CPU engine, DeepSpeed on CPU, Ray, rule judges), kept small."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest

from rvpo_async.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")
SMALL = ["rollout.group_size=4", "rollout.groups_per_step=4", "rollout.max_new_tokens=12", "judges.num_workers=1",
         "metrics.enabled=false", "rollout.compile=false", "run.progress=false", "learner.micro_batch_size=16"]


def small_config(tmp: Path, model: str, *extra: str):
    return load_config(CONFIG, SMALL + [f"run.output_dir={tmp}", f"model.path={model}", *extra])


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_async_run_advances_version_bounds_staleness_and_writes_run_dir(tmp_path, tiny_model_dir, ray_local):
    from transformers import AutoModelForCausalLM

    from rvpo_async.driver import train

    run = tmp_path / "run"
    cfg = small_config(run, tiny_model_dir, "run.mode=async", "run.steps=4", "staleness.max_staleness=1",
                       "checkpoint.every=2", "algo.kl_coef=0.05", "rollout.compile=true")  # compiled, as shipped
    report = train(cfg)

    rows = rows_of(run)
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    stal = [s for r in rows for s in r["staleness_values"]]
    assert len(stal) == 4 * 4 and max(stal) <= 1 and min(stal) >= 0
    # every group trained once
    trained = [g for r in rows for g in r["group_ids"]]
    assert len(trained) == len(set(trained))

    for key in ("mode", "aggregator", "steps", "samples_per_second", "generated_tokens_per_second", "rewards",
                "staleness"):
        assert key in report, key
    assert report["mode"] == "async" and report["steps"] == 4 and report["aggregator"] == "rvpo"
    assert set(report["rewards"]) == {"length", "format", "safety", "keyword"}
    # each response's lowest reward, averaged, can be no higher than the lowest per-reward mean
    assert all(0.0 <= r["worst_reward_mean"] <= min(r["reward_mean"].values()) + 1e-9 for r in rows)
    assert 0.0 <= report["worst_reward"] <= min(report["rewards"].values()) + 1e-9
    assert report["samples_per_second"] > 0 and report["generated_tokens_per_second"] > 0
    assert report["staleness"]["max"] <= 1
    led = report["ledger"]
    assert led["trained"] == len(trained) == 16
    assert led["admitted"] == led["trained"] + sum(led["dropped"].values()) + led["in_flight"], led
    assert json.loads((run / "report.json").read_text()) == json.loads(json.dumps(report))
    kl = [r["learner"]["kl_ref"] for r in rows]  # the KL anchor: 0 while the policy is the initial model
    assert kl[0] == pytest.approx(0.0, abs=1e-7) and kl[-1] > 0
    assert "keyword" in (run / "report.md").read_text()
    for png in ("rewards.png", "inter_variance.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = AutoModelForCausalLM.from_pretrained(run / "final_model")
    assert model.config.model_type == "qwen2"
    assert (run / "checkpoints" / "latest").is_file()


def test_async_with_max_staleness_zero_trains_on_the_same_data_as_sync(tmp_path, tiny_model_dir, ray_local):
    from rvpo_async.driver import train

    digests = {}
    for mode, eta in (("sync", 0), ("async", 0)):
        run = tmp_path / mode
        train(small_config(run, tiny_model_dir, f"run.mode={mode}", "run.steps=3",
                           f"staleness.max_staleness={eta}", "checkpoint.every=0"))
        rows = rows_of(run)
        assert all(s == 0 for r in rows for s in r["staleness_values"])
        digests[mode] = [(r["group_ids"], r["batch_digest"], round(r["learner"]["loss"], 6)) for r in rows]
    assert digests["sync"] == digests["async"]


def test_resume_continues_the_policy_version(tmp_path, tiny_model_dir, ray_local):
    from rvpo_async.driver import train

    run = tmp_path / "run"
    schedule = ["algo.k_risk_schedule=linear", "algo.k_risk_start=0.5", "algo.k_risk_end=2.0", "algo.k_risk_steps=3"]
    train(small_config(run, tiny_model_dir, "run.steps=2", "checkpoint.every=1", *schedule))
    report = train(small_config(run, tiny_model_dir, "run.steps=4", "checkpoint.every=1", "run.resume=true",
                                "run.overwrite=false", *schedule))
    rows = rows_of(run)
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4]
    assert [r["k_risk"] for r in rows] == pytest.approx([0.5, 1.0, 1.5, 2.0])  # the schedule resumes with the run
    assert report["k_risk"] == {"first": pytest.approx(0.5), "final": pytest.approx(2.0)}
    assert report["policy_version"] == 4
    trained = [g for r in rows for g in r["group_ids"]]
    assert len(trained) == len(set(trained)), "a group was trained twice across the resume"
    led = report["ledger"]
    assert led["trained"] == 16
    assert led["admitted"] == led["trained"] + sum(led["dropped"].values()) + led["in_flight"], led


def _kill_rollout_when_training_started(run: Path, stop: threading.Event) -> None:
    import ray

    while not stop.is_set():
        if (run / "metrics.jsonl").is_file() and rows_of(run):
            for a in ray.util.list_named_actors():
                if a.endswith("-rollout-0"):
                    ray.kill(ray.get_actor(a), no_restart=False)
                    return
        time.sleep(0.2)


@contextlib.contextmanager
def rollout_killed_after_first_step(run: Path) -> Iterator[None]:
    """Kill engine rollout-0 (Ray restarts it if its max_restarts allows) once the run has trained a step."""
    stop = threading.Event()
    threading.Thread(target=_kill_rollout_when_training_started, args=(run, stop), daemon=True).start()
    try:
        yield
    finally:
        stop.set()


def test_dead_rollout_engine_stops_the_run_with_its_name(tmp_path, tiny_model_dir, ray_local):
    from rvpo_async.driver import train

    run = tmp_path / "run"
    cfg = small_config(run, tiny_model_dir, "run.steps=200", "rollout.max_restarts=0", "checkpoint.every=0")
    with rollout_killed_after_first_step(run), pytest.raises(RuntimeError, match="rollout-0"):
        train(cfg)
    assert len(rows_of(run)) < 200


def test_restarted_rollout_engine_catches_up_and_the_run_completes(tmp_path, tiny_model_dir, ray_local):
    from rvpo_async.driver import train

    run = tmp_path / "run"
    cfg = small_config(run, tiny_model_dir, "run.steps=5", "rollout.max_restarts=1", "checkpoint.every=0")
    with rollout_killed_after_first_step(run):
        report = train(cfg)
    rows = rows_of(run)
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5]
    assert report["staleness"]["max"] <= cfg.staleness.max_staleness


@pytest.mark.parametrize("transport, core", [("object_store", "inproc"), ("collective", "inproc"),
                                             ("collective", "process")])
def test_interrupt_mode_interrupts_responses_and_keeps_the_staleness_bound(tmp_path, tiny_model_dir, ray_local,
                                                                           transport, core):
    """rollout.weight_update=interrupt, by either weight transport and either engine core: updates land while
    responses are being generated, those are interrupted and resumed, and no trained group (staleness from its
    oldest token) exceeds the bound."""
    from rvpo_async.driver import train

    run = tmp_path / "run"
    cfg = small_config(run, tiny_model_dir, "run.steps=5", "rollout.max_new_tokens=96", "staleness.max_staleness=1",
                       "rollout.weight_update=interrupt", "checkpoint.every=0", f"learner.sync_transport={transport}",
                       "learner.master_port=24110", f"rollout.engine_core={core}")
    report = train(cfg)
    rows = rows_of(run)
    assert [r["policy_version"] for r in rows] == [1, 2, 3, 4, 5]
    assert max(s for r in rows for s in r["staleness_values"]) <= 1
    engines = report["engines"]
    assert sum(e["weight_updates"] for e in engines) >= 4  # the last one may still be loading at the report
    assert sum(e["interrupted_samples"] for e in engines) > 0 and sum(e["reprefilled_tokens"] for e in engines) > 0
