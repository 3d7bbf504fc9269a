"""The driver: a rollout loop and a training loop over the actors of rvpo_async.pipeline.

Data moves between actors without passing through here: a rollout engine (actors/rollout/streaming.py) puts each
finished group into the buffer and hands it to the judge service, which writes the rewards into the buffer;
learner ranks read their batch from the buffer through an object reference. The driver holds counts,
versions and control only:

- `rollout_loop` (the main thread): admits groups to the engines under the staleness bound
  (rvpo_async.staleness.admission_capacity, AReaL's rule: groups being judged count), hears which groups
  were delivered (ids and token counts), recovers a dead engine, and runs the live control and gauges.
- `training_loop` (a thread): pulls the next batch reference from the buffer, trains one step, broadcasts
  the weights, and writes the step row.

async mode runs the two loops together, so generation overlaps training. sync mode is the baseline:
generate -> judge -> train -> broadcast, one step at a time. With staleness.max_staleness = 0 the async
loops admit exactly one step of groups per policy version, so they train on the same data as sync mode
(tests/e2e/test_train.py checks it).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ray

from rvpo_async.config import Config, dump_config
from rvpo_async.evaluate import Evaluator
from rvpo_async.pipeline import Pipeline, build_pipeline, init_ray
from rvpo_async.report import StepLog, summarise, write_reports
from rvpo_async.run_dir import prepare_run_dir, resolve_auto_resume
from rvpo_async.run_state import RunState
from rvpo_async.staleness import admission_capacity
from rvpo_async.steps import ActorDied, Stepper, actor_failure, actor_name
from rvpo_async.tracking import start_trackers

log = logging.getLogger("rvpo_async")

__all__ = ["Interrupted", "prepare_run_dir", "resolve_auto_resume", "train"]


# the longest a loop blocks on an event (a batch becoming ready, an update landing) before it looks at the rest
_WAIT_S = 0.1
_POLL_S = 0.05  # how often the rollout loop hears the engines while it waits for a landing


class Interrupted(RuntimeError):
    """The run was stopped by SIGINT/SIGTERM after writing a final checkpoint."""


def _progress(cfg: Config):
    from tqdm import tqdm

    return tqdm(total=cfg.run.steps, desc=f"rvpo {cfg.run.mode}", unit="step", disable=not cfg.run.progress,
                dynamic_ncols=True)


class Run:
    """What both loops share: the actors, the step logic, the counters (under `lock`), and the groups each
    engine holds (ids, prompts and seeds only, so a dead engine's groups can be generated again)."""

    def __init__(self, p: Pipeline, stepper: Stepper, state: RunState, stop: threading.Event) -> None:
        self.p, self.stepper, self.state, self.stop = p, stepper, state, stop
        self.lock = threading.Lock()
        self.held: list[dict[int, tuple]] = [{} for _ in p.engines]  # engine -> group id -> (prompt, id, seed)
        self.error: BaseException | None = None
        self.admitted_at = -1  # the synced version the last admission counted from

    def going(self) -> bool:
        return self.state.step < self.p.cfg.run.steps and not self.stop.is_set() and self.error is None

    # ------------------------------------------------------------ rollout side
    def admit(self, limit: int | None = None) -> int:
        """Start as many groups as the staleness bound admits (at most `limit`), spread over the engines."""
        cfg = self.p.cfg
        with self.lock:
            self.stepper.advance_synced()
            self.admitted_at = self.state.synced_version
            cap = admission_capacity(self.state.synced_version, self.state.submitted_groups,
                                     cfg.rollout.groups_per_step, cfg.staleness.max_staleness)
            n = cap if limit is None else min(cap, limit)
            if n <= 0:
                return 0
            prompts, gids, seeds = self.state.take_prompts(n)
            self.state.submitted_groups += n
        order = sorted(range(len(self.p.engines)), key=lambda i: len(self.held[i]))
        per = -(-n // len(order))
        for k, i in enumerate(order):
            part = slice(k * per, (k + 1) * per)
            if not gids[part]:
                break
            for item in zip(prompts[part], gids[part], seeds[part]):
                self.held[i][int(item[1])] = item
            self._call(i, self.p.engines[i].submit.remote(prompts[part], gids[part], seeds[part]))
        return n

    def collect(self) -> int:
        """Hear which groups the engines delivered to the buffer and the judges; returns how many."""
        moved = 0
        for i, eng in enumerate(self.p.engines):
            report = self._call(i, eng.poll.remote())
            if report is None:
                continue
            for d in report["delivered"]:
                self.held[i].pop(int(d["group_id"]), None)
            if report["failed"]:
                self._engine_failed(i, report["failed"])
            self.stepper.on_delivered(report["delivered"])
            moved += len(report["delivered"])
        return moved

    def _call(self, i: int, ref: Any) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._recover(i, e)
        except ray.exceptions.RayTaskError as e:
            raise actor_failure(self.p.engine_names[i], e) from None
        return None

    def _recover(self, i: int, err: BaseException) -> None:
        """Engine i died: wait for its restart, bring it to the latest weights, generate its groups again."""
        self.stepper.recover_engine(i, err)
        lost = self.held[i]
        self.held[i] = {}
        known = set(ray.get(self.p.buffer.known_group_ids.remote(sorted(lost))))  # delivered before it died
        again = [item for gid, item in sorted(lost.items()) if gid not in known]
        with self.lock:
            self.state.requeue(again)
            self.state.submitted_groups -= len(again)

    def _engine_failed(self, i: int, failed: list[dict[str, Any]]) -> None:
        self.stepper.check_sinks()  # a dead buffer or judge service is named as such (and recoverable)
        first = failed[0]
        raise RuntimeError(f"actor '{self.p.engine_names[i]}' failed: group {first['group_id']}: {first['error']}")

    def tick(self) -> int:
        with self.lock:
            self.stepper.tick()
            return self.stepper.collect_eval()

    # ------------------------------------------------------------ training side
    def train_one(self, bar: Any) -> bool:
        """Pull a batch (a reference: its rows go from the buffer to the learner ranks) and train a step; the
        engines load the new weights while the next step trains (admit() counts from them once loaded)."""
        pulled = self.stepper.pull(wait_s=_WAIT_S)
        if pulled is None:
            return False
        result = self.stepper.train_on(pulled, wait_for_engines=False)
        with self.lock:
            self.stepper.finish_step(result, bar)
        return True


def rollout_loop(run: Run) -> None:
    while run.going():
        moved = run.admit() + run.collect() + run.tick()
        if not moved:  # only a landed update admits more: wait for one, hearing the engines every _POLL_S
            run.stepper.wait_landing(run.admitted_at, _POLL_S)


def training_loop(run: Run, bar: Any) -> None:
    try:
        while run.going():
            run.train_one(bar)  # its pull waits up to _WAIT_S for a batch
    except BaseException as e:  # the rollout loop sees it and stops; train() raises it
        run.error = e


def run_async(run: Run, bar: Any) -> None:
    trainer = threading.Thread(target=training_loop, args=(run, bar), name="rvpo-train", daemon=True)
    trainer.start()
    try:
        rollout_loop(run)
    except BaseException as e:
        run.error = run.error or e  # the training loop stops at its next check
        raise
    finally:
        trainer.join()
    if run.error is not None:
        raise run.error


def run_sync(run: Run, bar: Any) -> None:
    """generate -> judge -> train -> broadcast, one step at a time."""
    gps = run.p.cfg.rollout.groups_per_step
    while run.going():
        t0 = time.perf_counter()
        run.admit(limit=gps)
        while any(run.held) and not run.stop.is_set():
            if not run.collect():
                time.sleep(0.005)
        t1 = time.perf_counter()
        pulled = None
        while pulled is None and not run.stop.is_set():
            run.tick()
            pulled = run.stepper.pull(min_groups=gps, wait_s=_WAIT_S)
        if pulled is None:
            return
        t2 = time.perf_counter()
        result = run.stepper.train_on(pulled)
        result["timing"] = {"generate_s": t1 - t0, "judge_s": t2 - t1, "train_and_sync_s": time.perf_counter() - t2}
        with run.lock:
            run.stepper.finish_step(result, bar)
        run.tick()


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
        t_start, cpu_start = time.perf_counter(), time.process_time()
        with _progress(cfg) as bar:
            bar.update(state.step)
            (run_sync if cfg.run.mode == "sync" else run_async)(Run(p, stepper, state, stop), bar)
        wall, driver_cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
        stepper.collect_eval(wait=not interrupted)
        stepper.checkpoint()  # the final one
        stepper.export_final_model()
        steplog.close()
        report = summarise(steplog.rows, cfg.reward_names, mode=cfg.run.mode, aggregator=cfg.algo.aggregator,
                           wall_seconds=wall, samples=state.trained_samples_this_run,
                           generated_tokens=state.generated_tokens_this_run,
                           extra={**stepper.report_extra(), "recoveries": recoveries,
                                  # the driver process's CPU time over the loops (all its threads)
                                  "driver_cpu_s": driver_cpu,
                                  "driver_cpu_s_per_sample": driver_cpu / max(state.trained_samples_this_run, 1)})
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
