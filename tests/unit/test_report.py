"""The run report: final figures are means over the last fifth of the steps, and the lowest reward per
response follows the per-step diagnostics (the study's tables: tests/unit/test_study_stats.py)."""

from __future__ import annotations

import pytest

from rvpo_async.report import summarise

NAMES = ["a", "b"]


def _rows(n: int, worst: list[float]) -> list[dict]:
    return [{"step": i + 1, "policy_version": i + 1, "reward_mean": {"a": 0.1 * i, "b": 1.0},
             "inter_variance": 0.5, "staleness_values": [0, 1], "worst_reward_mean": worst[i]} for i in range(n)]


def _report(rows: list[dict]) -> dict:
    return summarise(rows, NAMES, mode="async", aggregator="rvpo", wall_seconds=2.0, samples=10,
                     generated_tokens=100)


def test_final_rewards_and_lowest_reward_are_means_over_the_last_fifth_of_the_steps() -> None:
    rows = _rows(10, [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    rep = _report(rows)
    assert rep["rewards"]["a"] == pytest.approx((0.8 + 0.9) / 2) and rep["rewards"]["b"] == 1.0
    assert rep["worst_reward"] == pytest.approx((0.8 + 0.9) / 2)
    assert rep["worst_reward_first_step"] == 0.0


def test_rows_without_the_lowest_reward_give_none_not_a_wrong_number() -> None:
    rows = _rows(5, [0.5] * 5)
    del rows[-1]["worst_reward_mean"]
    assert _report(rows)["worst_reward"] is None


def test_report_holds_the_first_and_final_k_risk_of_the_schedule() -> None:
    rows = _rows(4, [0.5] * 4)
    for i, r in enumerate(rows):
        r["k_risk"] = 0.5 + 0.5 * i
    assert _report(rows)["k_risk"] == {"first": 0.5, "final": 2.0}
