"""The rubric judge and its slots, without Ray: slot names in the config, grading every criterion with a
deadline each (a fake judge tier returning futures), pitfall inversion, absent slots masked, the judge worker
combining rule judges with the rubric judge, weight rows, and the batch statistics against a float64 loop."""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from actors.judges.worker import SampleScorer
from actors.judges.factory import Params, SlotJudge
from actors.judges.rubric import RubricJudge, build_rubric_judge
from rvpo_async.config import ConfigError, JudgeSpec, load_config
from rvpo_async.rubric import META_KEY, parse_rubric, points_matrix, rubric_stats
from rvpo_async.rubric_view import RubricView
from rvpo_async.types import Prompt

RUBRIC = [{"criterion": "Says hello", "points": 2}, {"criterion": "Is rude", "points": -5},
          {"criterion": "SLOW criterion", "points": 1}]
PROMPT = Prompt("p0", "<|im_start|>user\nGreet me.<|im_end|>\n", (1,), {"rubric": [
    {"criterion": c["criterion"], "points": float(c["points"])} for c in RUBRIC]})


class FakeTier:
    """Grades a question 0.75, NaN when it holds 'NAN', raises on 'BOOM', and sleeps on 'SLOW'."""

    def __init__(self, sleep_s: float = 5.0):
        self.pool = ThreadPoolExecutor(8)
        self.sleep_s = sleep_s
        self.calls: list[list[str]] = []

    def grade(self, q: str) -> float:
        if "SLOW" in q:
            time.sleep(self.sleep_s)
        if "BOOM" in q:
            raise RuntimeError("judge model crashed")
        return math.nan if "NAN" in q else 0.75

    def __call__(self, questions: list[str], mode: str) -> list[Future[float]]:
        self.calls.append(list(questions))
        return [self.pool.submit(self.grade, q) for q in questions]


def test_rubric_slots_extend_the_reward_names_after_the_rule_judges():
    cfg = load_config(None, ["judges.specs=[{name: fmt, kind: regex, weight: 2.0, params: {pattern: x}}, "
                             "{name: rubric, kind: rubric, params: {max_items: 4}}]"])
    assert cfg.reward_names == ["fmt", "rubric/00", "rubric/01", "rubric/02", "rubric/03"]
    assert cfg.reward_weights == [2.0, 1.0, 1.0, 1.0, 1.0]
    assert cfg.reward_judges == ["fmt"] + ["rubric"] * 4
    with pytest.raises(ConfigError, match=r"judges.specs': allows one judge of kind 'rubric', listed last"):
        load_config(None, ["judges.specs=[{name: r, kind: rubric}, {name: f, kind: regex, params: {pattern: x}}]"])
    with pytest.raises(ConfigError, match=r"judges.specs\[0\].params.max_items': must be an integer in \[1, 99\]"):
        load_config(None, ["judges.specs=[{name: r, kind: rubric, params: {max_items: 0}}]"])
    with pytest.raises(ConfigError, match=r"judges.specs\[0\].params.overflow': must be 'error' or 'drop'"):
        load_config(None, ["judges.specs=[{name: r, kind: rubric, params: {overflow: skip}}]"])


def test_every_criterion_is_one_request_and_pitfalls_score_one_minus_p():
    tier = FakeTier()
    judge = RubricJudge("rubric", 5, "yesno", tier, timeout_s=1.0)
    prompt = Prompt("p", "t", (1,), {"rubric": PROMPT.meta["rubric"][:2]})
    out = judge.score_all(prompt, "hello")
    assert len(tier.calls) == 1 and len(tier.calls[0]) == 2  # both criteria sent together
    assert "Says hello" in tier.calls[0][0] and "Is rude" in tier.calls[0][1]
    assert [r.status for r in out] == ["ok", "ok", "absent", "absent", "absent"]
    assert out[0].value == 0.75 and out[1].value == pytest.approx(0.25)  # the pitfall: 1 - 0.75
    assert all(math.isnan(r.value) for r in out[2:])


