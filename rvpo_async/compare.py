"""The constraint-neglect study: one task, the same seeds, several aggregators.

Each aggregator gets its own run directory under `out_dir`; the study writes `comparison.json`,
`comparison.md` (a table of every reward per aggregator, first step and final) and `comparison.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rvpo_async.config import load_config


def compare(config_path: str, overrides: Sequence[str], *, aggregators: Sequence[str], out_dir: str,
            seeds: Sequence[int] = (0,)) -> dict[str, Any]:
    from rvpo_async.driver import train

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {}
    names: list[str] = []
    for agg in aggregators:
        for seed in seeds:
            cfg = load_config(config_path, list(overrides) + [
                f"algo.aggregator={agg}", f"run.seed={seed}", f"run.output_dir={out / f'{agg}-seed{seed}'}",
                "run.resume=false"])
            names = cfg.reward_names
            report = train(cfg)
            rows = [json.loads(ln) for ln in (Path(cfg.run.output_dir) / "metrics.jsonl").read_text().splitlines()]
            rows = [r for r in rows if r.get("kind") != "eval"]  # training steps only
            results.setdefault(agg, []).append({"seed": seed, "report": report, "rows": rows})
    summary = _summarise(results, names)
    (out / "comparison.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "comparison.md").write_text(_table(summary, names))
    _plot(results, names, out / "comparison.png")
    print(_table(summary, names))
    return summary


def _summarise(results: dict[str, list[dict[str, Any]]], names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for agg, runs in results.items():
        first = {n: sum(r["report"]["rewards_first_step"][n] for r in runs) / len(runs) for n in names}
        final = {n: sum(r["report"]["rewards"][n] for r in runs) / len(runs) for n in names}
        out[agg] = {"seeds": [r["seed"] for r in runs], "first": first, "final": final,
                    "min_final": min(final.values()), "mean_final": sum(final.values()) / len(names),
                    "worst_first": _avg([r["report"].get("worst_reward_first_step") for r in runs]),
                    "worst_final": _avg([r["report"].get("worst_reward") for r in runs])}
    return out


def _avg(xs: Sequence[float | None]) -> float | None:
    return None if not xs or any(x is None for x in xs) else sum(xs) / len(xs)  # type: ignore[arg-type]


def _table(summary: dict[str, Any], names: Sequence[str]) -> str:
    head = "| aggregator | " + " | ".join(names) + " | mean | min | lowest per response |"
    sep = "|---" * (len(names) + 4) + "|"
    lines = ["Final mean reward (last fifth of steps; first step in parentheses). Lowest per response: each "
             "response's lowest reward, averaged (1 only when every response meets every reward).", "", head, sep]
    for agg, s in summary.items():
        cells = [f"{s['final'][n]:.3f} ({s['first'][n]:.3f})" for n in names]
        worst = ("-" if s.get("worst_final") is None or s.get("worst_first") is None
                 else f"{s['worst_final']:.3f} ({s['worst_first']:.3f})")
        lines.append(f"| {agg} | " + " | ".join(cells) + f" | {s['mean_final']:.3f} | {s['min_final']:.3f} | {worst} |")
    return "\n".join(lines) + "\n"


def _plot(results: dict[str, list[dict[str, Any]]], names: Sequence[str], path: Path) -> None:
    """One panel per reward, and a last one for each response's lowest reward (when the rows carry it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worst = all("worst_reward_mean" in row for runs in results.values() for r in runs for row in r["rows"])
    panels = [(n, lambda row, n=n: row["reward_mean"][n]) for n in names]
    if worst:
        panels.append(("lowest reward per response", lambda row: row["worst_reward_mean"]))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.5), squeeze=False)
    for k, (title, value) in enumerate(panels):
        ax = axes[0][k]
        for agg, runs in results.items():
            steps = min(len(r["rows"]) for r in runs)
            mean = [sum(value(r["rows"][i]) for r in runs) / len(runs) for i in range(steps)]
            ax.plot(range(1, steps + 1), mean, label=agg)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylim(-0.05, 1.05)
    axes[0][0].set_ylabel("mean reward (averaged over seeds)")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
