"""Statistics of a study (`rvpo-async compare`): per-run curve summaries and paired tests over seeds.

Pure: NumPy and the standard library only (no ray, vllm, deepspeed), so every number in study.json can
be checked on synthetic inputs.

Per run and metric (a reward's batch mean, `worst_reward_mean`, `all_met_share`, the rubric measures):
- final: the mean of the last tenth of the steps (at least one step);
- best: the highest mean over any window of that same length, and the step that window ends at; the
  window keeps one lucky step from passing for a peak, and makes final and best comparable;
- drop: best - final (>= 0), the late collapse. For a metric where lower is better (`pitfall_rate`)
  "best" is the lowest window and drop is final - best;
- run_mean: the mean over every step (the area under the curve over its length): how early a reward was
  learned, where final values tie.
Between two variants A and B, over their seeds (independent samples, one value per seed):
- diff = mean(A) - mean(B) of the final values;
- a percentile bootstrap confidence interval of diff (each variant resampled on its own);
- a two-sided permutation p-value of diff: exact over every split of the pooled seeds when there are at
  most `exact_limit` splits (5 vs 5 seeds: 252), Monte Carlo with the (1 + hits) / (1 + draws) rule otherwise;
- a q-value: the p-value adjusted by Benjamini-Hochberg over every test of the study (each pair of variants,
  each metric, final and run mean), so that the tests called significant at q < 0.05 hold a false discovery
  rate of 5% however many metrics and variants the study has.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Mapping, Sequence

import numpy as np

LOWER_IS_BETTER = frozenset({"pitfall_rate"})
# top-level keys of a metrics.jsonl step row that a study reports when every row carries them
TOP_LEVEL_METRICS = ("worst_reward_mean", "all_met_share", "rubric_met_ratio", "rubric_worst_mean", "pitfall_rate")
REWARD_PREFIX = "reward/"
TAG_PREFIX = "rubric_met/"  # a rubric tag's met ratio (metrics.jsonl `rubric_met_by_tag`)
# a step whose batch had no criterion with a tag has no met ratio for it: a tag is reported when at least this
# share of a run's steps measured it, and summarised over those steps
TAG_MIN_SHARE = 0.5


def tail_length(n_steps: int) -> int:
    """Steps in the final window: a tenth of the run, at least one."""
    return max(1, n_steps // 10)


def curve_summary(steps: Sequence[int], values: Sequence[float], *, lower_is_better: bool = False) -> dict[str, Any]:
    """final / best / best_step / drop of one run's per-step values (see the module docstring)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        raise ValueError("a curve summary needs at least one step")
    if len(steps) != v.size:
        raise ValueError(f"{len(steps)} steps for {v.size} values")
    n = tail_length(v.size)
    windows = np.convolve(v, np.ones(n) / n, mode="valid")  # windows[i] = mean of v[i:i + n]
    final = float(windows[-1])
    i = int(np.argmin(windows) if lower_is_better else np.argmax(windows))  # first of equal bests
    best = float(windows[i])
    return {"final": final, "best": best, "best_step": int(steps[i + n - 1]),
            "drop": (final - best) if lower_is_better else (best - final), "window": n, "run_mean": float(v.mean())}