def test_a_criterion_past_its_deadline_masks_only_its_slot():
    judge = RubricJudge("rubric", 4, "yesno", FakeTier(sleep_s=3.0), timeout_s=0.5)
    t0 = time.perf_counter()
    out = judge.score_all(PROMPT, "hello")
    assert time.perf_counter() - t0 < 2.5
    assert [r.status for r in out] == ["ok", "ok", "timeout", "absent"]
    assert "criterion 2" in out[2].reason and "0.5s" in out[2].reason


def test_unparseable_and_failed_grades_mask_their_slot_by_reason():
    prompt = Prompt("p", "t", (1,), {"rubric": [{"criterion": "NAN grade", "points": 1.0},
                                                {"criterion": "BOOM", "points": 1.0},
                                                {"criterion": "fine", "points": 1.0}]})
    out = RubricJudge("rubric", 3, "grade", FakeTier(), timeout_s=2.0).score_all(prompt, "x")
    assert [r.status for r in out] == ["invalid", "error", "ok"]
    assert "judge model crashed" in out[1].reason


def test_judge_worker_puts_rule_slots_first_then_the_rubric_slots():
    tier = FakeTier(sleep_s=3.0)

    def build_fake(spec: JudgeSpec, deps: Any) -> RubricJudge:
        return RubricJudge(spec.name, int(spec.params["max_items"]), "yesno", tier, timeout_s=0.5)

    specs = [JudgeSpec("fmt", "regex", params={"pattern": "hello"}),
             JudgeSpec("rub", "fake_rubric", params={"max_items": 4})]  # type: ignore[arg-type]
    scorer = SampleScorer(specs, extra_builders={"fake_rubric": build_fake})
    assert scorer.ready() == 5 and isinstance(scorer.judges[1], SlotJudge)
    out = scorer.score_sample(PROMPT, "hello there")
    assert [r.status for r in out] == ["ok", "ok", "ok", "timeout", "absent"]
    assert out[0].value == 1.0 and out[2].value == pytest.approx(0.25)


def test_a_slot_judge_that_raises_masks_all_its_slots_as_errors():
    class Broken:
        name, slots = "rub", 3

        def score_all(self, prompt: Prompt, text: str) -> list:
            raise RuntimeError("no rubric service")

    scorer = SampleScorer([JudgeSpec("rub", "broken", params={})],  # type: ignore[arg-type]
                          extra_builders={"broken": lambda spec, deps: Broken()})
    out = scorer.score_sample(PROMPT, "x")
    assert [r.status for r in out] == ["error"] * 3 and "no rubric service" in out[0].reason


def test_rubric_judge_params_are_checked():
    spec = JudgeSpec("r", "rubric", params={"mode": "likert"})
    with pytest.raises(ValueError, match="param 'mode' must be one of 'yesno', 'grade'"):
        build_rubric_judge(spec, {"engine_handles": {"default": object()}})
    with pytest.raises(ValueError, match="param 'engine' names no judge engine: 'default'"):
        build_rubric_judge(JudgeSpec("r", "rubric"), {})
    http = build_rubric_judge(JudgeSpec("r", "rubric", params={"base_url": "http://127.0.0.1:1/v1", "model": "m",
                                                                "max_items": 3}), {})
    assert http.slots == 3 and isinstance(Params, type)


def test_overflow_is_an_error_naming_the_prompt_or_drops_and_counts():
    items = [f"c{i}" for i in range(5)]
    with pytest.raises(ValueError, match="has 5 criteria, more than max_items=4"):
        parse_rubric(items, max_items=4)
    crit, dropped = parse_rubric(items, max_items=4, overflow="drop")
    assert len(crit) == 4 and dropped == 1


