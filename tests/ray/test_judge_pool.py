"""The judge pool on a local Ray cluster: every submitted sample yields exactly K entries, through judges
that time out or raise, a worker killed mid-run, and resizing while work is in flight."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import ray
import ray.cloudpickle

from actors.judges.pool import JudgePool
from judge_fakes import EXTRA_BUILDERS, SleepJudge
from rvpo_async.config import Config, JudgesConfig, JudgeSpec
from rvpo_async.types import Prompt, RolloutGroup, Sample

pytestmark = pytest.mark.ray

# _driver_only below travels to the workers by value: the workers cannot import this file
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

EXTRA = EXTRA_BUILDERS
FMT = JudgeSpec(name="fmt", kind="regex", params={"pattern": r"\d"})


def make_cfg(specs: list[JudgeSpec], **judges: Any) -> Config:
    return dataclasses.replace(Config(), judges=JudgesConfig(specs=specs, **judges))


def groups(n_groups: int, group_size: int, first_id: int = 0) -> list[RolloutGroup]:
    prompt = Prompt("p", "count to three", (1, 2), {"answer": "3"})
    return [RolloutGroup(g, prompt, tuple(Sample((1,), (0.0,), "stop", f"answer {g}-{i}") for i in range(group_size)),
                         policy_version=0, engine="test", created_at=0.0) for g in range(first_id, first_id + n_groups)]


def collect(pool: JudgePool, expected_samples: int | Callable[[], int], k: int, budget_s: float = 120.0,
            on_poll: Any = None) -> dict[tuple[int, int], dict[int, Any]]:
    """Poll until every sample has K entries; fail on a duplicate entry or when the budget runs out.
    `expected_samples` may be a callable when the test keeps submitting while it polls."""
    expected = expected_samples if callable(expected_samples) else (lambda: expected_samples)
    got: dict[tuple[int, int], dict[int, Any]] = {}
    end = time.monotonic() + budget_s
    while sum(len(v) == k for v in got.values()) < expected():
        assert time.monotonic() < end, f"only {len(got)} of {expected()} samples scored: {pool.stats()}"
        for g, s, j, result in pool.poll(timeout_s=0.5):
            assert j not in got.setdefault((g, s), {}), f"entry ({g}, {s}, {j}) returned twice"
            got[(g, s)][j] = result
        if on_poll is not None:
            on_poll(got)
    assert all(sorted(v) == list(range(k)) for v in got.values())
    return got


def test_every_sample_yields_k_entries_with_timeouts_and_errors_masked_and_counted_by_reason(ray_local) -> None:
    specs = [FMT, JudgeSpec(name="len", kind="length", params={"max_chars": 40}),
             JudgeSpec(name="slow", kind="sleep", params={"seconds": 3.0}, timeout_s=0.3),  # type: ignore[arg-type]
             JudgeSpec(name="boom", kind="raise")]  # type: ignore[arg-type]
    pool = JudgePool(make_cfg(specs, num_workers=2, concurrency=4, timeout_s=5.0), extra_builders=EXTRA)
    try:
        for group in groups(3, 4):
            pool.submit(group)
        got = collect(pool, 12, k=4)
        stats = pool.stats()
    finally:
        pool.shutdown()
    assert len(got) == 12
    for entries in got.values():
        assert [entries[j].status for j in range(4)] == ["ok", "ok", "timeout", "error"]
        assert entries[0].value == 1.0 and entries[1].value == 1.0
    assert stats["failures"] == {"timeout": {"judge 'slow' still running at its deadline 0.3s": 12},
                                 "error": {"judge 'boom' raised RuntimeError: rubric service exploded": 12}}
    assert stats["judges"]["slow"]["counts"] == {"timeout": 12}
    assert stats["judges"]["fmt"]["counts"] == {"ok": 12} and stats["judges"]["fmt"]["latency"]["count"] == 12
    assert stats["samples_done"] == 12 and stats["queue_depth"] == 0 and stats["in_flight"] == 0
    assert stats["calls"] == 3  # each worker call carried 4 samples (its judges.concurrency), not one


def test_killing_a_worker_mid_run_loses_no_entry(ray_local) -> None:
    specs = [FMT, JudgeSpec(name="work", kind="sleep", params={"seconds": 0.5})]  # type: ignore[arg-type]
    pool = JudgePool(make_cfg(specs, num_workers=2, concurrency=2, max_retries=1), extra_builders=EXTRA)
    killed: list[int] = []

    def kill_first_busy_worker(got: dict) -> None:
        if killed or not got:
            return
        busy = [wid for wid, w in pool.stats()["workers"].items() if w["in_flight"] > 0 and w["state"] == "live"]
        if busy:
            killed.append(busy[0])
            ray.kill(pool.worker_handles()[busy[0]])

    try:
        for group in groups(4, 4):
            pool.submit(group)
        got = collect(pool, 16, k=2, on_poll=kill_first_busy_worker)
        stats = pool.stats()
    finally:
        pool.shutdown()
    assert killed, "no worker was busy to kill"
    assert all(e.status == "ok" for entries in got.values() for e in entries.values())
    assert stats["worker_deaths"] == 1 and stats["retries"] >= 1 and killed[0] not in stats["workers"]
    assert stats["num_workers"] == 2  # the dead worker was replaced


def test_resizing_up_and_down_during_a_run_loses_nothing_and_new_workers_receive_work(ray_local) -> None:
    specs = [FMT, JudgeSpec(name="work", kind="sleep", params={"seconds": 0.3})]  # type: ignore[arg-type]
    pool = JudgePool(make_cfg(specs, num_workers=1, min_workers=1, max_workers=3, concurrency=2),
                     extra_builders=EXTRA)
    phase, submitted, drained_in_flight = ["start"], [0], [0]

    def submit_groups(n: int) -> None:
        for group in groups(n, 4, first_id=submitted[0] // 4):
            pool.submit(group)
            submitted[0] += 4

    def resize_during_run(got: dict) -> None:
        stats = pool.stats()
        calls = stats["calls_by_worker"]
        if phase[0] == "start" and got:
            pool.resize(3)
            phase[0] = "grown"
        elif phase[0] == "grown" and len(calls) == 3 and all(n > 0 for n in calls.values()):
            pool.resize(1)
            phase[0] = "shrunk"
            drained_in_flight[0] = sum(w["in_flight"] for w in pool.stats()["workers"].values()
                                       if w["state"] == "draining")
            submit_groups(2)  # work queued after the shrink goes to the one worker left
        if phase[0] != "shrunk" and stats["queue_depth"] < 8:  # keep a backlog until both resizes happened
            submit_groups(2)

    try:
        with pytest.raises(ValueError, match=r"size 4 is outside \[judges.min_workers, judges.max_workers\] = \[1, 3\]"):
            pool.resize(4)
        with pytest.raises(ValueError, match=r"size 0 is outside"):
            pool.resize(0)
        submit_groups(4)
        got = collect(pool, lambda: submitted[0], k=2, on_poll=resize_during_run)
        stats = pool.stats()
    finally:
        pool.shutdown()
    assert all(e.status == "ok" for entries in got.values() for e in entries.values())
    assert len(stats["calls_by_worker"]) == 3 and all(n > 0 for n in stats["calls_by_worker"].values())
    assert phase[0] == "shrunk" and len(got) == submitted[0]
    assert sum(stats["calls_by_worker"].values()) == submitted[0]
    assert drained_in_flight[0] > 0 and stats["retries"] == 0  # drained workers' calls came back, none redone
    assert stats["num_workers"] == 1 and len(stats["workers"]) == 1


def test_autoscale_grows_the_pool_to_cover_a_backlog(ray_local) -> None:
    cfg = make_cfg([FMT], num_workers=1, min_workers=1, max_workers=3, concurrency=2, autoscale=True)
    pool = JudgePool(cfg)
    try:
        for group in groups(3, 4):
            pool.submit(group)
        assert pool.autoscale() == 3
        assert pool.stats()["num_workers"] == 3
        collect(pool, 12, k=1)
    finally:
        pool.shutdown()


_DRIVER_PID = os.getpid()  # travels by value with the builder below, so workers see the driver's pid


def _driver_only(spec: JudgeSpec, deps: Mapping[str, Any]) -> SleepJudge:
    if os.getpid() != _DRIVER_PID:
        raise RuntimeError("this judge cannot be built on a worker")
    return SleepJudge(spec.name, 0.0)


def test_samples_are_masked_not_stuck_when_no_worker_ever_starts(ray_local) -> None:
    spec = JudgeSpec(name="odd", kind="driver_only")  # type: ignore[arg-type]
    pool = JudgePool(make_cfg([spec], num_workers=1, max_retries=2), extra_builders={"driver_only": _driver_only})
    try:
        pool.submit(groups(1, 3)[0])
        got = collect(pool, 3, k=1)
        stats = pool.stats()
    finally:
        pool.shutdown()
    for entries in got.values():
        assert entries[0].status == "error"
        assert "no judge worker alive" in entries[0].reason and "failed to start" in entries[0].reason
    assert stats["start_failures"] == 1 and stats["worker_deaths"] == 0 and stats["num_workers"] == 0


def test_a_bad_spec_fails_pool_construction_naming_the_judge_and_param(ray_local) -> None:
    spec = JudgeSpec(name="fmt", kind="regex", params={"patern": "x"})
    with pytest.raises(ValueError, match=r"judge 'fmt' \(kind 'regex'\): param 'patern' is unknown"):
        JudgePool(make_cfg([spec]))


def test_judge_service_scores_groups_submitted_after_it_has_sat_idle(ray_local) -> None:
    """The service's thread sleeps while nothing is queued; a submit wakes it, and every entry of a group
    submitted after an idle spell still reaches the buffer."""
    from actors.buffer import create_buffer_actor
    from actors.judges.service import JudgeServiceActor

    cfg = dataclasses.replace(make_cfg([FMT], num_workers=1), rollout=dataclasses.replace(
        Config().rollout, group_size=2))
    buffer = create_buffer_actor(cfg, ["fmt"], persist_dir=None)
    service = JudgeServiceActor.remote(cfg, {}, buffer)
    try:
        for first in (0, 1):
            group = groups(1, 2, first_id=first)[0]
            ray.get(buffer.put_group.remote(group))
            ray.get(service.submit.remote(group))
            end = time.monotonic() + 60
            while ray.get(buffer.stats.remote())["groups"]["ready"] < first + 1:
                assert time.monotonic() < end, ray.get(service.stats.remote())
                time.sleep(0.05)
            time.sleep(0.5)  # idle: nothing queued or in flight
        s = ray.get(service.stats.remote())
        assert s["entries_written"] == 4 and s["error"] == ""
    finally:
        ray.get(service.shutdown.remote())
        ray.kill(service)
        ray.kill(buffer)
