"""Experiment trackers: every metrics.jsonl scalar reaches TensorBoard's event files and W&B's offline
run file under the same name; a tracker that cannot start is a warning, never a failed run."""

from __future__ import annotations

import glob
import json
import logging
import struct
import time
from pathlib import Path

import pytest

from rvpo_async.config import load_config
from rvpo_async.report import StepLog
from rvpo_async.tracking import Trackers, flatten_scalars, start_trackers

ROWS = [
    {"step": 1, "policy_version": 1, "time": 1.7e9, "reward_mean": {"length": 0.5, "keyword": 0.125},
     "inter_variance": 0.25, "all_met_share": 0.0, "staleness_values": [0, 1], "batch_digest": "ab",
     "learner": {"loss": -0.5, "grad_norm": 2.0}, "timing": {"generate_s": 0.75}},
    {"step": 2, "policy_version": 2, "time": 1.7e9, "reward_mean": {"length": 0.625, "keyword": 0.25},
     "inter_variance": 0.125, "all_met_share": 0.25, "staleness_values": [1], "batch_digest": "cd",
     "learner": {"loss": -0.25, "grad_norm": 1.0}, "timing": {"generate_s": 0.5}},
    {"kind": "eval", "step": 2, "policy_version": 2, "time": 1.7e9,
     "eval": {"reward_mean": {"length": 0.75, "keyword": None}, "worst_reward_mean": 0.375, "all_met_share": 0.5}},
]


def expected() -> dict[str, dict[int, float]]:
    """Every numeric leaf of the rows, by '/'-joined path: written out independently of flatten_scalars."""
    def walk(d, prefix, step, out):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}/", step, out)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and not (prefix == "" and k in ("step", "time")):
                out.setdefault(prefix + k, {})[step] = float(v)
    out: dict[str, dict[int, float]] = {}
    for r in ROWS:
        walk(r, "", r["step"], out)
    return out


def test_flatten_names_nested_scalars_by_path_and_leaves_out_lists_strings_and_none():
    got = flatten_scalars(ROWS[2])
    assert got == {"policy_version": 2.0, "eval/reward_mean/length": 0.75, "eval/worst_reward_mean": 0.375,
                   "eval/all_met_share": 0.5}
    assert "staleness_values" not in flatten_scalars(ROWS[0]) and "batch_digest" not in flatten_scalars(ROWS[0])


def _run(tmp_path: Path, backends: list[str]) -> Path:
    cfg = load_config(None, [f"tracking.backends={json.dumps(backends)}", f"run.output_dir={tmp_path}"])
    trackers = start_trackers(cfg, tmp_path)
    assert sorted(trackers.backends) == sorted(backends)
    log = StepLog(tmp_path, trackers=trackers)
    for r in ROWS:
        log.write(r)
    log.close()
    trackers.close()
    return tmp_path / "tracking"


def test_tensorboard_event_files_hold_every_metrics_jsonl_scalar(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tdir = _run(tmp_path, ["tensorboard"])
    acc = EventAccumulator(str(tdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got = {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}
    want = expected()
    assert set(got) == set(want)
    for tag, by_step in want.items():
        assert got[tag] == pytest.approx(by_step), tag


def read_wandb_history(run_file: str) -> list[dict]:
    """History records of a W&B offline run file: a 7-byte ':W&B' header, then LevelDB-log records
    (crc32c, length, type) in 32 KiB blocks holding protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    pos, block, payload, rows = 7, 32768, b"", []
    while pos + 7 <= len(data):
        if block - (pos % block) < 7:  # a block's tail too short for a header is padding
            pos += block - (pos % block)
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):  # the end, or a record still being written
            break
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            rec = pb.Record()
            rec.ParseFromString(payload)
            payload = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({it.key or "/".join(it.nested_key): json.loads(it.value_json) for it in rec.history.item})
    return rows


def test_wandb_offline_run_holds_every_metrics_jsonl_scalar(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    tdir = _run(tmp_path, ["wandb"])
    files = glob.glob(str(tdir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, "no offline run: W&B must run offline when no key is set"
    # the W&B service may still be writing the run file when finish() returns: wait for every row
    deadline = time.monotonic() + 60
    while len(history := read_wandb_history(files[0])) < len(ROWS) and time.monotonic() < deadline:
        time.sleep(0.2)
    got: dict[str, dict[int, float]] = {}
    for h in history:
        for k, v in h.items():
            if not k.startswith("_") and k != "step":
                got.setdefault(k, {})[h["step"]] = v
    want = expected()
    assert set(got) == set(want)
    for tag, by_step in want.items():
        assert got[tag] == pytest.approx(by_step), tag


def test_mlflow_run_holds_the_scalars(tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    tdir = _run(tmp_path, ["mlflow"])
    client = MlflowClient(tracking_uri=(tdir / "mlruns").resolve().as_uri())
    run = client.search_runs([client.get_experiment_by_name("rvpo-async").experiment_id])[0]
    assert set(run.data.metrics) == set(expected())


def test_a_tracker_that_cannot_start_or_log_is_a_warning_not_a_failure(tmp_path, monkeypatch, caplog):
    import rvpo_async.tracking as tracking

    def broken(*_a, **_k):
        raise RuntimeError("no route to the tracking server")

    class FailsOnLog:
        def __init__(self, *_a):
            pass

        def log(self, *_a):
            raise OSError("disk full")

        def close(self):
            pass

    monkeypatch.setitem(tracking.BACKENDS, "mlflow", broken)
    monkeypatch.setitem(tracking.BACKENDS, "wandb", FailsOnLog)
    cfg = load_config(None, ["tracking.backends=[mlflow, wandb]"])
    with caplog.at_level(logging.WARNING, logger="rvpo_async"):
        trackers = start_trackers(cfg, tmp_path)
        assert list(trackers.backends) == ["wandb"]
        trackers.log(ROWS[0])
        trackers.log(ROWS[1])
        trackers.close()
    text = caplog.text
    assert "mlflow failed to start" in text and "no route" in text
    assert "wandb failed while logging" in text and text.count("disk full") == 1
    assert isinstance(Trackers({}), Trackers)
