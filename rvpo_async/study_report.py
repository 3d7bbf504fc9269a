"""study.md and study.png of a study (rvpo_async.compare); the numbers come from rvpo_async.study_stats."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

from rvpo_async.study_stats import REWARD_PREFIX, metric_values


def _label(metric: str) -> str:
    return metric[len(REWARD_PREFIX):] if metric.startswith(REWARD_PREFIX) else metric


def _ms(d: Mapping[str, float]) -> str:
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def study_markdown(s: Mapping[str, Any]) -> str:
    metrics = s["metrics"]
    labels = [_label(m) for m in metrics]
    variants = s["variants"]
    seeds = {name: len(v["seeds"]) for name, v in variants.items()}
    lines = [f"# Study: {s.get('config')}", "",
             f"Runs finished: {s.get('runs_finished')} of {s.get('runs_planned')}. Seeds per variant: "
             + ", ".join(f"{n} {k}" for n, k in seeds.items()) + ".", "",
             "Variants: " + "; ".join(f"`{n}`: `{' '.join(o) or '(the config as is)'}`"
                                      for n, o in s.get("variants_spec", {}).items()) + ".", "",
             "## Final value", "",
             "Mean of the last tenth of the steps, mean ± standard deviation over seeds."
             + (" `worst_reward_mean`: each response's lowest reward, averaged." if "worst_reward_mean" in metrics
                else "")
             + (" `all_met_share`: share of responses meeting every constraint." if "all_met_share" in metrics
                else "")
             + (" A rubric judge's slots are not reported one by one (slot j is a different criterion in each "
                "prompt): `rubric_met_ratio` (share of criteria met), `rubric_worst_mean`, `pitfall_rate` and "
                "`rubric_met/<tag>` (met ratio of the criteria with that tag) stand for them."
                if "rubric_met_ratio" in metrics else "")
             + (" Lower is better for: " + ", ".join(s["lower_is_better"]) + "." if s.get("lower_is_better")
                else ""), ""]
    lines += _table(["variant"] + labels, [[n] + [_ms(v["metrics"][m]["final"]) for m in metrics]
                                           for n, v in variants.items()])
    lines += ["", "## Best value and late collapse", "",
              "Best: the best mean over any window of a tenth of the steps (mean over seeds), at the step the "
              "window ends (median over seeds). Drop: best minus final, averaged over seeds (late collapse; 0 when "
              "the last window is the best).", ""]
    lines += _table(["variant"] + labels,
                    [[n] + [f"{v['metrics'][m]['best']['mean']:.3f} @{v['metrics'][m]['best_step_median']:.0f}, "
                            f"drop {v['metrics'][m]['drop']['mean']:.3f}" for m in metrics]
                     for n, v in variants.items()])
    if s["pairs"]:
        level = next(iter(s["pairs"][0]["final"].values()))["ci_level"] if metrics else 0.95
        lines += ["", "## Pairwise differences of the final values", "",
                  f"A - B, with a {level:.0%} bootstrap confidence interval and a two-sided permutation p-value "
                  "over seeds (exact: every split of the pooled seeds; * marks a Monte Carlo p-value). With n "
                  "seeds per variant the smallest p-value possible is 2 / C(2n, n) (5 vs 5: 0.008). With few seeds "
                  "the percentile bootstrap interval is too narrow (it ignores how little the seeds tell about "
                  "the spread): read the p-value first. q: the p-value adjusted by Benjamini-Hochberg over all "
                  f"{s.get('tests', 0)} tests of this study (every pair, metric, final and run mean); at q < 0.05 "
                  "the share of false findings among those called significant is held at 5%.", ""]
        lines += _significant(s["pairs"], metrics)
        lines += _pair_table(s["pairs"], metrics, labels, "final")
    if all("run_mean" in v["metrics"][m] for v in variants.values() for m in metrics):
        lines += ["", "## Mean over the run (how early it was learned)", "",
                  "The mean over every step, mean ± standard deviation over seeds; where finals tie, it tells which "
                  "variant got there first.", ""]
        lines += _table(["variant"] + labels, [[n] + [_ms(v["metrics"][m]["run_mean"]) for m in metrics]
                                               for n, v in variants.items()])
        if s["pairs"] and all("run_mean" in p for p in s["pairs"]):
            lines += ["", "Pairwise differences of the means over the run, as above:", ""]
            lines += _pair_table(s["pairs"], metrics, labels, "run_mean")
    lines += ["", "Plot: `study.png` (each metric per step, mean over seeds, band: ± one standard deviation).", ""]
    return "\n".join(lines)


def _significant(pairs: Sequence[Mapping[str, Any]], metrics: Sequence[str], alpha: float = 0.05) -> list[str]:
    """The tests that stay significant after the correction, smallest q first."""
    tests = [(pair[what][m], f"{pair['a']} - {pair['b']}", what, _label(m))
             for pair in pairs for what in ("final", "run_mean") for m in metrics]
    found = sorted((t["q_value"], t["p_value"], ab, what, label, t["diff"])
                   for t, ab, what, label in tests if t["q_value"] < alpha)
    what_name = {"final": "final", "run_mean": "mean over the run"}
    lines = [f"Significant at q < {alpha:g} ({len(found)}):", ""]
    lines += [f"- {ab}, {label} ({what_name[what]}): {diff:+.3f}, p={p:.3g}, q={q:.3g}"
              for q, p, ab, what, label, diff in found] or ["- none"]
    return lines + [""]


def _pair_table(pairs: Sequence[Mapping[str, Any]], metrics: Sequence[str], labels: Sequence[str],
                what: str) -> list[str]:
    rows = []
    for pair in pairs:
        cells = []
        for m in metrics:
            t = pair[what][m]
            cells.append(f"{t['diff']:+.3f} [{t['ci_low']:+.3f}, {t['ci_high']:+.3f}] "
                         f"p={t['p_value']:.3g}{'' if t['exact'] else '*'} q={t['q_value']:.3g}")
        rows.append([f"{pair['a']} - {pair['b']}"] + cells)
    return _table(["A - B"] + labels, rows)


def plot_study(runs: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]], metrics: Sequence[str],
               path: Path) -> None:
    """One panel per metric; per variant the mean over seeds and a band of ± one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not metrics:
        return
    cols = min(4, len(metrics))
    nrows = -(-len(metrics) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for k, m in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        for name, by_seed in runs.items():
            n = min(len(rows) for rows in by_seed.values())
            vals = np.array([metric_values(list(rows)[:n], m) for rows in by_seed.values()])  # [seeds, steps]
            steps = np.arange(1, n + 1)
            with warnings.catch_warnings():  # a tag no seed measured at a step: a gap in the line
                warnings.simplefilter("ignore", RuntimeWarning)
                mean = np.nanmean(vals, 0)
                sd = np.nanstd(vals, 0, ddof=1) if vals.shape[0] > 1 else None
            line, = ax.plot(steps, mean, label=name)
            if sd is not None:
                ax.fill_between(steps, mean - sd, mean + sd, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(_label(m))
        ax.set_xlabel("step")
    for k in range(len(metrics), nrows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
