"""GroupBuffer without Ray: readiness, masking, staleness eviction, order, capacity, schema, tensors,
persistence."""

from __future__ import annotations

import json
import math
import os

import shutil

import pyarrow as pa
import pytest
import torch

from rvpo_async.buffer import (JUDGE_NAMES_KEY, BufferCorrupt, BufferFull, GroupBuffer, buffer_schema,
                               to_torch)
from rvpo_async.types import STATUS_CODES, JudgeResult, Prompt, RolloutGroup, Sample

JUDGES = ["fmt", "len", "kw"]
OK = "ok"


def make_group(gid: int, g: int = 2, version: int = 0, prompt_len: int = 3) -> RolloutGroup:
    """Sample i of group gid has 2 + i response tokens 100*gid + 10*i + t with logprob -(t + 1)/10 - i."""
    prompt = Prompt(f"p{gid}", f"prompt {gid}", tuple(range(1, prompt_len + 1)), {"answer": "x"})
    samples = tuple(
        Sample(tuple(100 * gid + 10 * i + t for t in range(2 + i)), tuple(-(t + 1) / 10 - i for t in range(2 + i)),
               "stop" if i % 2 == 0 else "length", f"response {gid}.{i}")
        for i in range(g))
    return RolloutGroup(gid, prompt, samples, version, "engine-0", 1000.0 + gid)


def value(gid: int, i: int, k: int) -> float:
    return float(gid * 100 + i * 10 + k)


def fill(buf: GroupBuffer, gid: int, g: int = 2, skip: set[tuple[int, int]] = frozenset()) -> None:
    for i in range(g):
        for k in range(len(JUDGES)):
            if (i, k) not in skip:
                buf.set_reward(gid, i, k, JudgeResult(value(gid, i, k), OK, 0.01))


def ready_buffer(gids: list[int], capacity: int = 8, max_staleness: int = 2, versions: dict[int, int] | None = None,
                 persist_dir: str | None = None) -> GroupBuffer:
    buf = GroupBuffer(JUDGES, 2, capacity, max_staleness, persist_dir)
    for gid in gids:
        buf.add_group(make_group(gid, version=(versions or {}).get(gid, 0)))
        fill(buf, gid)
    return buf


def pulled_ids(table: pa.Table | None) -> list[int]:
    return [] if table is None else table.column("group_id").to_pylist()[::2]


def test_group_is_ready_only_when_every_entry_is_present_or_masked() -> None:
    buf = GroupBuffer(JUDGES, 2, 4, 2)
    buf.add_group(make_group(1))
    fill(buf, 1, skip={(1, 2)})
    assert buf.stats()["groups"] == {"pending": 1, "ready": 0, "pulled": 0, "dropped": 0}
    assert buf.pull(4, 0) is None
    buf.set_reward(1, 1, 2, JudgeResult(math.nan, "timeout", 2.0, "deadline 2.0s passed"))
    assert buf.stats()["groups"]["ready"] == 1
    assert pulled_ids(buf.pull(4, 0)) == [1]


def test_masked_entries_are_counted_by_status_and_masked() -> None:
    buf = GroupBuffer(JUDGES, 2, 4, 2)
    buf.add_group(make_group(1))
    buf.set_rewards([(1, 0, 0, JudgeResult(math.nan, "timeout", 2.0)), (1, 0, 1, JudgeResult(math.nan, "error", 0.1)),
                     (1, 0, 2, JudgeResult(math.nan, "invalid", 0.1)), (1, 1, 0, JudgeResult(math.nan, OK, 0.1)),
                     (1, 1, 1, JudgeResult(math.inf, OK, 0.1)), (1, 1, 2, JudgeResult(0.5, OK, 0.1))])
    s = buf.stats()
    assert s["masked"] == {"timeout": 1, "error": 1, "invalid": 3}
    assert s["nonfinite_values"] == 2
    t = buf.pull(1, 0)
    assert t.column("reward_mask").to_pylist() == [[False, False, False], [False, False, True]]
    c = STATUS_CODES
    assert t.column("reward_status").to_pylist() == [[c["timeout"], c["error"], c["invalid"]],
                                                      [c["invalid"], c["invalid"], c["ok"]]]
    assert t.column("rewards").to_pylist()[1][2] == 0.5


