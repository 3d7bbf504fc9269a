"""The statistics of a study (rvpo_async.study_stats) on synthetic inputs with known answers."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest

from rvpo_async import study_stats as st


# ---------------------------------------------------------------- curve summaries

def test_final_is_the_mean_of_the_last_tenth_and_best_the_best_window():
    values = [0.0] * 20 + [1.0] * 10 + [0.2] * 10  # 40 steps: window of 4
    s = st.curve_summary(list(range(1, 41)), values)
    assert s["window"] == 4 and s["final"] == pytest.approx(0.2)
    assert s["best"] == pytest.approx(1.0) and s["best_step"] == 24  # the first window of four 1.0s ends at step 24
    assert s["drop"] == pytest.approx(0.8)


def test_a_single_lucky_step_is_not_a_peak():
    values = [0.5] * 29 + [1.0] + [0.5] * 30  # 60 steps, window 6
    s = st.curve_summary(list(range(1, 61)), values)
    assert s["best"] == pytest.approx(0.5 + 0.5 / 6)
    assert s["drop"] == pytest.approx(0.5 / 6)


def test_rising_curve_has_no_drop_and_short_runs_use_one_step():
    s = st.curve_summary([1, 2, 3], [0.1, 0.2, 0.3])
    assert s == {"final": 0.3, "best": 0.3, "best_step": 3, "drop": 0.0, "window": 1, "run_mean": pytest.approx(0.2)}


def test_run_mean_tells_an_early_learner_from_a_late_one_with_the_same_final():
    early = [0.0] * 5 + [1.0] * 35
    late = [0.0] * 30 + [1.0] * 10
    se, sl = (st.curve_summary(list(range(1, 41)), v) for v in (early, late))
    assert se["final"] == sl["final"] == 1.0
    assert (se["run_mean"], sl["run_mean"]) == (pytest.approx(35 / 40), pytest.approx(10 / 40))
    runs = {"early": {s: [{"step": i + 1, "reward_mean": {"r": v + 0.001 * s}} for i, v in enumerate(early)]
                      for s in range(5)},
            "late": {s: [{"step": i + 1, "reward_mean": {"r": v + 0.001 * s}} for i, v in enumerate(late)]
                     for s in range(5)}}
    (pair,) = st.study_summary(runs, ["r"])["pairs"]
    assert pair["final"]["reward/r"]["diff"] == pytest.approx(0.0)
    assert pair["run_mean"]["reward/r"]["diff"] == pytest.approx(25 / 40)
    assert pair["run_mean"]["reward/r"]["p_value"] == pytest.approx(2 / 252)  # separated 5 vs 5: the smallest p
    from rvpo_async.study_report import study_markdown

    md = study_markdown(st.study_summary(runs, ["r"]))
    assert "| early | 0.877 ± 0.002 |" in md.split("## Mean over the run")[1]
    assert "| early - late | +0.625" in md.split("## Mean over the run")[1]


def test_lower_is_better_metric_reports_its_lowest_window_and_a_positive_drop():
    s = st.curve_summary(list(range(1, 11)), [0.5, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4, 0.4, 0.6], lower_is_better=True)
    assert (s["best"], s["best_step"]) == (0.1, 2)
    assert s["final"] == 0.6 and s["drop"] == pytest.approx(0.5)


# ---------------------------------------------------------------- permutation test

def test_identical_samples_give_p_one_and_a_ci_containing_zero():
    a = [0.31, 0.52, 0.47, 0.12, 0.66]
    p, exact = st.permutation_p_value(a, list(a))
    assert exact and p == 1.0
    lo, hi = st.bootstrap_diff_ci(a, list(a))
    assert lo < 0 < hi


def test_fully_separated_five_against_five_gives_the_exact_two_sided_p():
    a, b = [1.0, 1.1, 1.2, 1.3, 1.4], [0.0, 0.1, 0.2, 0.3, 0.4]
    p, exact = st.permutation_p_value(a, b)
    assert exact and p == pytest.approx(2 / 252)
    assert st.permutation_p_value(b, a)[0] == pytest.approx(2 / 252)  # two-sided: symmetric


def _brute_force_p(a, b):
    pooled = list(a) + list(b)
    obs = abs(np.mean(a) - np.mean(b))
    hits = total = 0
    for idx in itertools.combinations(range(len(pooled)), len(a)):
        x = [pooled[i] for i in idx]
        y = [pooled[i] for i in range(len(pooled)) if i not in idx]
        hits += abs(np.mean(x) - np.mean(y)) >= obs - 1e-12
        total += 1
    return hits / total


@pytest.mark.parametrize("na,nb", [(3, 3), (4, 6), (5, 5), (2, 7)])
def test_exact_p_matches_a_plain_enumeration(na, nb):
    rng = np.random.default_rng(na * 10 + nb)
    a, b = rng.normal(0.3, 1.0, na).round(2), rng.normal(0.0, 1.0, nb).round(2)  # rounding makes ties
    assert st.permutation_p_value(a, b)[0] == pytest.approx(_brute_force_p(a, b), abs=1e-12)


def test_many_seeds_use_a_monte_carlo_p_close_to_the_exact_one():
    rng = np.random.default_rng(7)
    a, b = rng.normal(0.5, 1.0, 9), rng.normal(0.0, 1.0, 9)  # C(18, 9) = 48620 splits
    exact, is_exact = st.permutation_p_value(a, b, exact_limit=10**6)
    mc, is_mc_exact = st.permutation_p_value(a, b, exact_limit=1000, n_perm=40000)
    assert is_exact and not is_mc_exact
    assert mc == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 40000) + 1e-4)


def test_one_seed_each_gives_p_one():
    assert st.permutation_p_value([0.9], [0.1]) == (1.0, True)


# ---------------------------------------------------------------- bootstrap

def test_bootstrap_ci_of_constant_samples_is_the_shift_itself():
    assert st.bootstrap_diff_ci([3.0] * 5, [1.0] * 5) == (2.0, 2.0)


def test_bootstrap_ci_of_a_constant_shift_contains_it_and_excludes_zero():
    base = np.array([0.20, 0.25, 0.22, 0.28, 0.24])
    lo, hi = st.bootstrap_diff_ci(base + 1.0, base)
    assert lo < 1.0 < hi
    # resampled means of each sample stay within its range, so the interval is within +-range of the shift
    spread = base.max() - base.min()
    assert 1.0 - spread <= lo and hi <= 1.0 + spread


def test_bootstrap_ci_narrows_with_the_level_and_is_reproducible():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 1.0, 8), rng.normal(0.0, 1.0, 8)
    lo95, hi95 = st.bootstrap_diff_ci(a, b, level=0.95)
    lo50, hi50 = st.bootstrap_diff_ci(a, b, level=0.5)
    assert lo95 < lo50 < hi50 < hi95
    assert st.bootstrap_diff_ci(a, b) == (lo95, hi95)


def test_bad_inputs_are_errors():
    with pytest.raises(ValueError, match="at least one value"):
        st.permutation_p_value([], [1.0])
    with pytest.raises(ValueError, match="level"):
        st.bootstrap_diff_ci([1.0], [1.0], level=1.5)
    with pytest.raises(ValueError, match="at least one step"):
        st.curve_summary([], [])


# ---------------------------------------------------------------- multiple comparisons

def _bh_reference(p):
    """Benjamini-Hochberg by its definition: q_i = min over every p_j >= p_i of p_j * m / rank(p_j)."""
    m = len(p)
    ranked = sorted(p)
    rank = {}
    for r, v in enumerate(ranked, 1):
        rank[v] = r  # ties take the largest rank, the step-up rule
    return [min(1.0, min(v * m / rank[v] for v in p if v >= x)) for x in p]


def test_bh_matches_a_worked_example():
    # m = 4: sorted 0.01, 0.03, 0.04, 0.5 -> p * 4 / rank = 0.04, 0.06, 0.0533, 0.5; the step-up min over the
    # larger ones makes the second 0.0533
    assert st.bh_adjust([0.5, 0.03, 0.01, 0.04]) == pytest.approx([0.5, 0.16 / 3, 0.04, 0.16 / 3], abs=1e-12)


def test_bh_matches_its_definition_on_random_and_tied_p_values():
    rng = np.random.default_rng(3)
    for _ in range(20):
        p = list(np.round(rng.random(int(rng.integers(1, 30))), 2))  # rounding makes ties
        q = st.bh_adjust(p)
        assert q == pytest.approx(_bh_reference(p), abs=1e-12)
        assert all(qi >= pi - 1e-15 for qi, pi in zip(q, p))  # never smaller than the p-value
        assert all(qa <= qb + 1e-15 for pa, qa in zip(p, q) for pb, qb in zip(p, q) if pa <= pb)  # order kept


def test_bh_of_one_test_is_the_p_value_and_bad_p_values_are_errors():
    assert st.bh_adjust([0.03]) == [0.03]
    assert st.bh_adjust([]) == []
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        st.bh_adjust([0.1, 1.5])


# ---------------------------------------------------------------- study summary

def _rows(curve, keyword, *, extra=None):
    return [{"step": i + 1, "reward_mean": {"length": v, "keyword": keyword[i]}, "worst_reward_mean": min(v, keyword[i]),
             **(extra(i) if extra else {})} for i, v in enumerate(curve)]


def test_study_summary_pairs_variants_on_the_finals_of_every_metric():
    up, flat = [i / 19 for i in range(20)], [0.5] * 20
    runs = {"a": {s: _rows([x + 0.01 * s for x in up], flat) for s in range(5)},
            "b": {s: _rows(flat, [0.5 - 0.01 * s] * 20) for s in range(5)}}
    out = st.study_summary(runs, ["length", "keyword"])
    assert out["metrics"] == ["reward/length", "reward/keyword", "worst_reward_mean"]
    a_len = out["variants"]["a"]["metrics"]["reward/length"]
    assert a_len["final"]["mean"] == pytest.approx((18 / 19 + 1) / 2 + 0.02)  # last tenth: 2 steps, seeds 0..4
    assert a_len["drop"]["mean"] == pytest.approx(0.0)
    (pair,) = out["pairs"]
    assert (pair["a"], pair["b"]) == ("a", "b")
    assert pair["final"]["reward/length"]["p_value"] == pytest.approx(2 / 252)
    assert pair["final"]["reward/length"]["diff"] == pytest.approx(a_len["final"]["mean"] - 0.5)


def test_study_summary_adjusts_every_test_of_the_study_together():
    up, flat = [i / 19 for i in range(20)], [0.5] * 20
    runs = {"a": {s: _rows([x + 0.01 * s for x in up], flat) for s in range(5)},
            "b": {s: _rows(flat, [0.5 - 0.01 * s] * 20) for s in range(5)},
            "c": {s: _rows(flat, flat) for s in range(5)}}
    out = st.study_summary(runs, ["length", "keyword"])
    tests = [p[w][m] for p in out["pairs"] for w in ("final", "run_mean") for m in out["metrics"]]
    assert out["tests"] == len(tests) == 3 * 2 * 3
    assert [t["q_value"] for t in tests] == pytest.approx(_bh_reference([t["p_value"] for t in tests]), abs=1e-12)


def test_study_summary_reports_the_optional_top_level_metrics_only_when_every_run_has_them():
    c = [0.5] * 10
    with_share = {s: _rows(c, c, extra=lambda i: {"all_met_share": 0.1 * i, "pitfall_rate": 0.5}) for s in (0, 1)}
    runs = {"a": with_share, "b": {s: _rows(c, c, extra=lambda i: {"all_met_share": 0.2}) for s in (0, 1)}}
    out = st.study_summary(runs, ["length", "keyword"])
    assert "all_met_share" in out["metrics"] and "pitfall_rate" not in out["metrics"]
    m = out["variants"]["a"]["metrics"]["all_met_share"]
    assert m["best"]["mean"] == pytest.approx(0.9) and m["best_step_median"] == 10


def test_study_stats_is_pure():
    code = ("import sys, rvpo_async.study_stats\n"
            "bad = [m for m in ('ray', 'vllm', 'deepspeed', 'torch', 'transformers') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
