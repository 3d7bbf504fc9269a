"""The judge pool: every sample scored by K judges on Ray workers that scale apart from rollout.

A `JudgeWorker` (actors/judges/worker.py) scores the samples of a call concurrently, each sample's K judges
concurrently, each with its own deadline. The driver-side `JudgePool` queues one item per sample and hands the
least-loaded live worker as many queued items in one call as it has free slots (at most `judges.concurrency`
samples in flight each, so a call never waits for a thread: a group of G <= concurrency samples is one call,
not G). It promises exactly K entries per submitted sample: a failed call (dead actor or anything else) or one
past the pool deadline (slowest judge timeout + margin) has each of its samples retried on another worker up to
`judges.max_retries` times, then masked 'error' / 'timeout' with the reason. A worker that dies after starting
is replaced; one that never starts is not (that would hide the fault), and with no worker left queued samples
are masked. `resize` drains what it removes.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.judges.worker import JudgeWorker, SampleScorer, create_judge_engines  # noqa: F401 (re-exported)
from actors.judges.factory import Builder, build_judge, masked
from rvpo_async.autoscale import autoscale_target
from rvpo_async.config import Config
from rvpo_async.fileio import brief_error
from rvpo_async.placement import actor_options
from rvpo_async.types import JudgeResult, Prompt, RolloutGroup

Entry = tuple[int, int, int, JudgeResult]  # (group_id, sample_idx, judge_idx, result)
_MAX_REASONS = 50  # distinct failure reasons kept per status; the rest count under "other"
_LATENCIES_KEPT = 10_000


@dataclass
class _Item:
    group_id: int
    sample_idx: int
    prompt: Prompt
    text: str
    submitted: float
    failures: list[str] = field(default_factory=list)
    tried: set[int] = field(default_factory=set)


@dataclass
class _Worker:
    wid: int
    handle: Any
    ready_ref: Any
    started: float
    state: str = "starting"  # starting -> live -> draining
    was_live: bool = False
    in_flight: int = 0
    dispatched: int = 0
    completed: int = 0


@dataclass
class _Call:
    items: list[_Item]
    wid: int
    deadline: float


class JudgePool:
    """Driver-side: owned by one loop that calls submit/poll (not thread-safe). `deadline_margin_s` is
    added to the slowest judge's timeout for the pool deadline; `start_timeout_s` bounds a worker's start
    (Ray may be waiting for a node); `autoscale_interval_s` spaces the autoscale steps poll() takes."""

    def __init__(self, cfg: Config, engine_handles: dict[str, Any] | None = None, *,
                 extra_builders: dict[str, Builder] | None = None, deadline_margin_s: float = 5.0,
                 start_timeout_s: float = 300.0, autoscale_interval_s: float = 2.0):
        j = cfg.judges
        if not j.specs:
            raise ValueError("judges.specs is empty: a judge pool needs at least one judge spec")
        self._cfg = cfg
        self._names = cfg.reward_names  # one per reward slot: a rubric judge has max_items of them
        self._worker_args = (list(j.specs), dict(engine_handles or {}), j.concurrency, j.timeout_s)
        self._extra = dict(extra_builders or {})
        for spec in j.specs:  # a bad spec fails here, naming its param, not later as a dead worker
            build_judge(spec, engine_handles=self._worker_args[1], extra_builders=self._extra)
        self._call_deadline_s = max(float(s.timeout_s or j.timeout_s) for s in j.specs) + deadline_margin_s
        self._start_timeout_s = start_timeout_s
        self._autoscale_interval_s = autoscale_interval_s
        self._next_autoscale = 0.0
        self._queue: deque[_Item] = deque()
        self._workers: dict[int, _Worker] = {}
        self._calls: dict[Any, _Call] = {}
        self._starting: dict[Any, int] = {}
        self._next_wid = 0
        self._counts = [Counter() for _ in self._names]
        self._latency: list[deque[float]] = [deque(maxlen=_LATENCIES_KEPT) for _ in self._names]
        self._failures: dict[str, Counter] = {}
        self._completed_by_worker: dict[int, int] = {}
        self._events = Counter()
        self._last_worker_failure = ""
        self._unreported: list[Entry] = []  # entries finished outside poll(), returned by the next one
        for _ in range(j.num_workers):
            self._spawn()

    # ------------------------------------------------------------------ public
    def submit(self, group: RolloutGroup) -> None:
        now = time.monotonic()
        self._queue.extend(_Item(group.group_id, i, group.prompt, s.text, now) for i, s in enumerate(group.samples))
        self._dispatch(self._unreported)

    def poll(self, timeout_s: float = 0.0) -> list[Entry]:
        """Finished entries; waits up to `timeout_s` for the first, returns early once any are done."""
        end = time.monotonic() + timeout_s
        out, self._unreported = self._unreported, []
        while True:
            if self._cfg.judges.autoscale and time.monotonic() >= self._next_autoscale:
                self.autoscale()
            self._dispatch(out)
            refs = [*self._calls, *self._starting]
            if refs:
                wait_s = max(0.0, min(end, self._next_deadline()) - time.monotonic())
                ready, _ = ray.wait(refs, num_returns=1, timeout=wait_s)
                if ready:
                    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in ready:
                    self._settle(ref, out)
            self._expire(out)
            self._reap()
            self._dispatch(out)
            if out or time.monotonic() >= end or self.idle():
                return out

    def idle(self) -> bool:
        """Nothing queued, in flight or starting: poll() would return at once."""
        return not (self._calls or self._starting or self._queue)

    def resize(self, n: int) -> None:
        j = self._cfg.judges
        if not j.min_workers <= n <= j.max_workers:
            raise ValueError(f"judge pool size {n} is outside [judges.min_workers, judges.max_workers] = "
                             f"[{j.min_workers}, {j.max_workers}]")
        active = self._active()
        for _ in range(n - len(active)):
            self._spawn()
        # drain workers still starting first, then the least busy, newest first
        victims = sorted(active, key=lambda w: (w.state == "live", w.in_flight, -w.wid))[:max(0, len(active) - n)]
        for w in victims:
            w.state = "draining"
        self._reap()

    def autoscale(self) -> int:
        """Resize to `autoscale_target` when judges.autoscale is on; returns the target either way."""
        j = self._cfg.judges
        self._next_autoscale = time.monotonic() + self._autoscale_interval_s
        active = len(self._active())
        target = autoscale_target(len(self._queue), self._items_in_flight(), active, j.min_workers,
                                  j.max_workers, j.concurrency)
        if j.autoscale and target != active:
            self.resize(target)
        return target

    def worker_handles(self) -> dict[int, Any]:
        return {wid: w.handle for wid, w in self._workers.items()}

    def stats(self) -> dict[str, Any]:
        judges = {name: {"counts": dict(self._counts[k]), "latency_s": list(self._latency[k]),
                         "latency": _summary(list(self._latency[k]))} for k, name in enumerate(self._names)}
        completed = {**self._completed_by_worker, **{wid: w.completed for wid, w in self._workers.items()}}
        return {
            "judges": judges,
            "failures": {status: dict(c) for status, c in self._failures.items()},
            "queue_depth": len(self._queue),
            "in_flight": self._items_in_flight(),  # samples
            "calls": self._events["calls"],
            "num_workers": len(self._active()),
            "workers": {wid: {"state": w.state, "in_flight": w.in_flight, "dispatched": w.dispatched,
                              "completed": w.completed} for wid, w in self._workers.items()},
            "calls_by_worker": completed,
            "last_worker_failure": self._last_worker_failure,
            **{name: self._events[name] for name in ("samples_done", "retries", "calls_timed_out",
                                                     "worker_deaths", "start_failures")},
        }

    def shutdown(self) -> None:
        """Kill every worker. Samples not yet finished are dropped: drain with poll() first."""
        for w in self._workers.values():
            _kill(w.handle)
        self._workers, self._calls, self._starting, self._queue = {}, {}, {}, deque()

    # ------------------------------------------------------------------ internals
    def _items_in_flight(self) -> int:
        return sum(len(c.items) for c in self._calls.values())

    def _active(self) -> list[_Worker]:
        return [w for w in self._workers.values() if w.state in ("starting", "live")]

    def _spawn(self) -> None:
        specs, engines, concurrency, timeout_s = self._worker_args
        opts = actor_options("judge", self._cfg, max_concurrency=concurrency)
        handle = JudgeWorker.options(**opts).remote(specs, engines, concurrency, timeout_s, extra_builders=self._extra)
        w = _Worker(self._next_wid, handle, handle.ready.remote(), time.monotonic())
        self._workers[w.wid] = w
        self._starting[w.ready_ref] = w.wid
        self._next_wid += 1

    def _dispatch(self, out: list[Entry]) -> None:
        if self._queue and not self._active():
            reason = f"no judge worker alive (last failure: {self._last_worker_failure or 'none'})"
            while self._queue:
                self._give_up(self._queue.popleft(), reason, "error", out)
            return
        cap = self._cfg.judges.concurrency
        while self._queue:
            free = [w for w in self._workers.values() if w.state == "live" and w.in_flight < cap]
            if not free:
                return
            # a retried item (back at the head) prefers a worker it has not tried
            w = min(free, key=lambda w: (w.wid in self._queue[0].tried, w.in_flight, w.dispatched))
            items = [self._queue.popleft() for _ in range(min(cap - w.in_flight, len(self._queue)))]
            ref = w.handle.score_samples.remote([(item.prompt, item.text) for item in items])
            for item in items:
                item.tried.add(w.wid)
            w.in_flight += len(items)
            w.dispatched += len(items)
            self._events["calls"] += 1
            self._calls[ref] = _Call(items, w.wid, time.monotonic() + self._call_deadline_s)

    def _settle(self, ref: Any, out: list[Entry]) -> None:
        if ref in self._starting:
            wid = self._starting.pop(ref)
            try:
                ray.get(ref)
            except Exception as e:
                self._lose_worker(wid, f"judge worker {wid} failed to start: {brief_error(e)}")
                return
            if (w := self._workers.get(wid)) is not None:
                w.was_live = True
                w.state = "live" if w.state == "starting" else w.state
            return
        call = self._calls.pop(ref, None)
        if call is None:  # abandoned at its deadline, or its worker already retired
            return
        w = self._workers.get(call.wid)
        if w is not None:
            w.in_flight -= len(call.items)
        try:
            per_sample = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._lose_worker(call.wid, f"judge worker {call.wid} died: {brief_error(e)}")
            return self._retry_all(call.items, f"judge worker died: {brief_error(e)}", "error", out)
        except Exception as e:
            return self._retry_all(call.items, f"judge worker call failed: {brief_error(e)}", "error", out)
        if len(per_sample) != len(call.items):
            return self._retry_all(call.items, f"judge worker returned {len(per_sample)} samples, "
                                               f"expected {len(call.items)}", "error", out)
        for item, results in zip(call.items, per_sample):
            if len(results) != len(self._names):
                self._retry(item, f"judge worker returned {len(results)} entries, expected {len(self._names)}",
                            "error", out)
                continue
            if w is not None:
                w.completed += 1
            self._emit(item, results, out)

    def _expire(self, out: list[Entry]) -> None:
        now = time.monotonic()
        for ref, call in list(self._calls.items()):
            if now >= call.deadline:
                del self._calls[ref]
                if (w := self._workers.get(call.wid)) is not None:
                    w.in_flight -= len(call.items)
                _cancel(ref)
                self._events["calls_timed_out"] += 1
                self._retry_all(call.items, f"judge worker call passed the pool deadline {self._call_deadline_s:g}s",
                                "timeout", out)
        for ref, wid in list(self._starting.items()):
            if now - self._workers[wid].started > self._start_timeout_s:
                del self._starting[ref]
                self._lose_worker(wid, f"judge worker {wid} did not start within {self._start_timeout_s:g}s")

    def _reap(self) -> None:
        for w in [w for w in self._workers.values() if w.state == "draining" and w.in_flight == 0]:
            self._retire(w)

    def _retire(self, w: _Worker) -> None:
        self._workers.pop(w.wid, None)
        self._starting.pop(w.ready_ref, None)
        self._completed_by_worker[w.wid] = w.completed
        _kill(w.handle)

    def _lose_worker(self, wid: int, reason: str) -> None:
        w = self._workers.get(wid)
        if w is None:  # already handled through another of its calls
            return
        self._retire(w)
        self._last_worker_failure = reason
        if not w.was_live:
            self._events["start_failures"] += 1
            return
        self._events["worker_deaths"] += 1
        if w.state != "draining":
            self._spawn()

    def _retry_all(self, items: list[_Item], reason: str, status: str, out: list[Entry]) -> None:
        for item in reversed(items):  # back at the head of the queue in their order
            self._retry(item, reason, status, out)

    def _retry(self, item: _Item, reason: str, status: str, out: list[Entry]) -> None:
        item.failures.append(reason)
        if len(item.failures) > self._cfg.judges.max_retries:
            self._give_up(item, reason, status, out)
        else:
            self._events["retries"] += 1
            self._queue.appendleft(item)

    def _give_up(self, item: _Item, reason: str, status: str, out: list[Entry]) -> None:
        n = len(item.failures)
        why = f"{reason} (gave up after {n} attempt{'s' if n != 1 else ''})" if n else reason
        entry = masked(status, why, time.monotonic() - item.submitted)
        self._emit(item, [entry] * len(self._names), out)

    def _emit(self, item: _Item, results: list[JudgeResult], out: list[Entry]) -> None:
        self._events["samples_done"] += 1
        for k, r in enumerate(results):
            out.append((item.group_id, item.sample_idx, k, r))
            self._counts[k][r.status] += 1
            self._latency[k].append(r.latency_s)
            if r.status not in ("ok", "absent"):  # an absent rubric slot is no failure
                reasons = self._failures.setdefault(r.status, Counter())
                reasons[r.reason if r.reason in reasons or len(reasons) < _MAX_REASONS else "other"] += 1

    def _next_deadline(self) -> float:
        deadlines = [c.deadline for c in self._calls.values()]
        deadlines += [self._workers[wid].started + self._start_timeout_s for wid in self._starting.values()]
        return min(deadlines, default=float("inf"))


def _summary(xs: list[float]) -> dict[str, float]:
    s = sorted(xs)
    q = lambda f: s[min(len(s) - 1, int(f * len(s)))] if s else 0.0  # noqa: E731
    return {"count": len(s), "mean": statistics.fmean(s) if s else 0.0, "p50": q(0.5), "p95": q(0.95),
            "max": s[-1] if s else 0.0}


def _kill(handle: Any) -> None:
    try:
        ray.kill(handle)
    except Exception:  # already dead or never created: nothing to stop
        pass


def _cancel(ref: Any) -> None:
    try:
        ray.cancel(ref)
    except Exception:  # finished, or its actor is gone: nothing to cancel
        pass
