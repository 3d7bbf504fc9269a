"""Held-out evaluation without engines: the prompt split, the summary of judge results, the report."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rvpo_async.config import load_config
from rvpo_async.evaluate import load_split, split_prompts, summarise_scores
from rvpo_async.report import summarise, write_reports
from rvpo_async.types import JudgeResult

try:
    from . import reference as ref
except ImportError:  # run as a plain script directory
    import reference as ref


class FakeTokenizer:
    def apply_chat_template(self, msgs, tokenize=False, add_generation_prompt=True):
        return "<user>" + msgs[0]["content"] + "<assistant>"

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 97 for c in text]}


def test_split_is_deterministic_by_seed_disjoint_by_text_and_covers_every_prompt():
    cfg = load_config(None, ["task.eval_fraction=0.2", "task.num_prompts=200"])
    train, held = load_split(cfg, FakeTokenizer())
    train2, held2 = load_split(cfg, FakeTokenizer())
    assert [p.prompt_id for p in held] == [p.prompt_id for p in held2] and train == train2
    assert len(train) + len(held) == 200 and held and train
    # the built-in task repeats its 15 topics: a held-out text never appears among the training prompts
    assert not {p.text for p in train} & {p.text for p in held}
    assert len({p.text for p in held}) == 3  # round(0.2 * 15) distinct texts held out
    other = load_config(None, ["task.eval_fraction=0.2", "task.num_prompts=200", "run.seed=1"])
    assert {p.text for p in load_split(other, FakeTokenizer())[1]} != {p.text for p in held}


def test_without_a_split_every_prompt_trains_and_none_is_held_out():
    train, held = load_split(load_config(None, ["task.num_prompts=20"]), FakeTokenizer())
    assert len(train) == 20 and held == []


def test_an_eval_file_removes_its_texts_from_the_training_prompts(tmp_path):
    tr, ev = tmp_path / "train.jsonl", tmp_path / "eval.jsonl"
    tr.write_text("".join(json.dumps({"prompt": f"q{i}"}) + "\n" for i in range(6)))
    ev.write_text(json.dumps({"prompt": "q2"}) + "\n" + json.dumps({"prompt": "held"}) + "\n")
    cfg = load_config(None, ["task.name=file", f"task.prompts_file={tr}", f"task.eval_file={ev}"])
    train, held = load_split(cfg, FakeTokenizer())
    assert sorted(p.text for p in held) == sorted(FakeTokenizer().apply_chat_template([{"content": c}])
                                                  for c in ("q2", "held"))
    assert len(train) == 5 and not {p.text for p in train} & {p.text for p in held}


def test_split_needs_two_distinct_texts():
    cfg = load_config(None, ["task.num_prompts=3"])
    prompts = load_split(cfg, FakeTokenizer())[0]
    same = [prompts[0]] * 4
    with pytest.raises(ValueError, match="distinct prompt"):
        split_prompts(same, 0.5, 0)


def _res(v):
    return JudgeResult(value=float(v), status="ok", latency_s=0.0) if v is not None else \
        JudgeResult(value=float("nan"), status="timeout", latency_s=1.0, reason="deadline")


def test_eval_summary_matches_the_float64_reference():
    rng = np.random.default_rng(7)
    r = rng.choice([0.0, 0.3, 0.5, 1.0], size=(5, 3, 4))
    mask = rng.random((5, 3, 4)) > 0.15
    mask[:, :, 2] = False  # a judge that never answered: its mean is None, not 0
    results = [[[_res(r[i, j, k] if mask[i, j, k] else None) for k in range(4)] for j in range(3)] for i in range(5)]
    got = summarise_scores(results, ["a", "b", "c", "d"])
    want = ref.reward_diagnostics(r, mask=mask)
    assert got["reward_mean"]["c"] is None
    for k, n in enumerate("abd"):
        assert got["reward_mean"][n] == pytest.approx(want["mean"][[0, 1, 3][k]], abs=1e-12)
    assert got["worst_reward_mean"] == pytest.approx(want["worst_mean"], abs=1e-12)
    assert got["all_met_share"] == pytest.approx(want["all_met_share"], abs=1e-12)
    assert got["responses"] == 15 and got["masked_share"] == pytest.approx(1 - mask.mean())


def _rows():
    names = ["length", "keyword"]
    rows = []
    for step in range(1, 9):
        rows.append({"step": step, "policy_version": step, "reward_mean": {n: 0.1 * step for n in names},
                     "inter_variance": 0.5, "worst_reward_mean": 0.05 * step, "all_met_share": 0.0,
                     "staleness_values": [0]})
        if step % 4 == 0:
            rows.append({"kind": "eval", "step": step, "policy_version": step, "eval": {
                "reward_mean": {"length": 0.9, "keyword": 0.2 * step / 4}, "worst_reward_mean": 0.1 * step,
                "all_met_share": 0.6 if step == 4 else 0.3, "generate_s": 0.5}})
    return names, rows


def test_report_shows_first_best_and_last_evaluation_and_plots_them(tmp_path):
    names, rows = _rows()
    rep = summarise(rows, names, mode="async", aggregator="rvpo", wall_seconds=1.0, samples=8, generated_tokens=10)
    assert rep["steps"] == 8 and rep["rewards_first_step"]["length"] == pytest.approx(0.1)  # eval rows left out
    ev = rep["eval"]
    assert (ev["first"]["step"], ev["best"]["step"], ev["last"]["step"]) == (4, 4, 8)
    write_reports(tmp_path, rep, rows, names)
    md = (tmp_path / "report.md").read_text()
    assert "Held-out evaluation" in md and "| share meeting every constraint | 0.600 | 0.600 | 0.300 |" in md
    assert (tmp_path / "eval.png").stat().st_size > 0
    assert json.loads((tmp_path / "report.json").read_text())["eval"]["evaluations"] == 2