def test_second_write_to_an_entry_is_ignored_and_counted() -> None:
    buf = GroupBuffer(JUDGES, 2, 4, 2)
    buf.add_group(make_group(1))
    buf.set_reward(1, 0, 0, JudgeResult(7.0, OK, 0.1))
    buf.set_reward(1, 0, 0, JudgeResult(9.0, OK, 0.1))
    fill(buf, 1, skip={(0, 0)})
    buf.set_reward(1, 1, 1, JudgeResult(9.0, OK, 0.1))  # group is ready
    t = buf.pull(1, 0)
    buf.set_reward(1, 1, 1, JudgeResult(9.0, OK, 0.1))  # group was pulled: a late retry
    assert buf.stats()["duplicate_writes"] == 3
    assert t.column("rewards").to_pylist()[0][0] == 7.0


def test_bad_reward_addresses_raise_naming_the_value() -> None:
    buf = GroupBuffer(JUDGES, 2, 4, 2)
    buf.add_group(make_group(1))
    r = JudgeResult(1.0, OK, 0.1)
    with pytest.raises(KeyError, match="group_id 99"):
        buf.set_reward(99, 0, 0, r)
    with pytest.raises(IndexError, match="sample_idx 2"):
        buf.set_reward(1, 2, 0, r)
    with pytest.raises(IndexError, match="judge_idx 3"):
        buf.set_reward(1, 0, 3, r)
    with pytest.raises(ValueError, match="maybe"):
        buf.set_reward(1, 0, 0, JudgeResult(1.0, "maybe", 0.1))  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        buf.set_rewards([(1, 0, 0, r), (1, 0, 9, r)])
    assert buf.stats()["entries_written"] == 0  # a bad batch stores nothing


def test_add_group_rejects_wrong_size_and_reused_id() -> None:
    buf = GroupBuffer(JUDGES, 3, 4, 2)
    with pytest.raises(ValueError, match="group 1 has 2 samples.*group_size is 3"):
        buf.add_group(make_group(1, g=2))
    buf.add_group(make_group(2, g=3))
    with pytest.raises(ValueError, match="group_id 2"):
        buf.add_group(make_group(2, g=3))


def test_full_buffer_raises_buffer_full_until_a_pull_frees_room() -> None:
    buf = ready_buffer([1, 2], capacity=2)
    assert not buf.has_room()
    with pytest.raises(BufferFull, match="capacity_groups 2"):
        buf.add_group(make_group(3))
    buf.pull(1, 0)
    assert buf.has_room()
    buf.add_group(make_group(3))


def test_pull_drops_groups_over_max_staleness_and_counts_them() -> None:
    buf = ready_buffer([1, 2, 3], max_staleness=1, versions={1: 0, 2: 1, 3: 2})
    assert pulled_ids(buf.pull(8, current_version=2)) == [2, 3]
    s = buf.stats()
    assert s["dropped"] == {"stale": 1}
    assert s["groups"] == {"pending": 0, "ready": 0, "pulled": 2, "dropped": 1}


def test_pull_returns_groups_in_the_order_they_became_ready() -> None:
    buf = GroupBuffer(JUDGES, 2, 8, 2)
    for gid in (1, 2, 3):
        buf.add_group(make_group(gid))
    for gid in (3, 1, 2):
        fill(buf, gid)
    assert pulled_ids(buf.pull(2, 0)) == [3, 1]
    assert pulled_ids(buf.pull(2, 0)) == [2]


def test_min_groups_returns_none_and_keeps_groups_until_enough_are_ready() -> None:
    buf = ready_buffer([1, 2])
    assert buf.pull(4, 0, min_groups=3) is None
    assert buf.stats()["groups"]["ready"] == 2
    buf.add_group(make_group(3))
    fill(buf, 3)
    assert pulled_ids(buf.pull(4, 0, min_groups=3)) == [1, 2, 3]