def bootstrap_diff_ci(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, n_boot: int = 10000,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of mean(a) - mean(b), resampling a and b independently."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples need at least one value")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    mx = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    my = y[rng.integers(0, y.size, size=(n_boot, y.size))].mean(1)
    d = mx - my
    if d.min() == d.max():  # constant samples: quantile interpolation would only add rounding
        return float(d[0]), float(d[0])
    lo, hi = np.quantile(d, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def permutation_p_value(a: Sequence[float], b: Sequence[float], *, exact_limit: int = 20000, n_perm: int = 20000,
                        seed: int = 0) -> tuple[float, bool]:
    """Two-sided permutation p-value of mean(a) - mean(b); returns (p, exact)."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.size == 0 or y.size == 0:
        raise ValueError("both samples need at least one value")
    pooled = np.concatenate([x, y])
    n, na = pooled.size, x.size
    total = pooled.sum()
    observed = abs(x.mean() - y.mean())
    # splits whose statistic equals the observed one up to rounding count as "as extreme"
    tol = 1e-9 * max(1.0, float(np.abs(pooled).max()))

    def stat(sum_a: np.ndarray) -> np.ndarray:
        return np.abs(sum_a / na - (total - sum_a) / (n - na))

    if math.comb(n, na) <= exact_limit:
        idx = np.array(list(itertools.combinations(range(n), na)), dtype=np.int64)  # [C, na]
        s = stat(pooled[idx].sum(1))
        return float((s >= observed - tol).mean()), True
    rng = np.random.default_rng(seed)
    perm = np.argsort(rng.random((n_perm, n)), axis=1)[:, :na]
    hits = int((stat(pooled[perm].sum(1)) >= observed - tol).sum())
    return (1 + hits) / (1 + n_perm), False


def bh_adjust(p_values: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg adjusted p-values (q-values), in the input order: q_(i) = min over j >= i of
    p_(j) * m / j for the sorted p-values, capped at 1."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.size == 0:
        return []
    if np.any(np.isnan(p)) or np.any(p < 0) or np.any(p > 1):
        raise ValueError(f"p-values must lie in [0, 1], got {p_values!r}")
    order = np.argsort(p, kind="stable")
    ranked = p[order] * p.size / np.arange(1, p.size + 1)
    q_sorted = np.minimum(1.0, np.minimum.accumulate(ranked[::-1])[::-1])
    q = np.empty_like(q_sorted)
    q[order] = q_sorted
    return [float(x) for x in q]


def compare_samples(a: Sequence[float], b: Sequence[float], *, level: float = 0.95, seed: int = 0) -> dict[str, Any]:
    lo, hi = bootstrap_diff_ci(a, b, level=level, seed=seed)
    p, exact = permutation_p_value(a, b, seed=seed)
    return {"diff": float(np.mean(a) - np.mean(b)), "ci_low": lo, "ci_high": hi, "ci_level": level,
            "p_value": p, "exact": exact, "n_a": len(a), "n_b": len(b)}


# ---------------------------------------------------------------- metrics.jsonl rows

def _tag_value(row: Mapping[str, Any], tag: str) -> float:
    v = (row.get("rubric_met_by_tag") or {}).get(tag)
    return math.nan if v is None else float(v)


def metric_names(rows: Sequence[Mapping[str, Any]], reward_names: Sequence[str]) -> list[str]:
    """The metrics of a run: `reward/<name>` per reward and the top-level measures that every row carries, then
    `rubric_met/<tag>` per rubric tag measured on at least TAG_MIN_SHARE of the steps."""
    names = [REWARD_PREFIX + n for n in reward_names if rows and all(n in r.get("reward_mean", {}) for r in rows)]
    tags = sorted({t for r in rows for t in r.get("rubric_met_by_tag") or {}})
    return (names + [k for k in TOP_LEVEL_METRICS if rows and all(r.get(k) is not None for r in rows)]
            + [TAG_PREFIX + t for t in tags
               if sum(not math.isnan(_tag_value(r, t)) for r in rows) >= TAG_MIN_SHARE * len(rows)])


def metric_values(rows: Sequence[Mapping[str, Any]], metric: str) -> list[float]:
    """One value per row; NaN for a tag on a step that did not measure it."""
    if metric.startswith(REWARD_PREFIX):
        return [float(r["reward_mean"][metric[len(REWARD_PREFIX):]]) for r in rows]
    if metric.startswith(TAG_PREFIX):
        return [_tag_value(r, metric[len(TAG_PREFIX):]) for r in rows]
    return [float(r[metric]) for r in rows]


def run_summary(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Each metric's curve summary over the steps that measured it."""
    out = {}
    for m in metrics:
        points = [(int(r["step"]), v) for r, v in zip(rows, metric_values(rows, m)) if not math.isnan(v)]
        out[m] = curve_summary([s for s, _ in points], [v for _, v in points], lower_is_better=m in LOWER_IS_BETTER)
    return out


def _mean_std(xs: Sequence[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0}


def study_summary(runs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]], reward_names: Sequence[str], *,
                  level: float = 0.95) -> dict[str, Any]:
    """runs[variant][seed] = that run's step rows -> per-variant summaries and pairwise tests of the finals.

    Only metrics every run carries are reported, so that every variant is summarised on the same ones."""
    all_rows = [rows for by_seed in runs.values() for rows in by_seed.values()]
    common = [m for m in metric_names(all_rows[0], reward_names)
              if all(m in metric_names(rows, reward_names) for rows in all_rows)] if all_rows else []
    variants: dict[str, Any] = {}
    for name, by_seed in runs.items():
        per_seed = {seed: run_summary(rows, common) for seed, rows in sorted(by_seed.items())}
        out: dict[str, Any] = {"seeds": sorted(by_seed), "steps": min(len(r) for r in by_seed.values()), "metrics": {}}
        for m in common:
            vals = [s[m] for s in per_seed.values()]
            out["metrics"][m] = {
                "final": _mean_std([v["final"] for v in vals]), "best": _mean_std([v["best"] for v in vals]),
                "drop": _mean_std([v["drop"] for v in vals]), "run_mean": _mean_std([v["run_mean"] for v in vals]),
                "best_step_median": float(np.median([v["best_step"] for v in vals])),
                "per_seed": {str(seed): per_seed[seed][m] for seed in per_seed}}
        variants[name] = out
    pairs = []
    for a, b in itertools.combinations(list(runs), 2):
        pair: dict[str, Any] = {"a": a, "b": b}
        for what in ("final", "run_mean"):
            pair[what] = {m: compare_samples(
                [variants[a]["metrics"][m]["per_seed"][str(s)][what] for s in variants[a]["seeds"]],
                [variants[b]["metrics"][m]["per_seed"][str(s)][what] for s in variants[b]["seeds"]], level=level)
                for m in common}
        pairs.append(pair)
    tests = [pair[what][m] for pair in pairs for what in ("final", "run_mean") for m in common]
    for t, q in zip(tests, bh_adjust([t["p_value"] for t in tests])):
        t["q_value"] = q
    return {"metrics": common, "tests": len(tests), "lower_is_better": sorted(LOWER_IS_BETTER & set(common)), "variants": variants,
            "pairs": pairs}
