"""The driver: two loops over the actors of rvpo_async.pipeline.

async mode: one event loop on the driver keeps every rollout engine busy (admission-controlled:
  rvpo_async.staleness.admission_capacity), forwards generated groups to the buffer and the judge pool,
  forwards judge results to the buffer, and, in a background thread, pulls ready groups, computes RVPO
  advantages, trains one step and broadcasts the new weights. Generation overlaps training.
sync mode: generate -> judge -> train -> broadcast, one step at a time, no overlap (the baseline).

With staleness.max_staleness = 0 the async loop admits exactly one step of groups per policy version,
so it trains on the same data as sync mode (tests/e2e/test_train.py checks it).
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import ray

from rvpo_async.config import Config, dump_config
from rvpo_async.evaluate import Evaluator
from rvpo_async.pipeline import Pipeline, build_pipeline, init_ray
from rvpo_async.report import StepLog, summarise, write_reports
from rvpo_async.staleness import admission_capacity
from rvpo_async.run_state import RunState
from rvpo_async.steps import ActorDied, Stepper, actor_failure, actor_name
from rvpo_async.tracking import start_trackers

log = logging.getLogger("rvpo_async")


class Interrupted(RuntimeError):
    """The run was stopped by SIGINT/SIGTERM after writing a final checkpoint."""


def _progress(cfg: Config):
    from tqdm import tqdm

    return tqdm(total=cfg.run.steps, desc=f"rvpo {cfg.run.mode}", unit="step", disable=not cfg.run.progress,
                dynamic_ncols=True)


class AsyncLoop:
    """Admission-controlled rollout overlapping training (see module docstring)."""

    def __init__(self, p: Pipeline, stepper: Stepper, state: RunState) -> None:
        self.p, self.stepper, self.state = p, stepper, state
        self.gen_inflight: dict[Any, tuple[int, list]] = {}  # ref -> (engine index, prompts)
        self.put_inflight: dict[Any, Any] = {}  # ref -> group
        self.busy: set[int] = set()
        self.train_future: Future | None = None

    def _launch_generation(self) -> None:
        cfg = self.p.cfg
        gps = cfg.rollout.groups_per_step
        per_call = -(-gps // len(self.p.engines))
        for i, eng in enumerate(self.p.engines):
            if i in self.busy:
                continue
            cap = admission_capacity(self.state.synced_version, self.state.submitted_groups, gps,
                                     cfg.staleness.max_staleness)
            n = min(cap, per_call)
            if n <= 0:
                return
            prompts, gids, seeds = self.state.take_prompts(n)
            ref = eng.generate.remote(prompts, gids, seeds)
            self.gen_inflight[ref] = (i, list(zip(prompts, gids, seeds)))
            self.busy.add(i)
            self.state.submitted_groups += n

    def _collect_generation(self) -> int:
        if not self.gen_inflight:
            return 0
        done, _ = ray.wait(list(self.gen_inflight), num_returns=len(self.gen_inflight), timeout=0)
        for ref in done:
            i, items = self.gen_inflight.pop(ref)
            self.busy.discard(i)
            try:
                groups = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                # a restarted engine catches up to the latest weights, then its prompts are retried
                self.stepper.recover_engine(i, e)
                self.state.requeue(items)
                self.state.submitted_groups -= len(items)
                continue
            except ray.exceptions.RayTaskError as e:
                raise actor_failure(self.p.engine_names[i], e) from None
            self.stepper.on_generated(groups)
            for g in groups:
                self.put_inflight[self.p.buffer.put_group.remote(g)] = g
        return len(done)

    def _collect_puts(self) -> int:
        if not self.put_inflight:
            return 0
        done, _ = ray.wait(list(self.put_inflight), num_returns=len(self.put_inflight), timeout=0)
        for ref in done:
            g = self.put_inflight.pop(ref)
            try:
                ray.get(ref)
            except ray.exceptions.RayError as e:
                raise actor_failure("buffer", e) from None
            self.p.judges.submit(g)
        return len(done)

    def run(self, stop: threading.Event, bar: Any) -> None:
        cfg = self.p.cfg
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rvpo-train")
        pull_due, next_pull = True, 0.0
        try:
            while self.state.step < cfg.run.steps and not stop.is_set():
                self._launch_generation()
                progress = self._collect_generation() + self._collect_puts()
                scored = self.stepper.forward_judge_results(timeout_s=0.01)
                progress += scored + self.stepper.collect_eval()
                pull_due = pull_due or scored > 0
                self.stepper.tick()
                if self.train_future is not None and self.train_future.done():
                    self.stepper.finish_step(self.train_future.result(), bar)
                    self.train_future = None
                    progress += 1
                # ask the buffer only when new rewards arrived (or now and then): a pull is a round trip
                if self.train_future is None and self.state.step < cfg.run.steps and \
                        (pull_due or time.monotonic() >= next_pull):
                    table = self.stepper.try_pull()
                    pull_due, next_pull = False, time.monotonic() + 0.25
                    if table is not None:
                        self.train_future = pool.submit(self.stepper.train_on, table)
                        progress += 1
                if not progress:
                    time.sleep(0.01)  # nothing moved: do not spin a core the actors need
            if self.train_future is not None:
                self.stepper.finish_step(self.train_future.result(), bar)
        finally:
            pool.shutdown(wait=True)


def run_sync(p: Pipeline, stepper: Stepper, state: RunState, stop: threading.Event, bar: Any) -> None:
    """generate -> judge -> train -> broadcast, one step at a time."""
    cfg = p.cfg
    gps = cfg.rollout.groups_per_step
    while state.step < cfg.run.steps and not stop.is_set():
        t0 = time.perf_counter()
        prompts, gids, seeds = state.take_prompts(gps)
        state.submitted_groups += gps
        per = -(-gps // len(p.engines))
        refs = [(i, eng.generate.remote(prompts[i * per:(i + 1) * per], gids[i * per:(i + 1) * per],
                                        seeds[i * per:(i + 1) * per]))
                for i, eng in enumerate(p.engines) if prompts[i * per:(i + 1) * per]]
        groups = []
        for i, ref in refs:
            try:
                groups += ray.get(ref)
            except ray.exceptions.RayError as e:
                raise actor_failure(p.engine_names[i], e) from None
        stepper.on_generated(groups)
        t1 = time.perf_counter()
        ray.get([p.buffer.put_group.remote(g) for g in groups])
        for g in groups:
            p.judges.submit(g)
        table = None
        while table is None:
            stepper.forward_judge_results(timeout_s=0.05)
            stepper.tick()
            table = stepper.try_pull(min_groups=gps)
            if stop.is_set():
                return
        t2 = time.perf_counter()
        result = stepper.train_on(table)
        result["timing"] = {"generate_s": t1 - t0, "judge_s": t2 - t1, "train_and_sync_s": time.perf_counter() - t2}
        stepper.finish_step(result, bar)
        stepper.collect_eval()


def prepare_run_dir(cfg: Config) -> Path:
    """A fresh run refuses to mix with a previous run's files unless run.overwrite says so."""
    run_dir = Path(cfg.run.output_dir)
    leftovers = [n for n in ("checkpoints", "buffer", "metrics.jsonl") if (run_dir / n).exists()]
    if leftovers and not cfg.run.resume:
        if not cfg.run.overwrite:
            raise FileExistsError(f"run.output_dir {run_dir} already holds a run ({', '.join(leftovers)}); "
                                  f"continue it with --resume, or set run.overwrite=true to replace it")
        for n in leftovers + ["final_model", "tracking", "eval.png"]:  # tracker files would mix two runs
            target = run_dir / n
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