def test_weight_rows_give_rule_weights_and_per_prompt_points():
    crit = [parse_rubric(c)[0] for c in ([{"criterion": "a", "points": 3}, {"criterion": "b", "points": -2}], ["x"])]
    points = points_matrix(crit, 3)
    np.testing.assert_array_equal(points, [[3, -2, 0], [1, 0, 0]])
    specs = ("judges.specs=[{name: fmt, kind: regex, weight: 2.0, params: {pattern: '.'}}, "
             "{name: rubric, kind: rubric, weight: 0.5, params: {engine: default, max_items: 3}}]")
    prompts = [Prompt(f"q{i}", "t", (1,), {META_KEY: [{"criterion": c.text, "points": c.points} for c in cs]})
               for i, cs in enumerate(crit)]
    for mode, want in (("points", [[2, 0.5 * 2 * 3 / 5, 0.5 * 2 * 2 / 5, 0], [2, 0.5, 0, 0]]),
                       ("uniform", [[2, 0.5, 0.5], [2, 0.5]])):
        cfg = load_config(None, [specs, f"algo.rubric_weights={mode}"])
        view = RubricView(cfg, prompts)
        got = view.weights(["q0", "q1"])
        if mode == "points":  # per-prompt rows: the prompt's points share M x the rubric weight
            np.testing.assert_allclose(got.numpy(), want)
        else:  # uniform: the config's [K] weights; absent slots are masked, not weighted
            assert list(got) == [2.0, 0.5, 0.5, 0.5]


def _stats_reference(scores, valid, pitfall):
    met = n = pit = hit = 0
    worst = []
    for b in range(scores.shape[0]):
        for g in range(scores.shape[1]):
            vals = []
            for j in range(scores.shape[2]):
                if not valid[b, g, j]:
                    continue
                s = float(scores[b, g, j])
                vals.append(s)
                n += 1
                met += s >= 0.5
                if pitfall[b, j]:
                    pit += 1
                    hit += s < 0.5
            if vals:
                worst.append(min(vals))
    return met / n, sum(worst) / len(worst), hit / pit


def test_rubric_stats_match_a_float64_loop_with_a_3_and_a_17_criterion_prompt():
    rng = np.random.default_rng(0)
    scores = rng.random((2, 4, 17))
    valid = np.zeros((2, 4, 17), dtype=bool)
    valid[0, :, :3] = True
    valid[1] = True
    valid[1, 2, :] = False  # every criterion of one response masked: it drops out of worst_mean
    valid[0, 1, 1] = False  # one timeout
    pitfall = np.zeros((2, 17), dtype=bool)
    pitfall[0, 2] = pitfall[1, [4, 9]] = True
    got = rubric_stats(scores, valid, pitfall)
    ref = _stats_reference(scores, valid, pitfall)
    assert (got["rubric_met_ratio"], got["rubric_worst_mean"], got["pitfall_rate"]) == pytest.approx(ref, abs=1e-12)
    empty = rubric_stats(scores, np.zeros_like(valid), pitfall)
    assert all(math.isnan(v) for v in empty.values())


def test_batch_detail_reports_present_slots_per_response_and_masked_by_status():
    from rvpo_async.types import STATUS_CODES as S

    cfg = load_config(None, ["judges.specs=[{name: fmt, kind: regex, params: {pattern: x}}, "
                             "{name: rubric, kind: rubric, params: {max_items: 4}}]"])
    view = RubricView(cfg, [PROMPT])
    status = np.array([[[S["ok"], S["ok"], S["ok"], S["timeout"], S["absent"]],
                        [S["ok"], S["ok"], S["ok"], S["ok"], S["absent"]]]], dtype=np.int8)
    rewards = np.array([[[1, 0.9, 0.2, np.nan, np.nan], [0, 0.1, 0.8, 0.6, np.nan]]], dtype=np.float32)
    d = view.batch_detail(["p0"], rewards, status)
    assert d["rubric_criteria"] == [3]
    assert d["rubric_groups"] == [{"prompt_id": "p0", "criteria": 3, "present": [3, 3], "masked": {"timeout": 1}}]
    assert d["rubric_met_ratio"] == pytest.approx(3 / 5) and d["rubric_worst_mean"] == pytest.approx(0.15)
    assert d["pitfall_rate"] == pytest.approx(0.5)  # criterion 1 ("Is rude") is the pitfall
    assert view.weights(["p0"]) == cfg.reward_weights  # uniform: the config's [K] weights


