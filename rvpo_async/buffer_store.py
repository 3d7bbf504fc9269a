"""Persistence of the group buffer (rvpo_async.buffer): one Arrow IPC file per ready group, plus a ledger.

Each group that becomes ready is written to its own Arrow IPC file (temp name, then os.replace, so a file is
whole or absent). Groups leaving the buffer (pulled or dropped) are first named in an atomically replaced JSON
ledger, then their files are deleted; `load_dir`, behind `GroupBuffer.restore`, reloads every file the ledger
does not name, so a restarted run loses no scored group. Pending groups are not persisted: they are generated
again.

The schema of a group's record batch is defined here too: every persisted file is checked against it when
read back, and its metadata keys travel with every file and every pulled table.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

from rvpo_async.fileio import atomic_write

JUDGE_NAMES_KEY = b"rvpo.judge_names"
GROUP_SIZE_KEY = b"rvpo.group_size"
LEDGER_NAME = "ledger.json"
_FILE_RE = re.compile(r"^group-(\d{12})-(-?\d+)\.arrow$")


class BufferCorrupt(RuntimeError):
    """A persisted buffer file cannot be read back; the message names the file."""


def buffer_schema(judge_names: list[str], group_size: int) -> pa.Schema:
    """Row = one sample. Position k of rewards/reward_mask/reward_status is judge judge_names[k]."""
    k = len(judge_names)
    return pa.schema([
        ("group_id", pa.int64()), ("sample_idx", pa.int32()), ("prompt_id", pa.string()),
        ("prompt_text", pa.string()), ("prompt_tokens", pa.list_(pa.int32())), ("response_text", pa.string()),
        ("response_tokens", pa.list_(pa.int32())), ("behaviour_logprobs", pa.list_(pa.float32())),
        ("finish_reason", pa.string()), ("rewards", pa.list_(pa.float32(), k)),
        ("reward_mask", pa.list_(pa.bool_(), k)), ("reward_status", pa.list_(pa.int8(), k)),
        ("policy_version", pa.int64()), ("engine", pa.string()), ("created_at", pa.float64()),
        ("scored_at", pa.float64()),
    ], metadata={JUDGE_NAMES_KEY: json.dumps(list(judge_names)).encode(), GROUP_SIZE_KEY: str(group_size).encode()})


def group_file_name(seq: int, group_id: int) -> str:
    """The file of the group that became ready seq-th; names sort in that order."""
    return f"group-{seq:012d}-{group_id}.arrow"


def open_fresh(persist_dir: str) -> None:
    """Create persist_dir if needed; refuse one holding scored group files from an earlier run."""
    os.makedirs(persist_dir, exist_ok=True)
    old = [n for n in os.listdir(persist_dir) if _FILE_RE.match(n)]
    if old:
        raise ValueError(f"persist_dir {persist_dir} holds {len(old)} scored group file(s) from an earlier "
                         f"run; use GroupBuffer.restore({persist_dir!r}, ...) or an empty directory")


def write_group_file(persist_dir: str, name: str, group_id: int, schema: pa.Schema, batch: pa.RecordBatch) -> None:
    path = os.path.join(persist_dir, name)
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, schema) as w:
        w.write_batch(batch)
    try:
        atomic_write(path, sink.getvalue().to_pybytes())
    except OSError as e:
        raise OSError(f"cannot persist scored group {group_id} to {path}: {e}") from e


def write_ledger(persist_dir: str, left: dict[str, str], state: dict[str, Any]) -> None:
    """Replace the ledger: `left` maps files of groups that left to why, `state` is GroupBuffer.state_dict()."""
    doc = {"left": left, **state}
    atomic_write(os.path.join(persist_dir, LEDGER_NAME), json.dumps(doc).encode())


def delete_left(persist_dir: str, due: dict[str, str]) -> None:
    """Delete the files named in due and drop each deleted (or already absent) one from due; a file that
    cannot be deleted stays in due, so it stays in the ledger and is retried next time."""
    for name in list(due):
        try:
            os.remove(os.path.join(persist_dir, name))
        except FileNotFoundError:
            pass
        except OSError:
            continue
        del due[name]


def read_group_file(path: str, schema: pa.Schema) -> pa.RecordBatch:
    try:
        with pa.OSFile(path, "rb") as f:
            table = ipc.open_file(f).read_all()
    except (pa.ArrowException, OSError) as e:
        raise BufferCorrupt(f"buffer file {path} is unreadable (truncated or corrupt): {e}") from e
    if not table.schema.equals(schema, check_metadata=True):
        raise BufferCorrupt(f"buffer file {path} has schema {table.schema} with metadata "
                            f"{table.schema.metadata}; this buffer expects {schema} with {schema.metadata}")
    n = int(schema.metadata[GROUP_SIZE_KEY])
    if table.num_rows != n:
        raise BufferCorrupt(f"buffer file {path} holds {table.num_rows} rows, expected one group of {n}")
    return table.combine_chunks().to_batches()[0]


def load_dir(persist_dir: str, schema: pa.Schema) -> tuple[dict[str, Any], list[tuple[int, int, pa.RecordBatch]]]:
    """What GroupBuffer.restore needs from persist_dir: the ledger's state (as state_dict() wrote it) and
    (seq, group_id, batch) of every group file the ledger does not name, in the order the groups became
    ready. Deletes unfinished temp files and the files of groups that left. An absent directory is created."""
    os.makedirs(persist_dir, exist_ok=True)
    ledger_path = os.path.join(persist_dir, LEDGER_NAME)
    ledger: dict[str, Any] = {}
    if os.path.exists(ledger_path):
        try:
            with open(ledger_path, "rb") as f:
                ledger = json.loads(f.read())
        except (OSError, ValueError) as e:
            raise BufferCorrupt(f"buffer ledger {ledger_path} is unreadable: {e}") from e
    left = ledger.get("left", {})
    groups: list[tuple[int, int, pa.RecordBatch]] = []
    for name in sorted(os.listdir(persist_dir)):
        path = os.path.join(persist_dir, name)
        m = _FILE_RE.match(name)
        if name.endswith(".tmp"):
            os.remove(path)  # a write that never finished: its group was not yet durable
        elif m and name in left:
            os.remove(path)
        elif m:
            groups.append((int(m.group(1)), int(m.group(2)), read_group_file(path, schema)))
    return {k: v for k, v in ledger.items() if k != "left"}, groups
