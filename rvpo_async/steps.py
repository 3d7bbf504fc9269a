"""What one training step does, shared by the async and sync loops (the run's counters: rvpo_async.run_state)."""

from __future__ import annotations

import logging
import shutil
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from rvpo_async.config import Config
from rvpo_async.fileio import brief_error
from rvpo_async.rubric_view import RUBRIC_ROW_KEYS, RubricView
from rvpo_async.rubric_view import nan_or as _nan
from rvpo_async.run_state import RunState
from rvpo_async.step_math import StepContext, step_row

if TYPE_CHECKING:
    from rvpo_async.evaluate import Evaluator
    from rvpo_async.pipeline import Pipeline
    from rvpo_async.report import StepLog

log = logging.getLogger("rvpo_async")


def describe_actor_error(name: str, err: BaseException) -> str:
    return f"actor '{name}' failed: {brief_error(getattr(err, 'cause', None) or err, limit=10_000)}"


class ActorDied(RuntimeError):
    """An actor of the run died (its process is gone, not an exception in its code): the run can recover by
    resuming from its latest checkpoint (rvpo_async.driver.train, run.max_restarts)."""

    def __init__(self, actor: str, message: str) -> None:
        super().__init__(message)
        self.actor = actor


def actor_name(p: "Pipeline", err: BaseException) -> str | None:
    """Which actor of pipeline `p` a RayActorError is about ("learner", "buffer", an engine's name), or None."""
    actor_id = getattr(err, "actor_id", None) or getattr(getattr(err, "cause", None), "actor_id", None)
    if not actor_id or p is None:
        return None
    named = [("learner", a) for a in getattr(p.learner, "actors", [])] + [("buffer", p.buffer)]
    named += list(zip(p.engine_names, p.engines)) + [(f"judge engine {n}", h) for n, h in p.judge_engines.items()]
    for name, handle in named:
        if getattr(handle, "_actor_id", None) is not None and handle._actor_id.hex() == actor_id:
            return name
    return None


def actor_failure(name: str, err: BaseException) -> RuntimeError:
    """The error that stops the run when a call to actor `name` failed: ActorDied when the actor is gone."""
    message = describe_actor_error(name, err)
    return ActorDied(name, message) if isinstance(err, ray.exceptions.RayActorError) else RuntimeError(message)


