"""The group buffer: scored rollout groups held as Arrow record batches until the learner pulls them.

A group of G samples waits for G x K reward entries (K reward slots). An entry is valid when its judge said
'ok' with a finite value; timeouts, errors, invalid outputs, non-finite values and 'absent' rubric slots
(the prompt has fewer criteria than the rubric judge's slots) are MASKED: present,
not trained on, and counted. A group is READY once every entry is present or masked. Pending groups are
plain Python lists (written one entry at a time); a ready group is written once and then only read, so
it becomes one Arrow RecordBatch: columnar buffers cross Ray's object store without copying and turn
into torch tensors without per-sample Python loops. `pull` first evicts ready groups whose staleness
exceeds max_staleness (ALGORITHM.md section 3), then hands out the oldest ready groups.

Persistence (persist_dir): each group that becomes ready is written to its own Arrow IPC file, and
groups leaving the buffer are named in a ledger before their files are deleted, so `GroupBuffer.restore`
loses no scored group; the files and their schema are handled in rvpo_async.buffer_store. Learner tensors
from a pulled table: `to_torch`, in rvpo_async.buffer_torch. Their public names are re-exported here.
"""

from __future__ import annotations

import copy
import math
import time
from collections import deque
from dataclasses import dataclass
from itertools import chain, islice
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow as pa

from rvpo_async import buffer_store as store
# re-exported: callers import these from rvpo_async.buffer
from rvpo_async.buffer_store import GROUP_SIZE_KEY, JUDGE_NAMES_KEY, LEDGER_NAME, BufferCorrupt, buffer_schema  # noqa
from rvpo_async.buffer_torch import to_torch  # noqa: F401
from rvpo_async.staleness import is_too_stale
from rvpo_async.types import STATUS_CODES, JudgeResult, RolloutGroup

MASKED_STATUSES = ("timeout", "error", "invalid")
_OK = STATUS_CODES["ok"]
_WRITABLE = frozenset(STATUS_CODES) - {"pending"}
_RETIRED_MEMORY = 65536  # ids remembered after leaving, so a judge's late retry is counted, not an error
RewardEntry = tuple[int, int, int, JudgeResult]  # (group_id, sample_idx, judge_idx, result)


class BufferFull(RuntimeError):
    """add_group on a buffer that already holds capacity_groups groups (pending + ready)."""


@dataclass
class _Pending:
    group: RolloutGroup
    rewards: list[float]  # [G * K], row-major (sample, judge); NaN until a valid value lands
    status: list[int]  # [G * K] STATUS_CODES; 0 = no entry yet
    remaining: int


@dataclass
class _Ready:
    group_id: int
    seq: int  # order in which groups became ready; also names the persisted file
    policy_version: int
    batch: pa.RecordBatch

    @property
    def file_name(self) -> str:
        return store.group_file_name(self.seq, self.group_id)


def _new_counters() -> dict[str, Any]:
    return {"groups_added": 0, "groups_became_ready": 0, "groups_pulled": 0, "dropped": {"stale": 0},
            "masked": {s: 0 for s in MASKED_STATUSES}, "nonfinite_values": 0, "duplicate_writes": 0,
            "entries_written": 0, "rows_ingested": 0, "rows_pulled": 0, "absent_entries": 0}


