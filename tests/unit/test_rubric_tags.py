"""Rubric item tags (HealthBench's `tags: [axis:..., theme:...]`): parsed with each criterion, met ratios per
tag in every step row, in Prometheus and in a study's metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rvpo_async import study_stats as st
from rvpo_async.metrics import Metrics
from rvpo_async.rubric import RubricError, as_meta, from_meta, parse_rubric, rubric_stats


def test_tags_travel_with_each_criterion_and_bad_tags_name_the_item():
    criteria, _ = parse_rubric([{"criterion": "c", "points": 1, "tags": ["axis:accuracy", "level:example"]}, "d"])
    assert criteria[0].tags == ("axis:accuracy", "level:example") and criteria[1].tags == ()
    assert from_meta({"rubric": as_meta(criteria)}) == criteria
    with pytest.raises(RubricError, match=r"field 'rubric\[0\]': 'tags' must be a list of non-empty strings"):
        parse_rubric([{"criterion": "c", "tags": "axis:accuracy"}])


def _by_tag_reference(scores, valid, tags):
    """Per tag: met (score >= 0.5) over valid criteria carrying it, by plain loops."""
    met: dict[str, int] = {}
    n: dict[str, int] = {}
    for b in range(scores.shape[0]):
        for g in range(scores.shape[1]):
            for j, ts in enumerate(tags[b]):
                if not valid[b, g, j]:
                    continue
                for t in ts:
                    n[t] = n.get(t, 0) + 1
                    met[t] = met.get(t, 0) + (float(scores[b, g, j]) >= 0.5)
    return {t: met[t] / n[t] for t in n}


def test_met_ratio_by_tag_matches_a_float64_loop():
    rng = np.random.default_rng(1)
    scores = rng.random((2, 4, 5))
    valid = np.ones((2, 4, 5), dtype=bool)
    valid[0, :, 3:] = False  # prompt 0 has 3 criteria
    valid[1, 2, 1] = False  # one timeout
    tags = [[("axis:word",), ("axis:format", "theme:a"), ()],
            [("axis:format",), ("axis:word",), ("axis:format",), (), ("theme:a",)]]
    got = rubric_stats(scores, valid, np.zeros((2, 5), dtype=bool), tags)["rubric_met_by_tag"]
    ref = _by_tag_reference(scores, valid, tags)
    assert set(got) == set(ref) == {"axis:word", "axis:format", "theme:a"}
    for t in ref:
        assert got[t] == pytest.approx(ref[t], abs=1e-12)
    none = rubric_stats(scores, np.zeros_like(valid), np.zeros((2, 5), dtype=bool), tags)["rubric_met_by_tag"]
    assert all(math.isnan(v) for v in none.values())
    assert "rubric_met_by_tag" not in rubric_stats(scores, valid, np.zeros((2, 5), dtype=bool))


def test_prometheus_gauge_per_tag_is_nan_where_the_batch_had_none():
    m = Metrics(["a"], ["a"])
    m.record_rubric(0.5, 0.0, math.nan, [3], {"axis:word": 0.25, "axis:format": None})
    body = m.render().decode()
    assert 'rvpo_rubric_met_ratio_by_tag{tag="axis:word"} 0.25' in body
    assert 'rvpo_rubric_met_ratio_by_tag{tag="axis:format"} NaN' in body


def test_a_study_reports_each_tag_most_steps_measured_over_the_steps_that_did():
    def rows(word, gaps=()):
        # axis:format: 0.2 on steps 1-9, 0.8 on step 10, unmeasured (null or absent) on the steps in gaps;
        # axis:rare: measured on steps 1-4 only
        out = [{"step": i + 1, "reward_mean": {"r": 0.5},
                "rubric_met_by_tag": {"axis:word": word, "axis:format": 0.8 if i == 9 else 0.2,
                                      **({"axis:rare": 1.0} if i < 4 else {})}} for i in range(10)]
        for i in gaps:
            out[i]["rubric_met_by_tag"]["axis:format"] = None if i % 2 else out[i]["rubric_met_by_tag"].pop("axis:format")
        return out
    runs = {"a": {s: rows(0.1 * s) for s in range(3)}, "b": {s: rows(0.5, gaps=(9,) if s == 1 else ()) for s in range(3)}}
    out = st.study_summary(runs, ["r"])
    assert out["metrics"] == ["reward/r", "rubric_met/axis:format", "rubric_met/axis:word"]  # axis:rare: 4 of 10
    assert out["variants"]["a"]["metrics"]["rubric_met/axis:word"]["final"]["mean"] == pytest.approx(0.1)
    b_format = out["variants"]["b"]["metrics"]["rubric_met/axis:format"]["per_seed"]
    assert b_format["0"]["final"] == pytest.approx(0.8) and b_format["0"]["run_mean"] == pytest.approx(0.26)
    # seed 1 did not measure step 10: its final is step 9's, its mean over the 9 steps it measured
    assert b_format["1"]["final"] == pytest.approx(0.2) and b_format["1"]["run_mean"] == pytest.approx(0.2)
    assert b_format["1"]["best_step"] == 1
    (pair,) = out["pairs"]
    assert pair["final"]["rubric_met/axis:word"]["diff"] == pytest.approx(0.1 - 0.5)
    assert math.isnan(st.metric_values(runs["b"][1], "rubric_met/axis:format")[9])


def test_a_study_plot_leaves_a_gap_where_no_seed_measured_a_tag(tmp_path):
    from rvpo_async.study_report import plot_study

    rows = [{"step": i + 1, "rubric_met_by_tag": {"axis:x": None if i == 2 else 0.5}} for i in range(5)]
    plot_study({"a": {0: rows, 1: rows}}, ["rubric_met/axis:x"], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
