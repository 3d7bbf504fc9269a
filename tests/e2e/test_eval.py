"""Held-out evaluation on the real stack: a 12-step run of the embedded default evaluating every 4 steps,
TensorBoard fed the same scalars as metrics.jsonl, and `rvpo-async eval` comparing the trained model with
the initial one. One short training run serves both tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rvpo_async.config import load_config
from rvpo_async.tracking import flatten_scalars

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")
SMALL = ["rollout.group_size=4", "rollout.groups_per_step=2", "rollout.max_new_tokens=12", "judges.num_workers=1",
         "metrics.enabled=false", "run.progress=false", "learner.micro_batch_size=16", "learner.master_port=21291",
         "rollout.compile=false", "checkpoint.every=0", "task.eval_fraction=0.2", "eval.num_prompts=8",
         "eval.samples_per_prompt=2", "eval.temperature=1.0"]


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory, tiny_model_dir):
    import ray

    from rvpo_async.driver import train

    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    run = tmp_path_factory.mktemp("eval-run")
    cfg = load_config(CONFIG, SMALL + [f"run.output_dir={run}", f"model.path={tiny_model_dir}", "run.steps=12",
                                       "eval.every=4", "tracking.backends=[tensorboard]"])
    report = train(cfg)
    return run, report


def test_twelve_step_run_evaluates_at_4_8_12_and_reports_and_plots_it(eval_run):
    run, report = eval_run
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    ev = [r for r in rows if r.get("kind") == "eval"]
    steps = [r for r in rows if r.get("kind") != "eval"]
    assert [r["step"] for r in ev] == [4, 8, 12] and len(steps) == 12
    for r in ev:
        e = r["eval"]
        assert set(e["reward_mean"]) == {"length", "format", "safety", "keyword"}
        assert e["responses"] == 16 and 0 <= e["all_met_share"] <= 1
        assert e["worst_reward_mean"] <= min(v for v in e["reward_mean"].values() if v is not None) + 1e-9
        assert r["policy_version"] >= r["step"]  # generated with the weights of that step or later
    assert all(0 <= r["all_met_share"] <= 1 for r in steps)  # the step rows carry it at the top level too
    assert report["steps"] == 12
    assert (report["eval"]["first"]["step"], report["eval"]["last"]["step"]) == (4, 12)
    assert report["eval"]["best"]["step"] in (4, 8, 12)
    assert "Held-out evaluation" in (run / "report.md").read_text()
    assert (run / "eval.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_tensorboard_events_hold_the_same_scalars_as_metrics_jsonl(eval_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = eval_run
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(run / "tracking" / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    want: dict[str, dict[int, float]] = {}
    for r in rows:
        for k, v in flatten_scalars(r).items():
            want.setdefault(k, {})[r["step"]] = v
    assert set(got) == set(want)
    assert "eval/all_met_share" in got and "learner/loss" in got and "reward_mean/keyword" in got
    for tag, by_step in want.items():
        assert got[tag] == pytest.approx(by_step, rel=1e-6), tag  # TensorBoard stores float32


def test_eval_command_prints_the_trained_and_initial_model_and_their_difference(eval_run, tiny_model_dir, capsys,
                                                                                tmp_path):
    from rvpo_async.cli import main

    run, _ = eval_run
    out = tmp_path / "eval.json"
    rc = main(["eval", "--model", str(run / "final_model"), "--config", CONFIG, "--baseline", tiny_model_dir,
               "--out", str(out), *SMALL, f"model.path={tiny_model_dir}"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "baseline" in text and "difference" in text and "share meeting every constraint" in text
    res = json.loads(out.read_text())
    m, b, d = res["model"], res["baseline"], res["difference"]
    assert m["prompt_set"] == "held-out" and m["prompts"] == 8 and m["responses"] == 16
    for n in ("length", "format", "safety", "keyword"):
        if m["reward_mean"][n] is not None and b["reward_mean"][n] is not None:
            assert d["reward_mean"][n] == pytest.approx(m["reward_mean"][n] - b["reward_mean"][n])
    assert d["all_met_share"] == pytest.approx(m["all_met_share"] - b["all_met_share"])
