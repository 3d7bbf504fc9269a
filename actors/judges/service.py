"""The judge pool as a Ray actor: rollout engines send it groups, and it writes reward entries into the buffer.

`JudgeService` hosts one `JudgePool` (actors/judges/pool.py, with its guarantees: exactly K entries per
sample, retries, deadlines, replaced workers) on the driver's node. A thread of its own moves groups from
`submit` into the pool and every finished entry into the buffer actor (`set_rewards`), so no sample text or
reward passes through the driver. The driver asks it for counts only: `stats`, the latency/status
observations the Prometheus histograms need (`take_observations`), and pool size changes (`resize`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from typing import Any

import ray

from rvpo_async.config import Config

log = logging.getLogger("rvpo_async")


class JudgeService:
    def __init__(self, cfg: Config, engine_handles: dict[str, Any], buffer: Any, *,
                 extra_builders: dict[str, Any] | None = None) -> None:
        from actors.judges.pool import JudgePool

        self._pool = JudgePool(cfg, engine_handles, extra_builders=extra_builders)
        self._buffer = buffer
        self._lock = threading.Lock()  # JudgePool is not thread-safe: the loop and the driver's calls share it
        self._incoming: deque[Any] = deque()
        self._observed: list[tuple[int, float, str]] = []  # (reward slot, latency, status)
        self._error = ""
        self._written = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by submit: the loop sleeps on it while nothing is being judged
        self._thread = threading.Thread(target=self._loop, name="judge-service", daemon=True)
        self._thread.start()

    def ready(self) -> bool:
        return True

    def submit(self, group: Any) -> None:
        """Queue a generated group's samples for judging (called by the rollout engines)."""
        if self._error:
            raise RuntimeError(f"judge service stopped: {self._error}")
        self._incoming.append(group)
        self._wake.set()

    def _loop(self) -> None:
        pending: list[Any] = []
        while not self._stop.is_set():
            try:
                with self._lock:
                    while self._incoming:
                        self._pool.submit(self._incoming.popleft())
                    entries = self._pool.poll(timeout_s=0.01)
                if entries:
                    pending.append(self._buffer.set_rewards.remote(entries))
                    self._written += len(entries)
                    self._observed += [(k, r.latency_s, r.status) for _, _, k, r in entries if r.status != "absent"]
                if pending:
                    done, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                    ray.get(done)  # a buffer that refused the entries stops the service: the driver is told
                if not entries and not self._incoming and self._pool.idle():
                    # poll() waits for calls in flight itself; idle, wait for a submit (or the buffer's answer)
                    self._wake.wait(0.005 if pending else 0.1)
                    self._wake.clear()
            except Exception as e:  # reported by submit/stats; the driver stops the run naming the judges
                self._error = f"{type(e).__name__}: {e}"
                log.error("judge service: %s", self._error)
                return

    def take_observations(self) -> list[tuple[int, float, str]]:
        out, self._observed = self._observed, []
        return out

    def stats(self) -> dict[str, Any]:
        with self._lock:
            s = self._pool.stats()
        for j in s["judges"].values():
            j.pop("latency_s", None)  # the summary stays: these lists are the histograms' business
        s["entries_written"] = self._written
        s["queued_groups"] = len(self._incoming)
        s["error"] = self._error
        return s

    def resize(self, n: int) -> None:
        with self._lock:
            self._pool.resize(n)

    def autoscale(self) -> int:
        with self._lock:
            return self._pool.autoscale()

    def worker_handles(self) -> dict[int, Any]:
        with self._lock:
            return self._pool.worker_handles()

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            self._pool.shutdown()


JudgeServiceActor = ray.remote(JudgeService)
