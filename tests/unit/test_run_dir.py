"""A run's directory (rvpo_async/run_dir.py): a fresh run refuses another run's files unless run.overwrite
says so, and then removes only what would mix two runs; a resumed run keeps them."""

from __future__ import annotations

from pathlib import Path

import pytest

from rvpo_async.config import load_config
from rvpo_async.run_dir import prepare_run_dir

LEFTOVERS = ("checkpoints", "buffer", "metrics.jsonl")


def _old_run(run: Path) -> None:
    for d in ("checkpoints/step_000004", "buffer", "final_model", "tracking"):
        (run / d).mkdir(parents=True)
        (run / d / "f").write_text("old")
    for f in ("metrics.jsonl", "eval.png", "config.yaml", "notes.txt"):
        (run / f).write_text("old")


def _cfg(run: Path, *overrides: str):
    return load_config(None, [f"run.output_dir={run}", *overrides])


def test_a_fresh_run_creates_its_directory_with_parents(tmp_path: Path) -> None:
    run = tmp_path / "a" / "b" / "run"
    assert prepare_run_dir(_cfg(run)) == run and run.is_dir() and not any(run.iterdir())


def test_a_directory_without_run_files_is_used_as_it_is(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert prepare_run_dir(_cfg(tmp_path)) == tmp_path
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("leftover", LEFTOVERS)
def test_a_fresh_run_refuses_each_kind_of_leftover_naming_it_and_the_ways_out(tmp_path: Path, leftover: str) -> None:
    target = tmp_path / leftover
    if leftover.endswith(".jsonl"):
        target.write_text("{}\n")
    else:
        target.mkdir()
    with pytest.raises(FileExistsError, match=leftover) as e:
        prepare_run_dir(_cfg(tmp_path))
    assert "--resume" in str(e.value) and "run.overwrite=true" in str(e.value)
    assert target.exists()  # nothing removed


def test_overwrite_removes_the_old_run_and_its_tracker_files_but_nothing_else(tmp_path: Path) -> None:
    _old_run(tmp_path)
    prepare_run_dir(_cfg(tmp_path, "run.overwrite=true"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "notes.txt"]


def test_a_resumed_run_keeps_every_file_of_the_run(tmp_path: Path) -> None:
    _old_run(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert prepare_run_dir(_cfg(tmp_path, "run.resume=true")) == tmp_path
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "metrics.jsonl").read_text() == "old"
