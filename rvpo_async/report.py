"""The run directory: per-step metrics (jsonl), report.json, report.md and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rvpo_async.fileio import atomic_write


class StepLog:
    """Appends one JSON object per training step (and one per evaluation, `"kind": "eval"`) to
    <run>/metrics.jsonl (flushed each row), and hands each row to the experiment trackers."""

    def __init__(self, run_dir: Path, append: bool = False, through_step: int | None = None,
                 trackers: Any = None) -> None:
        """append: continue a resumed run's file, keeping its rows up to `through_step` (the checkpoint's
        step): rows a crashed run wrote after its last checkpoint describe steps the resume trains again."""
        self.path = run_dir / "metrics.jsonl"
        self.trackers = trackers
        self.rows: list[dict[str, Any]] = []
        if append and self.path.is_file():
            self.rows = [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]
            if through_step is not None and any(r.get("step", 0) > through_step for r in self.rows):
                self.rows = [r for r in self.rows if r.get("step", 0) <= through_step]
                atomic_write(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))
        self._fh = open(self.path, "a" if append else "w")

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        self._fh.write(json.dumps(row) + "\n")
        self._fh.flush()
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self) -> None:
        self._fh.close()


def eval_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind") == "eval"]


def train_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if r.get("kind", "train") != "eval"]


def summarise_eval(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """First, best (highest share of responses meeting every constraint, then lowest reward per response)
    and last evaluation."""
    ev = eval_rows(rows)
    if not ev:
        return None

    def pick(r: dict[str, Any]) -> dict[str, Any]:
        e = r["eval"]
        return {"step": r["step"], "policy_version": r.get("policy_version"), "reward_mean": e["reward_mean"],
                "worst_reward_mean": e["worst_reward_mean"], "all_met_share": e["all_met_share"]}

    best = max(ev, key=lambda r: (r["eval"]["all_met_share"], r["eval"]["worst_reward_mean"], -r["step"]))
    return {"evaluations": len(ev), "first": pick(ev[0]), "best": pick(best), "last": pick(ev[-1]),
            "generate_s_mean": sum(r["eval"].get("generate_s", 0.0) for r in ev) / len(ev)}


def summarise(rows: Sequence[dict[str, Any]], reward_names: Sequence[str], *, mode: str, aggregator: str,
              wall_seconds: float, samples: int, generated_tokens: int, extra: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    all_rows, rows = rows, train_rows(rows)
    last = rows[-1] if rows else {}
    tail = rows[-max(1, len(rows) // 5):] if rows else []  # final mean: the last fifth of the run
    rewards = {n: (sum(r["reward_mean"][n] for r in tail) / len(tail)) if tail else None for n in reward_names}
    stal = [s for r in rows for s in r.get("staleness_values", [])]
    report = {
        "mode": mode,
        "aggregator": aggregator,
        "steps": int(last.get("step", 0)),
        "policy_version": int(last.get("policy_version", 0)),
        "wall_seconds": wall_seconds,
        "samples_trained": samples,
        "samples_per_second": samples / wall_seconds if wall_seconds > 0 else 0.0,
        "generated_tokens": generated_tokens,
        "generated_tokens_per_second": generated_tokens / wall_seconds if wall_seconds > 0 else 0.0,
        "rewards": rewards,
        "rewards_first_step": dict(rows[0]["reward_mean"]) if rows else {},
        "staleness": {"mean": sum(stal) / len(stal) if stal else 0.0, "max": max(stal) if stal else 0},
        "inter_reward_variance_final": last.get("inter_variance"),
        # each response's lowest reward, averaged: 1 only when every response meets every reward
        "worst_reward": (sum(r["worst_reward_mean"] for r in tail) / len(tail)
                         if tail and all("worst_reward_mean" in r for r in tail) else None),
        "worst_reward_first_step": rows[0].get("worst_reward_mean") if rows else None,
        # the risk coefficient at the first and last step (algo.k_risk_schedule)
        "k_risk": {"first": rows[0].get("k_risk"), "final": last.get("k_risk")} if rows else None,
    }
    evaluation = summarise_eval(all_rows)
    if evaluation is not None:
        report["eval"] = evaluation
    if extra:
        report.update(extra)
    return report


def write_reports(run_dir: Path, report: dict[str, Any], rows: Sequence[dict[str, Any]],
                  reward_names: Sequence[str]) -> None:
    atomic_write(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    lines = [
        f"# rvpo-async run: {report['mode']} / {report['aggregator']}",
        "",
        f"- steps: {report['steps']} (policy version {report['policy_version']})",
        f"- wall time: {report['wall_seconds']:.1f} s",
        f"- samples trained: {report['samples_trained']} ({report['samples_per_second']:.2f} samples/s)",
        f"- generated tokens: {report['generated_tokens']} ({report['generated_tokens_per_second']:.0f} tokens/s)",
        f"- staleness: mean {report['staleness']['mean']:.2f}, max {report['staleness']['max']}",
        "",
        "| reward | first step | final (mean of last fifth of steps) |",
        "|---|---|---|",
    ]
    for n in reward_names:
        first = report["rewards_first_step"].get(n)
        final = report["rewards"].get(n)
        lines.append(f"| {n} | {first:.3f} | {final:.3f} |" if first is not None and final is not None
                     else f"| {n} | - | - |")
    if report.get("worst_reward") is not None and report.get("worst_reward_first_step") is not None:
        lines.append(f"| lowest reward per response | {report['worst_reward_first_step']:.3f} | "
                     f"{report['worst_reward']:.3f} |")
    lines += ["", "Plots: `rewards.png` (each reward over steps), `inter_variance.png` (inter-reward variance).", ""]
    if report.get("eval"):
        lines += eval_lines(report["eval"], reward_names)
    atomic_write(run_dir / "report.md", "\n".join(lines))
    plot_run(run_dir, train_rows(rows), reward_names)
    if eval_rows(rows):
        plot_eval(run_dir, eval_rows(rows), reward_names)


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def eval_lines(ev: dict[str, Any], reward_names: Sequence[str]) -> list[str]:
    cols = [ev["first"], ev["best"], ev["last"]]
    lines = [f"## Held-out evaluation ({ev['evaluations']} evaluations; mean generation "
             f"{ev['generate_s_mean']:.2f} s each)", "",
             f"| | first (step {cols[0]['step']}) | best (step {cols[1]['step']}) | last (step {cols[2]['step']}) |",
             "|---|---|---|---|"]
    for n in reward_names:
        lines.append(f"| {n} | " + " | ".join(_fmt(c["reward_mean"].get(n)) for c in cols) + " |")
    lines.append("| lowest reward per response | " + " | ".join(_fmt(c["worst_reward_mean"]) for c in cols) + " |")
    lines.append("| share meeting every constraint | " + " | ".join(_fmt(c["all_met_share"]) for c in cols) + " |")
    return lines + ["", "Plot: `eval.png` (held-out rewards over steps).", ""]


def plot_eval(run_dir: Path, rows: Sequence[dict[str, Any]], reward_names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in reward_names:
        ax.plot(steps, [r["eval"]["reward_mean"].get(n) for r in rows], marker="o", label=n)
    ax.plot(steps, [r["eval"]["worst_reward_mean"] for r in rows], "k--", marker="s", label="lowest per response")
    ax.plot(steps, [r["eval"]["all_met_share"] for r in rows], "k:", marker="^", label="all constraints met")
    ax.set_xlabel("step")
    ax.set_ylabel("held-out mean")
    ax.set_title("held-out evaluation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(run_dir / "eval.png", dpi=80)
    plt.close(fig)


def plot_run(run_dir: Path, rows: Sequence[dict[str, Any]], reward_names: Sequence[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in reward_names:
        ax.plot(steps, [r["reward_mean"][n] for r in rows], label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("rewards per step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "rewards.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, [r["inter_variance"] for r in rows], color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("var_k(Z), mean over responses")
    ax.set_title("inter-reward variance")
    fig.tight_layout()
    fig.savefig(run_dir / "inter_variance.png", dpi=80)
    plt.close(fig)
