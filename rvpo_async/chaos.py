"""`rvpo-async chaos`: a training run that survives its actors being killed, and a ledger that reconciles.

While the configured run trains, a killer thread kills (ray.kill, by actor id) a learner rank, the buffer
and a rollout engine once each, spread over `duration` seconds (or over the run's steps, when it ends
sooner), and a judge worker every `judge_every` seconds. Each kill waits for the previous one to be recovered from (a step trained after it), and the
learner and buffer kills wait for the run's first checkpoint, which in-run recovery resumes from. At the end
it prints each kill with the seconds until the next trained step and the groups generated again, then the
group ledger. Exit status 0 only when every step was trained, every scheduled kill happened and
admitted = trained + dropped + in flight.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import ray

from rvpo_async.config import Config
from rvpo_async.pipeline import Pipeline

KINDS = ("learner", "buffer", "rollout", "judge")


@dataclass
class Kill:
    kind: str
    actor_id: str
    at: float  # wall-clock time of the kill
    pipeline: int  # id() of the attempt's actors it was killed in
    recovered_s: float | None = None
    generated_again: int | None = None


def _targets(p: Pipeline, kind: str) -> list[Any]:
    if kind == "learner":
        return list(p.learner.actors)
    if kind == "buffer":
        return [p.buffer]
    if kind == "rollout":
        return list(p.engines)
    try:
        return list(ray.get(p.judges.worker_handles.remote(), timeout=30).values())
    except (ray.exceptions.RayError, TimeoutError):  # an attempt being torn down: try the next one
        return []


class Killer:
    def __init__(self, cfg: Config, kinds: Sequence[str], duration_s: float, judge_every_s: float, seed: int = 0):
        self.cfg, self.duration_s, self.judge_every_s = cfg, duration_s, judge_every_s
        once = [k for k in ("learner", "buffer", "rollout") if k in kinds]
        self.plan = [(k, (i + 1) / (len(once) + 1)) for i, k in enumerate(once)]  # (kind, share of the run)
        self.judges = "judge" in kinds
        self.kills: list[Kill] = []
        self.missed: list[str] = []
        self.pipeline: Pipeline | None = None
        self.pipeline_since = 0.0  # when the current attempt's actors were built
        self.stop = threading.Event()
        self._rng = random.Random(seed)
        self._run_dir = Path(cfg.run.output_dir)

    def on_pipeline(self, p: Pipeline) -> None:
        self.pipeline, self.pipeline_since = p, time.time()

    def _settled(self, last: Kill | None) -> bool:
        """The previous kill is recovered from: a step was trained after it, by a rebuilt set of actors when
        the kill forces a recovery from the checkpoint."""
        if last is None:
            return True
        if last.kind in ("learner", "buffer"):
            return id(self.pipeline) != last.pipeline and self._steps_after(self.pipeline_since)
        return self._steps_after(last.at)

    def _rows(self) -> list[dict[str, Any]]:
        path = self._run_dir / "metrics.jsonl"
        rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.is_file() else []
        return [r for r in rows if r.get("kind") != "eval"]

    def _steps_after(self, t: float) -> bool:
        return any(r.get("time", 0) > t for r in self._rows())

    def _checkpointed(self) -> bool:
        return (self._run_dir / "checkpoints" / "latest").is_file()

    def _kill(self, kind: str) -> bool:
        p = self.pipeline
        targets = _targets(p, kind) if p is not None else []
        if not targets:
            return False
        h = self._rng.choice(targets)
        ray.kill(h, no_restart=kind != "rollout")  # a rollout engine is restarted by Ray (rollout.max_restarts)
        self.kills.append(Kill(kind, h._actor_id.hex(), time.time(), id(p)))
        return True

    def run(self) -> None:
        while self.pipeline is None and not self.stop.is_set():  # the clock starts once the actors exist
            self.stop.wait(0.2)
        start = time.time()
        next_judge = start + self.judge_every_s
        plan = list(self.plan)
        judged = False
        while not self.stop.is_set():
            now = time.time()
            settled = self._settled(next((k for k in reversed(self.kills) if k.kind != "judge"), None))
            # a kill is due at its share of the duration, or of the run's steps if the run gets there first
            due = plan and (now - start >= plan[0][1] * self.duration_s or
                            len(self._rows()) >= plan[0][1] * self.cfg.run.steps)
            if due and settled and \
                    (plan[0][0] == "rollout" or self._checkpointed()):
                if self._kill(plan[0][0]):
                    plan.pop(0)
            if self.judges and now >= next_judge and (now - start <= self.duration_s or not judged):
                judged = self._kill("judge") or judged
                next_judge = now + self.judge_every_s
            self.stop.wait(0.2)
        self.missed = [k for k, _ in plan] + (["judge"] if self.judges and not judged else [])

    def account(self, report: dict[str, Any]) -> None:
        path = self._run_dir / "metrics.jsonl"
        times = [json.loads(ln)["time"] for ln in path.read_text().splitlines() if ln.strip()]
        recoveries = list(report.get("recoveries", []))
        for k in self.kills:
            after = [t for t in times if t > k.at]
            k.recovered_s = min(after) - k.at if after else None
            if k.kind in ("learner", "buffer"):
                rec = next((r for r in recoveries if r["time"] >= k.at - 1), None)
                if rec is not None:
                    recoveries.remove(rec)
                    k.generated_again = rec.get("generated_again", 0) + rec.get("dropped_after_checkpoint", 0)


def chaos(cfg: Config, kinds: Sequence[str], duration_s: float, judge_every_s: float) -> int:
    from rvpo_async.driver import train

    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise ValueError(f"unknown actor kind(s) {unknown} for --kill; valid: {', '.join(KINDS)}")
    if cfg.checkpoint.every < 1:
        raise ValueError("chaos needs checkpoints to recover from: set checkpoint.every >= 1")
    killer = Killer(cfg, kinds, duration_s, judge_every_s, seed=cfg.run.seed)
    thread = threading.Thread(target=killer.run, name="rvpo-chaos", daemon=True)
    thread.start()
    try:
        report = train(cfg, on_pipeline=killer.on_pipeline)
    finally:
        killer.stop.set()
        thread.join(timeout=10)
    killer.account(report)
    led = report["ledger"]
    reconciled = led["admitted"] == led["trained"] + sum(led["dropped"].values()) + led["in_flight"]
    print(f"\nchaos: {len(killer.kills)} kill(s) during a {report['steps']}-step run of {cfg.run.steps}")
    print(f"  {'kill':<8} {'actor id':<34} {'s to next step':>15} {'groups again':>13}")
    for k in killer.kills:
        rec = f"{k.recovered_s:.1f}" if k.recovered_s is not None else "-"
        again = str(k.generated_again) if k.generated_again is not None else "-"
        print(f"  {k.kind:<8} {k.actor_id:<34} {rec:>15} {again:>13}")
    print(f"  recoveries from a checkpoint: {len(report.get('recoveries', []))}")
    print(f"ledger: admitted {led['admitted']} = trained {led['trained']} + dropped {sum(led['dropped'].values())} "
          f"{led['dropped']} + in flight {led['in_flight']}: {'reconciled' if reconciled else 'DOES NOT RECONCILE'}")
    problems = []
    if report["steps"] != cfg.run.steps:
        problems.append(f"trained {report['steps']} of {cfg.run.steps} steps")
    if killer.missed:
        problems.append(f"never killed (the run ended first): {', '.join(killer.missed)}")
    if not reconciled:
        problems.append("the ledger does not reconcile")
    for msg in problems:
        print(f"chaos: FAILED: {msg}")
    return 1 if problems else 0