def test_schema_has_the_documented_types_and_judge_names_in_metadata() -> None:
    t = ready_buffer([1]).pull(1, 0)
    k = len(JUDGES)
    expected = {
        "group_id": pa.int64(), "prompt_id": pa.string(), "sample_idx": pa.int32(),
        "prompt_tokens": pa.list_(pa.int32()), "response_tokens": pa.list_(pa.int32()),
        "behaviour_logprobs": pa.list_(pa.float32()), "finish_reason": pa.string(),
        "rewards": pa.list_(pa.float32(), k), "reward_mask": pa.list_(pa.bool_(), k),
        "reward_status": pa.list_(pa.int8(), k), "policy_version": pa.int64(), "engine": pa.string(),
        "created_at": pa.float64(), "scored_at": pa.float64(), "prompt_text": pa.string(),
        "response_text": pa.string(),
    }
    assert {f.name: f.type for f in t.schema} == expected
    assert json.loads(t.schema.metadata[JUDGE_NAMES_KEY]) == JUDGES
    assert t.schema == buffer_schema(JUDGES, 2)
    assert t.column("response_text").to_pylist() == ["response 1.0", "response 1.1"]
    assert t.column("created_at").to_pylist() == [1001.0, 1001.0]


def test_to_torch_shapes_and_logprobs_sit_on_their_response_tokens() -> None:
    buf = GroupBuffer(JUDGES, 2, 8, 2)
    buf.add_group(make_group(1, prompt_len=3))
    buf.add_group(make_group(2, prompt_len=1, version=1))
    fill(buf, 1)
    fill(buf, 2, skip={(0, 1)})
    buf.set_reward(2, 0, 1, JudgeResult(math.nan, "timeout", 2.0))
    d = to_torch(buf.pull(2, 1), pad_id=-1)
    assert d["input_ids"].shape == (4, 6)  # longest row: 3 prompt + 3 response tokens
    assert d["rewards"].shape == d["reward_mask"].shape == (2, 2, 3)
    assert d["input_ids"][3].tolist() == [1, 210, 211, 212, -1, -1]  # group 2, sample 1
    assert d["response_mask"][3].tolist() == [False, True, True, True, False, False]
    assert d["attention_mask"][3].tolist() == [1, 1, 1, 1, 0, 0]
    assert d["behaviour_logprobs"][3].tolist() == pytest.approx([0, -1.1, -1.2, -1.3, 0, 0])
    assert d["input_ids"][0].tolist() == [1, 2, 3, 100, 101, -1]
    assert d["behaviour_logprobs"][0].tolist() == pytest.approx([0, 0, 0, -0.1, -0.2, 0])
    assert d["rewards"][1, 1].tolist() == [value(2, 1, k) for k in range(3)]
    assert d["reward_mask"][1].tolist() == [[True, False, True], [True, True, True]]
    assert d["policy_version"].tolist() == [0, 0, 1, 1]
    assert d["group_ids"].tolist() == [1, 2]
    assert d["prompt_lens"].tolist() == [3, 3, 1, 1] and d["response_lens"].tolist() == [2, 3, 2, 3]


def test_to_torch_rewards_view_arrow_memory_without_copy() -> None:
    t = ready_buffer([1, 2]).pull(2, 0)
    values = t.column("rewards").chunk(0).flatten()
    d = to_torch(t, pad_id=0)
    assert d["rewards"].data_ptr() == values.buffers()[1].address
    copied = to_torch(t, pad_id=0, writable=True)
    assert copied["rewards"].data_ptr() != values.buffers()[1].address
    assert torch.equal(copied["rewards"], d["rewards"])


def test_restored_buffer_returns_unpulled_groups_but_not_pulled_or_dropped_ones(tmp_path) -> None:
    d = str(tmp_path / "buf")
    buf = ready_buffer([1, 2, 3, 4], persist_dir=d, versions={4: 0, 1: 2, 2: 2, 3: 2})
    buf.pull(1, current_version=3)  # drops group 4 (stale), pulls group 1
    restored = GroupBuffer.restore(d, JUDGES, 2, 8, 2)
    assert restored.stats()["groups"] == {"pending": 0, "ready": 2, "pulled": 1, "dropped": 1}
    expected = buf.pull(8, 3)
    got = restored.pull(8, 3)
    assert pulled_ids(got) == [2, 3]
    assert got.equals(expected, check_metadata=True)
    assert GroupBuffer.restore(d, JUDGES, 2, 8, 2).pull(8, 3) is None


def test_pending_groups_are_not_persisted(tmp_path) -> None:
    d = str(tmp_path / "buf")
    buf = ready_buffer([1], persist_dir=d)
    buf.add_group(make_group(2))
    fill(buf, 2, skip={(0, 0)})
    assert pulled_ids(GroupBuffer.restore(d, JUDGES, 2, 8, 2).pull(8, 0)) == [1]


