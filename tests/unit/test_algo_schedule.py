"""The k_risk schedule (rvpo_async.schedule) against hand-computed values, and its config checks."""

from __future__ import annotations

import pytest

from rvpo_async.config import AlgoConfig, ConfigError, load_config
from rvpo_async.schedule import k_risk_at


def test_constant_schedule_uses_k_risk_at_every_step():
    algo = AlgoConfig(k_risk=3.5, k_risk_start=0.1, k_risk_end=9.0)
    assert [k_risk_at(s, algo, 10) for s in (0, 4, 9, 50)] == [3.5] * 4


def test_linear_schedule_goes_from_half_to_two_as_in_the_paper():
    algo = AlgoConfig(k_risk_schedule="linear", k_risk_start=0.5, k_risk_end=2.0, k_risk_steps=100)
    # 0.5 + 1.5 * step / 100
    assert [k_risk_at(s, algo) for s in (0, 10, 50, 99, 100, 150)] == pytest.approx(
        [0.5, 0.65, 1.25, 1.985, 2.0, 2.0], abs=1e-12)


def test_linear_schedule_without_k_risk_steps_ends_on_the_runs_last_step():
    algo = AlgoConfig(k_risk_schedule="linear", k_risk_start=0.5, k_risk_end=2.0)
    assert [k_risk_at(s, algo, run_steps=4) for s in range(4)] == pytest.approx([0.5, 1.0, 1.5, 2.0], abs=1e-12)
    assert k_risk_at(0, algo, run_steps=1) == 2.0  # a one-step run: its only step is the last
    with pytest.raises(ValueError, match="run_steps"):
        k_risk_at(0, algo)


def test_cosine_schedule_hand_values():
    algo = AlgoConfig(k_risk_schedule="cosine", k_risk_start=0.5, k_risk_end=2.0, k_risk_steps=4)
    # 2.0 + (0.5 - 2.0) * (1 + cos(pi * s / 4)) / 2: s=1 -> 2 - 0.75 * (1 + 0.70710678)
    assert [k_risk_at(s, algo) for s in range(6)] == pytest.approx(
        [0.5, 0.719669914, 1.25, 1.780330086, 2.0, 2.0], abs=1e-9)


def test_decreasing_schedule_is_allowed():
    algo = AlgoConfig(k_risk_schedule="linear", k_risk_start=4.0, k_risk_end=1.0, k_risk_steps=3)
    assert [k_risk_at(s, algo) for s in range(4)] == pytest.approx([4.0, 3.0, 2.0, 1.0])


@pytest.mark.parametrize("overrides, key", [
    (["algo.k_risk_schedule=linear", "algo.k_risk_start=0"], "algo.k_risk_start"),
    (["algo.k_risk_schedule=cosine", "algo.k_risk_end=-1"], "algo.k_risk_end"),
    (["algo.k_risk_schedule=linear", "algo.k_risk_steps=0"], "algo.k_risk_steps"),
    (["algo.k_risk_schedule=linear", "algo.k_risk_end=.inf"], "algo.k_risk_end"),
    (["algo.k_risk_schedule=exponential"], "algo.k_risk_schedule"),
    (["algo.kl_coef=-0.1"], "algo.kl_coef"),
    (["algo.rubric_weights=sum"], "algo.rubric_weights"),
])
def test_schedule_kl_and_rubric_weight_config_errors_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_schedule_keys_load_typed():
    cfg = load_config(None, ["algo.k_risk_schedule=linear", "algo.k_risk_start=0.5", "algo.k_risk_end=2",
                             "algo.k_risk_steps=200", "algo.kl_coef=0.01", "algo.rubric_weights=points"])
    a = cfg.algo
    assert (a.k_risk_schedule, a.k_risk_start, a.k_risk_end, a.k_risk_steps, a.kl_coef, a.rubric_weights) == (
        "linear", 0.5, 2.0, 200, 0.01, "points")
    assert type(a.k_risk_end) is float
