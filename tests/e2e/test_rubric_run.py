"""The rubric workload on the real stack: `train` on configs/tiny-cpu-rubric.yaml (vLLM rollout engine, the
vLLM judge engine grading every criterion, DeepSpeed on CPU, Ray), kept small; and, on the judge data path
with the real judge engine, a criterion past its deadline masks its slot only."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest
import ray

from ports import free_ports
from rvpo_async.config import JudgesConfig, JudgeSpec, load_config
from rvpo_async.rubric import from_meta
from rvpo_async.types import STATUS_CODES, Prompt, RolloutGroup, Sample

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny-cpu-rubric.yaml")
PORTS = range(22240, 22260)  # this file's loopback ports (metrics endpoint, learner rendezvous)


def test_train_on_the_rubric_config_grades_every_criterion_and_masks_absent_slots(tmp_path, tiny_model_dir,
                                                                                  ray_local):
    from rvpo_async.driver import train
    from rvpo_async.task import file_rows

    metrics_port, master_port = free_ports(PORTS, 2)
    run = tmp_path / "run"
    cfg = load_config(CONFIG, [f"run.output_dir={run}", f"model.path={tiny_model_dir}", "run.steps=2",
                               "rollout.group_size=4", "rollout.groups_per_step=2", "rollout.max_new_tokens=12",
                               "judges.num_workers=1", "run.progress=false", "checkpoint.every=0",
                               f"metrics.port={metrics_port}", f"learner.master_port={master_port}"])
    report = train(cfg)
    assert report["steps"] == 2

    criteria = {r["id"]: len(r["meta"]["rubric"]) for r in file_rows(cfg, str(cfg.task.prompts_file))}
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    groups = [g for r in rows for g in r["rubric_groups"]]
    assert len(groups) == 2 * 2
    for g in groups:
        # the buffer's masks: exactly the prompt's criteria are graded, every other rubric slot is 'absent'
        assert g["criteria"] == criteria[g["prompt_id"]]
        assert g["present"] == [g["criteria"]] * 4, g
        assert g["masked"] == {}, g  # the real judge engine graded every criterion in time
    for r in rows:
        assert 0.0 <= r["rubric_met_ratio"] <= 1.0 and 0.0 <= r["rubric_worst_mean"] <= 1.0
        assert "pitfall_rate" in r and set(r["reward_mean"]) == set(cfg.reward_names)
        assert r["rubric_criteria"] == [g["criteria"] for g in r["rubric_groups"]]


def test_a_judge_timeout_on_one_criterion_masks_that_slot_only(tiny_model_dir, ray_local):
    from actors.buffer import BufferActor
    from actors.judges.pool import JudgePool, create_judge_engines
    from judge_fakes import SlowCriterionProxy
    from rvpo_async.buffer import to_torch

    specs = [JudgeSpec("length", "length", params={"max_chars": 40}),
             JudgeSpec("rubric", "rubric", params={"max_items": 5}, timeout_s=15.0)]
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "judges.num_workers=1", "judges.max_retries=0",
                             "rollout.group_size=3"])
    cfg = dataclasses.replace(cfg, judges=dataclasses.replace(cfg.judges, specs=specs, concurrency=4))
    names, g = cfg.reward_names, 3
    assert len(names) == 6
    engines = create_judge_engines(cfg, tiny_model_dir)
    proxy = SlowCriterionProxy.remote(engines["default"], "HELD BACK", 60.0)
    pool = JudgePool(cfg, {"default": proxy})
    buffer = BufferActor.options(max_concurrency=16).remote(names, g, 8, 4)
    rubric = [{"criterion": "The response greets the reader.", "points": 1.0},
              {"criterion": "HELD BACK: the response mentions tea.", "points": 2.0},
              {"criterion": "The response is rude.", "points": -3.0}]
    prompt = Prompt("p-slow", "<|im_start|>user\nGreet me.<|im_end|>\n<|im_start|>assistant\n", (1, 2),
                    {"rubric": rubric})
    group = RolloutGroup(0, prompt, tuple(Sample((5, 6), (-0.1, -0.2), "stop", t) for t in
                                          ("Hello there!", "Have some tea.", "Go away.")), 0, "test", time.time())
    try:
        ray.get(buffer.put_group.remote(group))
        t0 = time.monotonic()
        pool.submit(group)
        entries: list[Any] = []
        while len(entries) < g * len(names) and time.monotonic() - t0 < 120:
            got = pool.poll(0.5)
            entries += got
            if got:
                ray.get(buffer.set_rewards.remote(got))
        assert len(entries) == g * len(names)
        assert time.monotonic() - t0 < 60  # the held-back criterion did not hold up the rest
        batch = to_torch(ray.get(buffer.pull.remote(1, 0)), 0)
        status = batch["reward_status"][0].numpy()  # [G, K]
        S = STATUS_CODES
        for i in range(g):
            assert list(status[i]) == [S["ok"], S["ok"], S["timeout"], S["ok"], S["absent"], S["absent"]], status[i]
        mask = batch["reward_mask"][0].numpy()
        assert mask[:, [0, 1, 3]].all() and not mask[:, [2, 4, 5]].any()
        rewards = batch["rewards"][0].numpy()
        assert ((rewards[:, [1, 3]] >= 0) & (rewards[:, [1, 3]] <= 1)).all()
        assert len(from_meta(prompt.meta)) == 3
        stats = pool.stats()
        assert sum(stats["failures"].get("timeout", {}).values()) == g  # absent slots are no failures
    finally:
        pool.shutdown()
        for h in [proxy, buffer, *engines.values()]:
            ray.kill(h)