def test_file_of_a_pulled_group_that_survived_a_crash_is_not_restored(tmp_path) -> None:
    d = str(tmp_path / "buf")
    buf = ready_buffer([1, 2], persist_dir=d)
    first = os.path.join(d, "group-000000000000-1.arrow")
    shutil.copy(first, str(tmp_path / "saved"))
    buf.pull(1, 0)  # ledger names group 1, then its file is deleted
    shutil.copy(str(tmp_path / "saved"), first)  # as if the process died between the two
    with open(os.path.join(d, "group-000000000002-3.arrow.tmp"), "wb") as f:
        f.write(b"half a write")
    restored = GroupBuffer.restore(d, JUDGES, 2, 8, 2)
    assert sorted(os.listdir(d)) == ["group-000000000001-2.arrow", "ledger.json"]
    assert pulled_ids(restored.pull(8, 0)) == [2]


def test_corrupt_group_file_raises_an_error_naming_the_file(tmp_path) -> None:
    d = str(tmp_path / "buf")
    ready_buffer([1], persist_dir=d)
    (name,) = [n for n in os.listdir(d) if n.endswith(".arrow")]
    path = os.path.join(d, name)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    with pytest.raises(BufferCorrupt, match=name):
        GroupBuffer.restore(d, JUDGES, 2, 8, 2)


def test_group_file_written_for_other_judges_is_refused_naming_the_file(tmp_path) -> None:
    d = str(tmp_path / "buf")
    ready_buffer([1], persist_dir=d)
    with pytest.raises(BufferCorrupt, match=r"group-000000000000-1\.arrow"):
        GroupBuffer.restore(d, ["fmt", "len"], 2, 8, 2)


def test_persist_dir_with_earlier_groups_is_refused_without_restore(tmp_path) -> None:
    d = str(tmp_path / "buf")
    ready_buffer([1], persist_dir=d)
    with pytest.raises(ValueError, match="GroupBuffer.restore"):
        GroupBuffer(JUDGES, 2, 8, 2, d)


def test_state_dict_round_trips_through_json() -> None:
    buf = ready_buffer([1, 2])
    buf.pull(1, 0)
    other = GroupBuffer(JUDGES, 2, 8, 2)
    other.load_state_dict(json.loads(json.dumps(buf.state_dict())))
    assert other.state_dict() == buf.state_dict()
    assert other.stats()["rows_pulled"] == 2


def test_groups_admitted_after_a_checkpoint_are_dropped_counted_and_their_ids_reusable(tmp_path) -> None:
    d = str(tmp_path / "buf")
    # checkpoint at version 2 with next_group_id 5; group 3 was regenerated after it by version-3 weights
    buf = ready_buffer([1, 2, 3, 5, 6], persist_dir=d, versions={1: 1, 2: 2, 3: 3, 5: 3, 6: 3})
    restored = GroupBuffer.restore(d, JUDGES, 2, 8, 2)
    assert restored.discard_after_checkpoint(5, 2) == 3
    assert restored.ready_group_ids() == [1, 2]
    assert restored.stats()["dropped"]["after_checkpoint"] == 3
    assert sorted(restored.take_dropped()) == [(3, "after_checkpoint"), (5, "after_checkpoint"),
                                               (6, "after_checkpoint")]
    assert restored.take_dropped() == []
    # the replay admits the same ids again
    restored.add_group(make_group(5))
    fill(restored, 5)
    assert pulled_ids(restored.pull(8, 0)) == [1, 2, 5]
    # and a later restore does not bring the dropped copies back
    again = GroupBuffer.restore(d, JUDGES, 2, 8, 2)
    assert again.ready_group_ids() == [] and buf.stats()["groups"]["ready"] == 5


def test_stale_drops_are_reported_once_by_id() -> None:
    buf = ready_buffer([1, 2], versions={1: 0, 2: 3})
    assert buf.evict_stale(3) == 1
    assert buf.take_dropped() == [(1, "stale")]
    assert buf.take_dropped() == []
    assert pulled_ids(buf.pull(2, 3)) == [2] and buf.take_dropped() == []