class Stepper:
    def __init__(self, p: "Pipeline", state: RunState, run_dir: Path) -> None:
        self.p, self.state, self.run_dir = p, state, run_dir
        self.cfg: Config = p.cfg
        self.steplog: "StepLog | None" = None
        self.evaluator: "Evaluator | None" = None  # when eval.every > 0
        self.ckpt_dir = run_dir / "checkpoints"
        self.timings: list[dict[str, float]] = []
        self.last_ckpt_version = -1
        self._next_tick = 0.0
        self.weights_lock = threading.Lock()  # a training step and its broadcast vs. an engine's catch-up
        self._seen = {"ready": 0, "dropped": 0}
        self.rubric = RubricView(self.cfg, state.prompts)
        p.learner.set_step_context(self.step_context())  # once: each step then sends only a table reference

    # ------------------------------------------------------------ data path
    def on_delivered(self, delivered: list[dict[str, Any]]) -> None:
        """Groups an engine put into the buffer and handed to the judges (ids and counts only)."""
        if not delivered:
            return
        tokens = sum(int(d["tokens"]) for d in delivered)
        self.state.generated_tokens_this_run += tokens
        if self.p.metrics:
            self.p.metrics.record_generation(tokens, sum(int(d["samples"]) for d in delivered))

    def pull(self, min_groups: int | None = None, wait_s: float = 0.0) -> Any:
        """A reference to the next batch, or None when fewer than `min_groups` groups are ready within `wait_s`
        (the buffer waits for them: no polling). Only the small meta object comes here: the learner ranks read
        the table from the object store themselves."""
        gps = self.cfg.rollout.groups_per_step
        try:
            meta, table = self.p.buffer.pull_split.remote(gps, self.state.version, min_groups=min_groups or gps,
                                                          wait_s=wait_s)
            return table if ray.get(meta)["groups"] else None
        except ray.exceptions.RayError as e:
            raise actor_failure("buffer", e) from None

    def check_sinks(self) -> None:
        """Raise, naming it, when the buffer or the judge service is gone or has stopped."""
        try:
            ray.get(self.p.buffer.stats.remote())
        except ray.exceptions.RayError as e:
            raise actor_failure("buffer", e) from None
        js = self.judge_stats()
        if js.get("error"):
            raise RuntimeError(f"actor 'judge service' failed: {js['error']}")

    def judge_stats(self) -> dict[str, Any]:
        try:
            return ray.get(self.p.judges.stats.remote())
        except ray.exceptions.RayError as e:
            raise actor_failure("judge service", e) from None

    def tick(self, force: bool = False) -> None:
        """About once a second: live judge-pool control, autoscaling and the buffer/judge gauges."""
        now = time.monotonic()
        if not force and now < self._next_tick:
            return
        self._next_tick = now + 1.0
        p, cfg = self.p, self.cfg
        if p.control is not None:
            n = ray.get(p.control.take_judge_workers.remote())
            if n is not None:
                try:
                    ray.get(p.judges.resize.remote(n))
                    log.info("judge pool resized to %d workers", n)
                except (ValueError, ray.exceptions.RayTaskError) as e:
                    log.warning("judge pool resize to %d refused: %s", n, e)
        self._close_dropped()
        observed = ray.get(p.judges.take_observations.remote())
        if p.metrics:
            judges = cfg.reward_judges  # labelled by judge spec, never by rubric slot
            for k, latency, status in observed:
                p.metrics.observe_judge(judges[k], latency, status)
            b = ray.get(p.buffer.stats.remote())
            g = cfg.rollout.group_size
            p.metrics.set_buffer(b["groups"]["pending"], b["groups"]["ready"])
            ready, dropped = b["groups_became_ready"], sum(b["dropped"].values())
            if ready > self._seen["ready"]:
                p.metrics.record_scored((ready - self._seen["ready"]) * g)
            if dropped > self._seen["dropped"]:
                p.metrics.record_dropped((dropped - self._seen["dropped"]) * g)
            self._seen = {"ready": ready, "dropped": dropped}
        js = self.judge_stats()
        if js.get("error"):
            raise RuntimeError(f"actor 'judge service' failed: {js['error']}")
        if p.metrics:
            p.metrics.set_judge_pool(js["num_workers"], js["queue_depth"])

    # ------------------------------------------------------------ training
    def step_context(self) -> StepContext:
        """What the learner ranks need to build a step from a table themselves (LearnerGroup.set_step_context)."""
        return StepContext(pad_id=int(self.p.pad_id), algo=self.cfg.algo, total_steps=self.cfg.run.steps,
                           rubric=self.rubric)

    def advance_synced(self) -> None:
        """state.synced_version (what admission control counts from) moves to the last update's version once
        every engine has loaded it: a weight sync that did not wait (train_on) lands here."""
        try:
            version = self.p.sync.landed()
        except ray.exceptions.RayError:  # the next sync raises it on the training side and catches engines up
            return
        if version is not None and version > self.state.synced_version:
            self.state.synced_version = version

    def wait_landing(self, after: int, timeout_s: float) -> None:
        """Until an update newer than version `after` has landed on every engine, at most `timeout_s`."""
        try:
            self.p.sync.wait_landing(after, timeout_s)
            self.p.sync.landed()  # raises an engine's failure of the update, which wait_landing returns at once for
        except ray.exceptions.RayError:  # as in advance_synced: the training side raises it; wait, do not spin
            time.sleep(timeout_s)

    def train_on(self, table_ref: Any, wait_for_engines: bool = True) -> dict[str, Any]:
        """One learner step on a pulled batch (the ranks build it and its advantages: rvpo_async.step_math),
        then the weight broadcast. Runs off the main thread."""
        with self.weights_lock:
            t0 = time.perf_counter()
            try:
                stats, info = self.p.learner.train_from_table(table_ref, self.p.loss_fn)
            except ray.exceptions.RayError as e:
                raise actor_failure("learner", e) from None
            t1 = time.perf_counter()
            version = self.p.learner.version
            try:
                # wait_for_engines=False: the engines load the weights once their responses in flight allow,
                # while the learner goes on; admission counts from the new version once it has landed
                sync_s = self.p.sync.sync(self.p.learner, self.p.engines, version, wait=wait_for_engines)
            except ray.exceptions.RayError as e:
                if actor_name(self.p, e) == "learner":  # the learner exports the weights: it is gone
                    raise actor_failure("learner", e) from None
                # an engine died or is restarting: wait for it and bring every engine to this version
                log.warning("weight sync to version %d failed (%s); catching engines up", version,
                            describe_actor_error(actor_name(self.p, e) or "rollout engine", e))
                self._catch_up_all(version)
                sync_s = time.perf_counter() - t1
        return {"stats": stats, **info, "version": version, "sync_s": sync_s, "train_s": t1 - t0,
                "synced": wait_for_engines}

    def finish_step(self, r: dict[str, Any], bar: Any) -> None:
        st = self.state
        st.step += 1
        st.version = int(r["version"])
        if r.get("synced", True):
            st.synced_version = st.version
        else:
            self.advance_synced()
        st.trained_samples_this_run += r["samples"]
        st.close_groups(r["group_ids"])
        stal = r["staleness_values"]
        if stal and max(stal) > self.cfg.staleness.max_staleness:
            raise AssertionError(f"trained a group of staleness {max(stal)} > max_staleness")
        row = step_row(r, self.cfg.reward_names, step=st.step, generated_tokens_total=st.generated_tokens_this_run,
                       trained_samples_total=st.trained_samples_this_run)
        if "timing" in r:
            row["timing"] = r["timing"]
            self.timings.append(r["timing"])
        self.steplog.write(row)
        m = self.p.metrics
        if m:
            ls = r["stats"]
            m.record_trained(r["tokens"], r["samples"], stal, r["train_s"],
                             is_truncated_ratio=float(ls["is_truncated_frac"]) + float(ls["is_masked_frac"]),
                             is_weight_mean=float(ls["is_weight_mean"]), is_weight_max=float(ls["is_weight_max"]))
            m.record_rewards({n: row["reward_mean"][n] for n in m.reward_names},
                             {n: row["reward_std"][n] for n in m.reward_names}, row["inter_variance"],
                             {n: row["bottleneck_share"][n] for n in m.reward_names},
                             worst_mean=row["worst_reward_mean"])
            if r.get("rubric"):
                m.record_rubric(*(_nan(row[k]) for k in RUBRIC_ROW_KEYS), row["rubric_criteria"],
                                row.get("rubric_met_by_tag"))
            m.set_policy_version(st.version)
            m.observe_weight_sync(r["sync_s"])
            m.record_objective(r["k_risk"], ls.get("kl_ref"))
        bar.update(1)
        bar.set_postfix({"tok/s": f"{st.generated_tokens_this_run / max(bar.format_dict['elapsed'], 1e-9):.0f}",
                         **{n[:8]: f"{row['reward_mean'][n]:.2f}" for n in self.rubric.rule_names},
                         **({"met": f"{_nan(row['rubric_met_ratio']):.2f}"} if r.get("rubric") else {}),
                         "stale": f"{sum(stal) / max(len(stal), 1):.1f}", "k": f"{r['k_risk']:.2f}"}, refresh=False)
        if self.evaluator is not None and self.evaluator.due(st.step):
            self.evaluator.start(st.step, min_version=st.version)
        every = self.cfg.checkpoint.every
        if every and st.step % every == 0 and st.step < self.cfg.run.steps:
            self.checkpoint()

    def collect_eval(self, wait: bool = False) -> int:
        """Write finished evaluations to metrics.jsonl and the rvpo_eval_* gauges; returns how many."""
        if self.evaluator is None:
            return 0
        rows = self.evaluator.collect(wait=wait)
        for row in rows:
            self.steplog.write(row)
            if self.p.metrics:
                self.p.metrics.record_eval(row["eval"]["reward_mean"], row["eval"]["worst_reward_mean"],
                                           row["eval"]["all_met_share"])
            log.info("evaluation at step %d: lowest reward per response %.3f, all constraints met %.3f",
                     row["step"], row["eval"]["worst_reward_mean"], row["eval"]["all_met_share"])
        return len(rows)

    # ------------------------------------------------------------ checkpoints
    def _extra_state(self) -> dict[str, Any]:
        st = self.state
        return {"step": st.step, "submitted_groups": st.submitted_groups, "prompts_taken": st.prompts_taken,
                "next_group_id": st.next_group_id, "requeued": [[p.prompt_id, g, s] for p, g, s in st.requeued],
                "open_groups": [[g, pid, s] for g, (pid, s) in sorted(st.open_groups.items())],
                "trained_groups": st.trained_groups, "dropped_groups": dict(st.dropped_groups)}

    def _close_dropped(self) -> None:
        try:
            for gid, reason in ray.get(self.p.buffer.take_dropped.remote()):
                self.state.close_groups([gid], dropped=reason)
        except ray.exceptions.RayError as e:
            raise actor_failure("buffer", e) from None

    def checkpoint(self) -> None:
        if self.last_ckpt_version == self.state.version:
            return  # this version is already saved
        self._close_dropped()
        self.p.learner.save_checkpoint(str(self.ckpt_dir), self._extra_state())
        self.last_ckpt_version = self.state.version

    def resume(self) -> dict[str, int]:
        """Continue from the latest checkpoint; returns the groups it dropped and generates again."""
        from learner.checkpoint import find_latest

        latest = find_latest(str(self.ckpt_dir))
        if latest is None:
            raise FileNotFoundError(f"run.resume is set but no checkpoint was found under {self.ckpt_dir}")
        extra = self.p.learner.load_checkpoint(str(latest))
        st = self.state
        self.last_ckpt_version = int(self.p.learner.version)
        st.step = int(extra["step"])
        st.version = st.synced_version = int(self.p.learner.version)
        st.skip_prompts(int(extra["prompts_taken"]))
        st.next_group_id = int(extra["next_group_id"])
        # groups admitted after the checkpoint are admitted again (same ids and seeds) by the replay; copies a
        # crashed run scored before dying came from weights newer than the checkpoint: dropped and counted
        late = ray.get(self.p.buffer.discard_after_checkpoint.remote(st.next_group_id, st.version))
        ray.get(self.p.buffer.take_dropped.remote())  # not ledger drops: the replay admits these ids again
        if late:
            log.warning("dropped %d scored group(s) admitted after the checkpoint (generated by weights newer "
                        "than version %d); their prompts are generated again", late, st.version)
        buffered = ray.get(self.p.buffer.stats.remote())
        st.submitted_groups = st.step * self.cfg.rollout.groups_per_step + int(buffered["groups"]["ready"])
        by_id = {p.prompt_id: p for p in st.prompts}
        st.requeued = [(by_id[pid], g, s) for pid, g, s in extra.get("requeued", [])]
        # groups open at the checkpoint (in flight, being judged, or scored) that the buffer no longer holds
        # (never scored, or trained by steps the crash lost) are generated again with their ids and seeds
        held = set(ray.get(self.p.buffer.ready_group_ids.remote()))
        queued = {g for _, g, _ in st.requeued}
        st.open_groups = {int(g): (str(pid), int(s)) for g, pid, s in extra.get("open_groups", [])}
        st.trained_groups = int(extra.get("trained_groups", st.step * self.cfg.rollout.groups_per_step))
        st.dropped_groups = {str(k): int(v) for k, v in extra.get("dropped_groups", {}).items()}
        again = [(by_id[pid], g, s) for g, (pid, s) in sorted(st.open_groups.items()) if g not in held | queued]
        st.requeued += again
        if again:
            log.info("generating again %d group(s) open at the checkpoint and no longer in the buffer", len(again))
        self.p.sync.sync(self.p.learner, self.p.engines, st.version)
        log.info("resumed from %s at step %d, policy version %d", latest, st.step, st.version)
        return {"step": st.step, "dropped_after_checkpoint": int(late), "generated_again": len(again)}

    def _wait_available(self, i: int, err: BaseException | None = None) -> None:
        """Block until engine i answers (a restarting actor is "temporarily unavailable" until its
        __init__ has run again); a dead one is an error naming it."""
        name, eng = self.p.engine_names[i], self.p.engines[i]
        deadline = time.monotonic() + 600
        while True:
            try:
                ray.get(eng.get_version.remote(), timeout=600)
                ray.get(eng.connect.remote(self.p.buffer, self.p.judges))  # a restarted engine has no sinks
                return
            except ray.exceptions.ActorUnavailableError as e:
                if time.monotonic() > deadline:
                    raise actor_failure(name, err or e) from None
                time.sleep(1.0)
            except ray.exceptions.RayError as e:
                raise actor_failure(name, err or e) from None

    def _catch_up_all(self, version: int) -> None:
        for i, eng in enumerate(self.p.engines):
            self._wait_available(i)
            if self.p.sync.catch_up(self.p.learner, eng, version):
                log.warning("rollout engine %s was behind; caught up to policy version %d",
                            self.p.engine_names[i], version)

    def recover_engine(self, i: int, err: BaseException) -> None:
        """A generate call failed because engine i died: wait for its restart, then push the latest weights."""
        with self.weights_lock:  # no training step or broadcast in progress: the learner's version is final
            self._wait_available(i, err)
            version = self.p.learner.version
            self.p.sync.catch_up(self.p.learner, self.p.engines[i], version)
        log.warning("rollout engine %s restarted; caught up to policy version %d", self.p.engine_names[i], version)

    def export_final_model(self) -> None:
        from learner.checkpoint import find_latest

        latest = find_latest(str(self.ckpt_dir))
        if latest is None:
            return
        dst = self.run_dir / "final_model"
        if dst.exists():
            shutil.rmtree(dst)
        # the checkpoint's Hugging Face files, without optimizer, RNG and bookkeeping state
        state_files = ("optimizer_", "rng_", "scheduler", "extra.json", "manifest.json", "learner_state.json")
        shutil.copytree(latest, dst, ignore=lambda _d, names: [n for n in names if n.startswith(state_files)])

    def report_extra(self) -> dict[str, Any]:
        js = self.judge_stats()
        for j in js.get("judges", {}).values():
            j.pop("latency_s", None)  # the summary stays; the raw list does not belong in a report
        self._close_dropped()
        extra: dict[str, Any] = {"run_id": self.p.run_id, "judges": js, "ledger": self.state.ledger()}
        try:  # per engine: tokens, weight updates, interrupted samples and re-prefilled tokens
            extra["engines"] = ray.get([e.stats.remote() for e in self.p.engines], timeout=30)
        except Exception as e:
            extra["engines"] = {"error": str(e)}
        try:
            extra["buffer"] = ray.get(self.p.buffer.stats.remote(), timeout=30)
        except Exception as e:
            extra["buffer"] = {"error": str(e)}
        if self.timings:
            n = len(self.timings)
            extra["timing_mean_s"] = {k: sum(t[k] for t in self.timings) / n for k in self.timings[0]}
        return extra