# keys that may differ between a run and its continuation
_RESUMABLE_CHANGES = {"run.steps", "run.resume", "run.overwrite", "run.auto_resume", "run.progress"}


def resolve_auto_resume(cfg: Config) -> Config:
    """run.auto_resume: continue the run in output_dir when it holds a checkpoint of the same config (a retried
    driver resumes its own run), or start afresh, replacing what a run that never checkpointed left behind."""
    if not cfg.run.auto_resume:
        return cfg
    from learner.checkpoint import find_latest
    from rvpo_async.config import load_config

    run_dir = Path(cfg.run.output_dir)
    if find_latest(str(run_dir / "checkpoints")) is None:
        log.info("run.auto_resume: no checkpoint under %s, starting a fresh run", run_dir)
        return cfg.override("run.auto_resume=false", "run.overwrite=true")
    now = _flat(cfg.to_dict())
    before = _flat(load_config(run_dir / "config.yaml").to_dict()) if (run_dir / "config.yaml").is_file() else {}
    differ = sorted(k for k in now.keys() | before.keys() if k not in _RESUMABLE_CHANGES and now.get(k) != before.get(k))
    if differ:
        raise ValueError(f"run.auto_resume: {run_dir} holds a checkpoint of a different config (keys that differ: "
                         f"{', '.join(differ[:8])}); use another run.output_dir or run.overwrite=true")
    log.info("run.auto_resume: resuming the run in %s", run_dir)
    return cfg.override("run.auto_resume=false", "run.resume=true", "run.overwrite=false")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys of the config sections (mappings that are values, like resources, stay whole)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and (not prefix or k == "engine"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def train(cfg: Config, on_pipeline: Callable[[Pipeline], None] | None = None) -> dict[str, Any]:
    """Run the configured training end to end; returns report.json's content.

    When an actor dies (learner rank, buffer, rollout engine past its own restarts, judge engine), the run
    recovers by itself up to run.max_restarts times: every actor is stopped and built again, and the run
    resumes from its latest checkpoint (the same path as --resume after a crash). Exhausting the budget, or a
    death before the first checkpoint, stops the run with the actor, the cause and the counts.
    `on_pipeline` sees the actors of each attempt once they are built (rvpo_async.chaos kills them)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = resolve_auto_resume(cfg)
    started_ray = init_ray(cfg)
    stop = threading.Event()
    interrupted: list[str] = []

    def on_signal(signum: int, _frame: Any) -> None:
        interrupted.append(signal.Signals(signum).name)
        stop.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    recoveries: list[dict[str, Any]] = []
    try:
        while True:
            try:
                return _run(cfg, stop, interrupted, recoveries, on_pipeline)
            except (ActorDied, ray.exceptions.RayActorError) as e:
                died = e if isinstance(e, ActorDied) else actor_failure("an actor", e)
                from learner.checkpoint import find_latest

                ckpt = find_latest(str(Path(cfg.run.output_dir) / "checkpoints"))
                if stop.is_set() or ckpt is None or len(recoveries) >= cfg.run.max_restarts:
                    why = ("stopping" if stop.is_set() else "no checkpoint to recover from yet" if ckpt is None
                           else f"run.max_restarts={cfg.run.max_restarts} recoveries used")
                    raise RuntimeError(f"{died} ({why}; {len(recoveries)} recoveries so far)") from None
                log.warning("%s; recovering from checkpoint %s (recovery %d of %d)", died, ckpt.name,
                            len(recoveries) + 1, cfg.run.max_restarts)
                recoveries.append({"actor": getattr(died, "actor", "?"), "cause": str(died), "time": time.time(),
                                   "checkpoint": ckpt.name})
                cfg = cfg.override("run.resume=true", "run.overwrite=false")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if started_ray:
            ray.shutdown()


def _run(cfg: Config, stop: threading.Event, interrupted: list[str], recoveries: list[dict[str, Any]],
         on_pipeline: Callable[[Pipeline], None] | None) -> dict[str, Any]:
    """One attempt: build every actor, train until run.steps (or a signal), write the reports."""
    run_dir = prepare_run_dir(cfg)
    dump_config(cfg, run_dir / "config.yaml")
    p = trackers = stepper = None
    try:
        p = build_pipeline(cfg, run_dir)
        state = RunState.start(cfg, p.prompts)
        stepper = Stepper(p, state, run_dir)
        if cfg.run.resume:
            replay = stepper.resume()
            if recoveries:
                recoveries[-1].update(replay)
        if on_pipeline is not None:
            on_pipeline(p)
        trackers = start_trackers(cfg, run_dir)
        steplog = StepLog(run_dir, append=cfg.run.resume, through_step=state.step, trackers=trackers)
        stepper.steplog = steplog
        if cfg.eval.every:
            stepper.evaluator = Evaluator(cfg, p.engines, p.eval_prompts, p.judge_engines)
        t_start = time.perf_counter()
        with _progress(cfg) as bar:
            bar.update(state.step)
            if cfg.run.mode == "sync":
                run_sync(p, stepper, state, stop, bar)
            else:
                AsyncLoop(p, stepper, state).run(stop, bar)
        wall = time.perf_counter() - t_start
        stepper.collect_eval(wait=not interrupted)
        stepper.checkpoint()  # the final one
        stepper.export_final_model()
        steplog.close()
        report = summarise(steplog.rows, cfg.reward_names, mode=cfg.run.mode, aggregator=cfg.algo.aggregator,
                           wall_seconds=wall, samples=state.trained_samples_this_run,
                           generated_tokens=state.generated_tokens_this_run,
                           extra={**stepper.report_extra(), "recoveries": recoveries})
        write_reports(run_dir, report, steplog.rows, cfg.reward_names)
        trackers.close()
        if interrupted:
            raise Interrupted(f"stopped by {interrupted[0]} at step {state.step}; checkpoint written to {run_dir}")
        return report
    except ray.exceptions.RayActorError as e:  # a call without its own handler: name the actor it was about
        raise actor_failure(actor_name(p, e) or "an actor", e) from None
    finally:
        if trackers is not None:
            trackers.close()
        if stepper is not None and stepper.evaluator is not None:
            stepper.evaluator.close()
        if p is not None:
            p.shutdown()