class GroupBuffer:
    def __init__(self, judge_names: list[str], group_size: int, capacity_groups: int, max_staleness: int,
                 persist_dir: str | None = None, *, clock: Callable[[], float] = time.time) -> None:
        if not judge_names or len(set(judge_names)) != len(judge_names):
            raise ValueError(f"judge_names must be non-empty and unique, got {judge_names!r}")
        if group_size < 1 or capacity_groups < 1 or max_staleness < 0:
            raise ValueError(f"need group_size >= 1, capacity_groups >= 1, max_staleness >= 0; got "
                             f"{group_size}, {capacity_groups}, {max_staleness}")
        self._judge_names = list(judge_names)
        self._g, self._k = group_size, len(judge_names)
        self.capacity_groups, self.max_staleness = capacity_groups, max_staleness
        self._schema = buffer_schema(self._judge_names, group_size)
        self._clock = clock
        self._pending: dict[int, _Pending] = {}
        self._ready: deque[_Ready] = deque()
        self._ready_ids: set[int] = set()
        self._retired: deque[int] = deque()
        self._retired_ids: set[int] = set()
        self._seq = 0
        self._dropped: list[tuple[int, str]] = []  # (group_id, reason) dropped since the last take_dropped()
        self._counters = _new_counters()
        self._unlink_due: dict[str, str] = {}  # persisted file -> why it left; kept in the ledger until deleted
        self._persist_dir: str | None = None
        if persist_dir is not None:
            store.open_fresh(persist_dir)
            self._persist_dir = persist_dir

    @property
    def schema(self) -> pa.Schema:
        return self._schema

    @property
    def judge_names(self) -> list[str]:
        return list(self._judge_names)

    @property
    def group_size(self) -> int:
        return self._g

    def has_room(self) -> bool:
        return len(self._pending) + len(self._ready) < self.capacity_groups

    # ------------------------------------------------------------------ writing

    def add_group(self, group: RolloutGroup) -> None:
        """Register a generated group; it waits for G x K reward entries."""
        gid = group.group_id
        if len(group.samples) != self._g:
            raise ValueError(f"group {gid} has {len(group.samples)} samples, this buffer's group_size is {self._g}")
        if gid in self._pending or gid in self._ready_ids or gid in self._retired_ids:
            raise ValueError(f"group_id {gid} is already used in this buffer (pending, ready or pulled/dropped)")
        for i, s in enumerate(group.samples):
            if len(s.logprobs) != len(s.token_ids):
                raise ValueError(f"group {gid} sample {i}: {len(s.token_ids)} tokens but {len(s.logprobs)} logprobs")
        if not self.has_room():
            raise BufferFull(f"buffer holds {len(self._pending)} pending + {len(self._ready)} ready groups = "
                             f"capacity_groups {self.capacity_groups}; cannot add group {gid}")
        n = self._g * self._k
        self._pending[gid] = _Pending(group, [math.nan] * n, [0] * n, n)
        self._counters["groups_added"] += 1

    def set_reward(self, group_id: int, sample_idx: int, judge_idx: int, result: JudgeResult) -> None:
        self._check_entry(group_id, sample_idx, judge_idx, result)
        self._store(group_id, sample_idx, judge_idx, result)

    def set_rewards(self, entries: Iterable[RewardEntry]) -> None:
        """Store reward entries. All are checked before any is stored, so a bad batch changes nothing.

        A second write to an entry (a judge's retry) is ignored and counted, also after its group left.
        """
        entries = list(entries)
        for gid, i, k, res in entries:
            self._check_entry(gid, i, k, res)
        for gid, i, k, res in entries:
            self._store(gid, i, k, res)

    def _check_entry(self, gid: int, i: int, k: int, res: JudgeResult) -> None:
        if gid not in self._pending and gid not in self._ready_ids and gid not in self._retired_ids:
            raise KeyError(f"reward for unknown group_id {gid}: not pending, ready or recently pulled")
        if not 0 <= i < self._g:
            raise IndexError(f"sample_idx {i} out of range for group {gid} of size {self._g}")
        if not 0 <= k < self._k:
            raise IndexError(f"judge_idx {k} out of range: this buffer has {self._k} judges {self._judge_names}")
        if not isinstance(res, JudgeResult) or res.status not in _WRITABLE:
            raise ValueError(f"reward for group {gid} sample {i} judge {self._judge_names[k]!r}: expected a "
                             f"JudgeResult with status ok/timeout/error/invalid/absent, got {res!r}")

    def _store(self, gid: int, i: int, k: int, res: JudgeResult) -> None:
        p = self._pending.get(gid)
        j = i * self._k + k
        if p is None or p.status[j]:
            self._counters["duplicate_writes"] += 1
            return
        status = res.status
        if status == "ok":
            try:
                value = float(res.value)
            except (TypeError, ValueError):
                value = math.nan
            if math.isfinite(value):
                p.rewards[j] = value
            else:
                status = "invalid"
                self._counters["nonfinite_values"] += 1
        if status == "absent":
            self._counters["absent_entries"] += 1
        elif status != "ok":
            self._counters["masked"][status] += 1
        p.status[j] = STATUS_CODES[status]
        self._counters["entries_written"] += 1
        p.remaining -= 1
        if p.remaining == 0:
            self._make_ready(p)

    def _make_ready(self, p: _Pending) -> None:
        g = p.group
        del self._pending[g.group_id]
        r = _Ready(g.group_id, self._seq, g.policy_version, self._to_batch(p, self._clock()))
        self._seq += 1
        self._ready.append(r)
        self._ready_ids.add(r.group_id)
        self._counters["groups_became_ready"] += 1
        self._counters["rows_ingested"] += self._g
        if self._persist_dir is not None:
            store.write_group_file(self._persist_dir, r.file_name, r.group_id, self._schema, r.batch)

    def _to_batch(self, p: _Pending, scored_at: float) -> pa.RecordBatch:
        g, n, k = p.group, self._g, self._k
        ss = g.samples
        lens = np.fromiter((len(s.token_ids) for s in ss), np.int32, n)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lens, dtype=np.int32)]))
        total = int(lens.sum())
        tokens = np.fromiter(chain.from_iterable(s.token_ids for s in ss), np.int32, total)
        logprobs = np.fromiter(chain.from_iterable(s.logprobs for s in ss), np.float32, total)
        prompt = np.asarray(g.prompt.token_ids, dtype=np.int32)
        p_off = pa.array(np.arange(n + 1, dtype=np.int32) * len(prompt))
        status = np.asarray(p.status, dtype=np.int8)
        cols = [
            pa.array(np.full(n, g.group_id, np.int64)), pa.array(np.arange(n, dtype=np.int32)),
            pa.array([g.prompt.prompt_id] * n, pa.string()), pa.array([g.prompt.text] * n, pa.string()),
            pa.ListArray.from_arrays(p_off, pa.array(np.tile(prompt, n))),
            pa.array([s.text for s in ss], pa.string()),
            pa.ListArray.from_arrays(offsets, pa.array(tokens)), pa.ListArray.from_arrays(offsets, pa.array(logprobs)),
            pa.array([s.finish_reason for s in ss], pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(np.asarray(p.rewards, np.float32)), k),
            pa.FixedSizeListArray.from_arrays(pa.array(status == _OK), k),
            pa.FixedSizeListArray.from_arrays(pa.array(status), k),
            pa.array(np.full(n, g.policy_version, np.int64)), pa.array([g.engine] * n, pa.string()),
            pa.array(np.full(n, g.created_at, np.float64)), pa.array(np.full(n, scored_at, np.float64)),
        ]
        return pa.RecordBatch.from_arrays(cols, schema=self._schema)

    # ------------------------------------------------------------------ reading

    def evict_stale(self, current_version: int) -> int:
        """Drop ready groups with current_version - policy_version > max_staleness; return how many."""
        stale = [r for r in self._ready if is_too_stale(current_version, r.policy_version, self.max_staleness)]
        if stale:
            self._retire(stale, "dropped:stale", {"stale": len(stale)})
            gone = {r.group_id for r in stale}
            self._ready = deque(r for r in self._ready if r.group_id not in gone)
        return len(stale)

    def known_group_ids(self, group_ids: list[int]) -> list[int]:
        """Those of `group_ids` this buffer holds or has held (pending, ready, pulled or dropped)."""
        return [g for g in group_ids if g in self._pending or g in self._ready_ids or g in self._retired_ids]

    def ready_group_ids(self) -> list[int]:
        return [r.group_id for r in self._ready]

    def take_dropped(self) -> list[tuple[int, str]]:
        """(group_id, reason) of the groups dropped (stale, ...) since the last call."""
        out, self._dropped = self._dropped, []
        return out

    def discard_after_checkpoint(self, next_group_id: int, version: int) -> int:
        """Drop every ready group admitted after a checkpoint (group_id >= next_group_id) or generated by
        weights newer than its policy version, counted as dropped `after_checkpoint`; return how many.

        Resuming from a checkpoint replays the run from that point: the groups admitted after it are
        admitted again, with the same ids and seeds, and generated by the restored policy. Copies scored
        before a crash were generated by weights that no longer exist (newer than the restored learner),
        so they are counted and dropped rather than trained."""
        late = [r for r in self._ready if r.group_id >= next_group_id or r.policy_version > version]
        if late:
            self._retire(late, "dropped:after_checkpoint", {"after_checkpoint": len(late)})
            gone = {r.group_id for r in late}
            self._ready = deque(r for r in self._ready if r.group_id not in gone)
            # the replay re-admits these ids: they must not count as already used
            for gid in gone:
                self._retired_ids.discard(gid)
        return len(late)

    def pull(self, n_groups: int, current_version: int, min_groups: int = 1) -> pa.Table | None:
        """Up to n_groups oldest ready groups as one single-chunk table of n*G rows (group-major, then
        sample_idx), or None when fewer than min_groups are ready after stale groups are dropped.

        The one copy on this path is here: combine_chunks() joins the groups' batches, so every column
        of the result is one contiguous buffer that readers (to_torch) can view without copying.
        """
        if n_groups < 1 or not 1 <= min_groups <= n_groups:
            raise ValueError(f"need n_groups >= 1 and 1 <= min_groups <= n_groups, got {n_groups}, {min_groups}")
        self.evict_stale(current_version)
        if len(self._ready) < min_groups:
            return None
        taken = list(islice(self._ready, n_groups))
        self._retire(taken, "pulled", {})
        for _ in taken:
            self._ready.popleft()
        return pa.Table.from_batches([r.batch for r in taken], schema=self._schema).combine_chunks()

    def _retire(self, items: list[_Ready], why: str, dropped: dict[str, int]) -> None:
        """Count groups leaving the ready queue and, when persisting, name them in the ledger before
        deleting their files (a crash between the two keeps them gone). If the ledger cannot be written
        nothing changes and the error propagates: the caller still holds the groups."""
        saved = copy.deepcopy(self._counters)
        c = self._counters
        for reason, n in dropped.items():
            c["dropped"][reason] = c["dropped"].get(reason, 0) + n
        if why == "pulled":
            c["groups_pulled"] += len(items)
            c["rows_pulled"] += len(items) * self._g
        if self._persist_dir is not None:
            self._unlink_due.update({r.file_name: why for r in items})
            try:
                self._write_ledger()
            except OSError:
                self._counters = saved
                for r in items:
                    self._unlink_due.pop(r.file_name, None)
                raise
            store.delete_left(self._persist_dir, self._unlink_due)  # what stays is retried on the next pull
        if why != "pulled":
            self._dropped.extend((r.group_id, why.removeprefix("dropped:")) for r in items)
        for r in items:
            self._ready_ids.discard(r.group_id)
            self._retired.append(r.group_id)
            self._retired_ids.add(r.group_id)
        while len(self._retired) > _RETIRED_MEMORY:
            self._retired_ids.discard(self._retired.popleft())

    # ------------------------------------------------------------------ counters and persistence

    def stats(self) -> dict[str, Any]:
        """JSON-serialisable counters; `groups` is by state, for rvpo_buffer_groups{state}."""
        c = copy.deepcopy(self._counters)
        c["groups"] = {"pending": len(self._pending), "ready": len(self._ready), "pulled": c["groups_pulled"],
                       "dropped": sum(c["dropped"].values())}
        c["capacity_groups"] = self.capacity_groups
        return c

    def state_dict(self) -> dict[str, Any]:
        return {"counters": copy.deepcopy(self._counters), "next_seq": self._seq}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        counters = state.get("counters", {})
        unknown = sorted(set(counters) - set(self._counters))
        if unknown:
            raise ValueError(f"unknown buffer counter(s) {unknown}; known: {sorted(self._counters)}")
        for key, v in counters.items():
            self._counters[key] = copy.deepcopy(v) if not isinstance(v, dict) else {**self._counters[key], **v}
        self._seq = max(self._seq, int(state.get("next_seq", 0)))

    def _write_ledger(self) -> None:
        assert self._persist_dir is not None
        store.write_ledger(self._persist_dir, self._unlink_due, self.state_dict())

    @classmethod
    def restore(cls, persist_dir: str, judge_names: list[str], group_size: int, capacity_groups: int,
                max_staleness: int, *, clock: Callable[[], float] = time.time) -> "GroupBuffer":
        """A buffer holding every scored group in persist_dir that was neither pulled nor dropped, in
        the order they became ready; counters as of the last pull. An absent directory gives an empty one."""
        buf = cls(judge_names, group_size, capacity_groups, max_staleness, clock=clock)
        state, groups = store.load_dir(persist_dir, buf._schema)
        for seq, group_id, batch in groups:
            r = _Ready(group_id, seq, int(batch.column("policy_version")[0].as_py()), batch)
            buf._ready.append(r)
            buf._ready_ids.add(r.group_id)
            buf._seq = max(buf._seq, r.seq + 1)
        buf.load_state_dict(state)
        buf._persist_dir = persist_dir
        buf._write_ledger()
        return buf

