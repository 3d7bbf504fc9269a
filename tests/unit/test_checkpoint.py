"""Checkpoint files: atomic publication, verification that names the bad file, pruning, and loading that
never unpickles code. (Resuming a real DeepSpeed learner: tests/ray/test_learner.py.)"""

from __future__ import annotations

import ast
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from learner import checkpoint as ck

REPO = Path(__file__).resolve().parents[2]


def save_step(root: Path, step: int, keep: int = 5, payload: bytes = b"w" * 64) -> Path:
    """A checkpoint with the files a learner writes, filled with stand-in content."""
    tmp = ck.begin(root, step)
    (tmp / "model.safetensors").write_bytes(payload + bytes([step % 256]))
    torch.save({"base": {"state": {}, "param_groups": []}, "master": [torch.full((3,), float(step))]},
               tmp / "optimizer_rank0.pt")
    ck.write_json(tmp / "learner_state.json", {"version": step, "world_size": 1, "zero_stage": 2})
    ck.write_json(tmp / "extra.json", {"next_group_id": step * 10})
    return ck.finalize(root, tmp, step, keep)


def test_finalize_publishes_a_verified_step_dir_and_points_latest_at_it(tmp_path: Path) -> None:
    path = save_step(tmp_path, 10)
    assert path == tmp_path / "step_000010" and ck.find_latest(tmp_path) == path
    loaded = ck.load(tmp_path)
    assert loaded.step == 10 and loaded.state["version"] == 10 and loaded.extra == {"next_group_id": 100}
    manifest = ck.read_json(path / "manifest.json")
    assert set(manifest["files"]) == {"model.safetensors", "optimizer_rank0.pt", "learner_state.json", "extra.json"}
    assert manifest["files"]["model.safetensors"]["bytes"] == 65
    assert not list(tmp_path.glob(".tmp-*"))


def test_a_crash_mid_write_leaves_the_previous_latest_readable(tmp_path: Path) -> None:
    save_step(tmp_path, 1)
    tmp = ck.begin(tmp_path, 2)  # the writer dies after some files, before finalize
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert ck.find_latest(tmp_path) == tmp_path / "step_000001"
    assert ck.load(tmp_path).step == 1
    assert save_step(tmp_path, 2) == tmp_path / "step_000002"  # the next save clears the leftover
    assert ck.load(tmp_path).step == 2


def test_a_crash_while_replacing_the_latest_pointer_keeps_the_old_pointer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_step(tmp_path, 1)
    real_replace = os.replace

    def crash_on_pointer(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == ck.LATEST:
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ck.os, "replace", crash_on_pointer)
    with pytest.raises(OSError, match="simulated crash"):
        save_step(tmp_path, 2)
    monkeypatch.undo()
    assert (tmp_path / ck.LATEST).read_text().strip() == "step_000001"
    assert ck.load(tmp_path).step == 1


def test_only_the_newest_keep_checkpoints_remain(tmp_path: Path) -> None:
    for step in (1, 2, 3, 4):
        save_step(tmp_path, step, keep=2)
    assert [p.name for _, p in ck.list_steps(tmp_path)] == ["step_000003", "step_000004"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_a_damaged_file_raises_checkpoint_error_naming_it(tmp_path: Path, damage: str) -> None:
    path = save_step(tmp_path, 3)
    target = path / "model.safetensors"
    data = target.read_bytes()
    if damage == "flip":
        target.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:])
    elif damage == "truncate":
        target.write_bytes(data[:10])
    else:
        target.unlink()
    with pytest.raises(ck.CheckpointError, match=re.escape(str(target))):
        ck.load(tmp_path)


def test_a_missing_manifest_or_dangling_latest_raises_naming_the_file(tmp_path: Path) -> None:
    path = save_step(tmp_path, 4)
    (path / "manifest.json").unlink()
    with pytest.raises(ck.CheckpointError, match=re.escape(str(path / "manifest.json"))):
        ck.load(path)
    (tmp_path / ck.LATEST).write_text("step_000099\n")
    with pytest.raises(ck.CheckpointError, match="step_000099"):
        ck.load(tmp_path)
    with pytest.raises(ck.CheckpointError, match=re.escape(str(tmp_path / "empty" / ck.LATEST))):
        ck.load(tmp_path / "empty")


class _Payload:
    """An object whose unpickling would run code."""

    ran: list[str] = []

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_Payload.ran.append, ("code ran",))


def test_a_pt_file_holding_a_pickled_object_is_refused_without_running_it(tmp_path: Path) -> None:
    bad = tmp_path / "optimizer_rank0.pt"
    torch.save({"base": _Payload()}, bad)
    with pytest.raises(ck.CheckpointError, match=re.escape(str(bad))):
        ck.torch_load(bad)
    assert _Payload.ran == []


def test_every_torch_load_in_the_learner_uses_weights_only_and_nothing_imports_pickle() -> None:
    files = sorted((REPO / "learner").glob("*.py")) + [REPO / "actors" / "rollout" / "weight_receiver.py",
                                                          REPO / "rvpo_async" / "weight_format.py"]
    loads = 0
    for f in files:
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not any(n.split(".")[0] in ("pickle", "dill", "cloudpickle") for n in names), f
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                loads += 1
                kw = {k.arg: k.value for k in node.keywords}
                assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True, \
                    f"{f}:{node.lineno} calls torch.load without weights_only=True"
    assert loads >= 1


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ck.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.set_rng_state(ck.torch_load(tmp_path / "rng.pt"))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
