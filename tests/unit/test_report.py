"""The run report and the study table: final figures are means over the last fifth of the steps, and the
lowest-reward-per-response column follows the per-step diagnostics."""

from __future__ import annotations

import pytest

from rvpo_async.compare import _summarise, _table
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


def test_study_table_averages_seeds_and_shows_the_lowest_reward_per_response() -> None:
    runs = [{"seed": s, "report": _report(_rows(5, [0.2 + s] * 5))} for s in (0, 1)]
    summary = _summarise({"rvpo": runs}, NAMES)
    assert summary["rvpo"]["worst_final"] == pytest.approx(0.7) and summary["rvpo"]["worst_first"] == pytest.approx(0.7)
    table = _table(summary, NAMES)
    assert "lowest per response" in table.splitlines()[2]
    assert table.splitlines()[4].endswith("| 0.700 (0.700) |")


def test_study_plot_has_a_panel_per_reward_and_one_for_the_lowest_reward(tmp_path) -> None:
    import matplotlib.image

    from rvpo_async.compare import _plot

    results = {agg: [{"seed": 0, "rows": _rows(5, [0.2] * 5)}] for agg in ("mean", "rvpo")}
    _plot(results, NAMES, tmp_path / "with.png")
    for runs in results.values():
        del runs[0]["rows"][0]["worst_reward_mean"]
    _plot(results, NAMES, tmp_path / "without.png")
    width = {k: matplotlib.image.imread(tmp_path / f"{k}.png").shape[1] for k in ("with", "without")}
    assert width["with"] == pytest.approx(width["without"] * 3 / 2, rel=0.02)  # 3 panels vs 2, 4 inches each


def test_report_holds_the_first_and_final_k_risk_of_the_schedule() -> None:
    rows = _rows(4, [0.5] * 4)
    for i, r in enumerate(rows):
        r["k_risk"] = 0.5 + 0.5 * i
    assert _report(rows)["k_risk"] == {"first": 0.5, "final": 2.0}
