"""BufferActor: the GroupBuffer as an async Ray actor (the plain class BufferService), adding backpressure.

Rollout actors put groups, judge workers write reward entries, the learner pulls. Every method is a
coroutine on the actor's single event loop, so the plain GroupBuffer needs no lock. When the buffer is
full, `put_group` waits on a condition until a pull (or a stale-group eviction) frees room: producers
slow down, nothing is dropped silently. A pulled pa.Table crosses Ray's object store as Arrow buffers,
which the reader maps without copying.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Iterable

import pyarrow as pa
import ray

from rvpo_async.buffer import GroupBuffer, RewardEntry
from rvpo_async.config import Config
from rvpo_async.placement import actor_options
from rvpo_async.types import RolloutGroup

# Each waiting producer holds one concurrency slot; rollout actors x their in-flight groups stays far below.
MAX_CONCURRENCY = 1000


class BufferService:
    """The plain class BufferActor wraps (its methods are coroutines: an async actor)."""

    def __init__(self, judge_names: list[str], group_size: int, capacity_groups: int, max_staleness: int,
                 persist_dir: str | None = None, restore: bool = False) -> None:
        if restore and persist_dir is not None:
            self._buf = GroupBuffer.restore(persist_dir, judge_names, group_size, capacity_groups, max_staleness)
        else:
            self._buf = GroupBuffer(judge_names, group_size, capacity_groups, max_staleness, persist_dir)
        self._room = asyncio.Condition()
        self._readied = asyncio.Event()  # set (and replaced) when reward entries arrive: pulls waiting re-check
        self._waiting = 0
        self._put_waits = 0
        self._put_wait_s = 0.0

    async def put_group(self, group: RolloutGroup, timeout_s: float | None = None, judges: Any = None) -> float:
        """Add a group, waiting while the buffer is full, then hand it to `judges` (the judge service actor)
        when one is given; returns the seconds spent waiting. One call does both, so a group the buffer holds
        is a group being judged even when the engine that sent it dies as soon as the call is sent."""
        start = time.monotonic()
        async with self._room:
            if not self._buf.has_room():
                self._waiting += 1
                self._put_waits += 1
                try:
                    await asyncio.wait_for(self._room.wait_for(self._buf.has_room), timeout_s)
                except TimeoutError:
                    s = self._buf.stats()["groups"]
                    raise TimeoutError(
                        f"put_group: group {group.group_id} waited {timeout_s} s for room in the buffer "
                        f"(capacity_groups {self._buf.capacity_groups}: {s['pending']} pending, {s['ready']} "
                        f"ready); is the learner pulling?") from None
                finally:
                    self._waiting -= 1
            self._buf.add_group(group)
        waited = time.monotonic() - start
        self._put_wait_s += waited
        if judges is not None:
            await judges.submit.remote(group)
        return waited

    async def set_rewards(self, entries: Iterable[RewardEntry]) -> None:
        """(group_id, sample_idx, judge_idx, JudgeResult) entries; a bad batch stores nothing."""
        self._buf.set_rewards(entries)
        self._readied.set()
        self._readied = asyncio.Event()

    async def pull(self, n_groups: int, current_version: int, min_groups: int = 1,
                   wait_s: float = 0.0) -> pa.Table | None:
        """GroupBuffer.pull; with `wait_s`, a pull that finds fewer than `min_groups` ready waits up to that long
        for reward entries to make them ready (the learner's side long-polls rather than calling again)."""
        end = time.monotonic() + wait_s
        while True:
            readied = self._readied
            async with self._room:
                table = self._buf.pull(n_groups, current_version, min_groups)
                if self._buf.has_room():  # pulled or stale-dropped groups made room; waiters re-check
                    self._room.notify_all()
            left = end - time.monotonic()
            if table is not None or left <= 0:
                return table
            try:
                await asyncio.wait_for(readied.wait(), left)
            except TimeoutError:
                pass  # one more look, then give up

    @ray.method(num_returns=2)
    async def pull_split(self, n_groups: int, current_version: int, min_groups: int = 1,
                         wait_s: float = 0.0) -> tuple[dict[str, int], pa.Table | None]:
        """`pull` as two objects, so the caller fetches only the small first one and hands the table's
        ObjectRef on unread (to the learner ranks, which map the Arrow buffers themselves):
        ({"groups": n, "rows": n * G}, table), or ({"groups": 0}, None) when nothing was pulled.
        Declared with two returns: `meta_ref, table_ref = buffer.pull_split.remote(...)` (the same as
        `buffer.pull_split.options(num_returns=2).remote(...)`)."""
        table = await self.pull(n_groups, current_version, min_groups, wait_s)
        if table is None:
            return {"groups": 0}, None
        return {"groups": table.num_rows // self._buf.group_size, "rows": table.num_rows}, table

    async def discard_after_checkpoint(self, next_group_id: int, version: int) -> int:
        async with self._room:
            n = self._buf.discard_after_checkpoint(next_group_id, version)
            if n:
                self._room.notify_all()
        return n

    async def known_group_ids(self, group_ids: list[int]) -> list[int]:
        return self._buf.known_group_ids(list(group_ids))

    async def ready_group_ids(self) -> list[int]:
        return self._buf.ready_group_ids()

    async def take_dropped(self) -> list[tuple[int, str]]:
        return self._buf.take_dropped()

    async def has_room(self) -> bool:
        return self._buf.has_room()

    async def judge_names(self) -> list[str]:
        return self._buf.judge_names

    async def stats(self) -> dict[str, Any]:
        """GroupBuffer.stats() plus backpressure: producers waiting now, waits so far, seconds waited."""
        return {**self._buf.stats(), "producers_waiting": self._waiting, "put_waits": self._put_waits,
                "put_wait_s": self._put_wait_s}

    async def state_dict(self) -> dict[str, Any]:
        return self._buf.state_dict()


# The Ray actor; create_buffer_actor gives it its remote options (rvpo_async.placement).
BufferActor = ray.remote(max_concurrency=MAX_CONCURRENCY)(BufferService)


def create_buffer_actor(cfg: Config, judge_names: list[str], persist_dir: str | None,
                        restore: bool | None = None, **options: Any) -> "ray.actor.ActorHandle":
    """The buffer actor for a run. persist_dir None keeps scored groups in memory only; restore
    (default: run.resume) reloads the groups a previous run scored but never pulled. `options` add
    remote options (the driver pins it to its own node)."""
    opts = actor_options("buffer", cfg, max_concurrency=MAX_CONCURRENCY, **options)
    return BufferActor.options(**opts).remote(
        list(judge_names), cfg.rollout.group_size, cfg.buffer.capacity_groups, cfg.staleness.max_staleness,
        persist_dir, cfg.run.resume if restore is None else restore)