def test_metrics_create_no_series_per_rubric_slot():
    from rvpo_async.metrics import Metrics

    cfg = load_config(None, ["judges.specs=[{name: fmt, kind: regex, params: {pattern: x}}, "
                             "{name: rubric, kind: rubric}]"])
    m = Metrics.from_config(cfg)
    m.record_rubric(0.5, 0.25, math.nan, [3, 17])
    text = m.render().decode()
    assert "rubric/" not in text
    assert m.reward_names == ("fmt",) and m.judge_names == ("fmt", "rubric")
    assert "rvpo_rubric_met_ratio 0.5" in text and 'rvpo_rubric_criteria_bucket{le="17.0"} 2.0' in text


@pytest.mark.parametrize("module", ["rvpo_async.rubric", "rvpo_async.rubric_view", "rvpo_async.task"])
def test_rubric_math_and_prompt_loading_import_no_ray_vllm_or_deepspeed(module: str):
    from test_algo_purity import _loaded_after_import

    assert _loaded_after_import(module, ("ray", "vllm", "deepspeed")) == []


def test_points_mode_gives_one_weight_row_per_group_for_the_aggregator():
    import torch

    from rvpo_async.algo import advantages

    cfg = load_config(None, ["judges.specs=[{name: fmt, kind: regex, weight: 2.0, params: {pattern: x}}, "
                             "{name: rubric, kind: rubric, weight: 0.5, params: {max_items: 4}}]",
                             "algo.rubric_weights=points"])
    other = Prompt("p1", "t", (1,), {"rubric": [{"criterion": "a", "points": 4.0}]})
    view = RubricView(cfg, [PROMPT, other])
    rows = view.weights(["p0", "p1", "p0"])
    p0 = [0.5 * 3 * p / 8 for p in (2, 5, 1)]  # |points| 2, 5, 1 share 3 x the rubric weight
    np.testing.assert_allclose(rows.numpy(), [[2, *p0, 0], [2, 0.5, 0, 0, 0], [2, *p0, 0]])
    # what [B, K] weights mean to the aggregator: each group's own row (checked one group at a time against
    # the float64 NumPy reference, as the [K] interface takes them)
    import reference

    rewards = torch.rand(3, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(rewards, dtype=torch.bool)
    mask[1, :, 2:] = False
    mask[[0, 2], :, 4] = False
    for b in range(3):
        got = advantages(rewards[b:b + 1], "rvpo", weights=rows[b], mask=mask[b:b + 1], batch_norm=False)
        ref = reference.advantages(rewards[b:b + 1].numpy(), "rvpo", weights=rows[b].numpy(),
                                   mask=mask[b:b + 1].numpy(), batch_norm=False)
        np.testing.assert_allclose(got.numpy(), ref, atol=1e-10)


def test_rubric_judge_over_http_sends_one_request_per_criterion(monkeypatch):
    from test_judges import KEY, Stub, StubHandler  # the OpenAI-compatible stub of the HTTP judge tests
    import threading

    server = None
    for port in range(21200, 21220):
        try:
            server = Stub(("127.0.0.1", port), StubHandler)
            break
        except OSError:
            continue
    assert server is not None, "no free port in 21200-21219"
    server.requests, server.reply = [], "yes"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("RVPO_TEST_JUDGE_KEY", KEY)
    try:
        judge = build_rubric_judge(JudgeSpec("rubric", "rubric", params={
            "base_url": f"http://127.0.0.1:{server.server_address[1]}/v1", "model": "judge-1", "max_items": 4,
            "api_key_env": "RVPO_TEST_JUDGE_KEY"}), {"default_timeout_s": 5.0})
        out = judge.score_all(PROMPT, "hello")
        assert [r.status for r in out] == ["ok"] * 3 + ["absent"]
        assert [r.value for r in out[:3]] == [1.0, 0.0, 1.0]  # "yes" to the pitfall scores 0
        asked = sorted(body["messages"][-1]["content"].split("\n")[0] for _, _, body in server.requests)
        assert asked == ["Rubric: Is rude", "Rubric: SLOW criterion", "Rubric: Says hello"]
    finally:
        server.shutdown()
        server.server_close()
