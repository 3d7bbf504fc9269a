"""run.auto_resume: a retried driver continues its own run, starts afresh where nothing was checkpointed, and
refuses a run directory that holds another config's checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from learner import checkpoint as ck
from rvpo_async.config import dump_config, load_config
from rvpo_async.run_dir import resolve_auto_resume


def _run_dir_with_checkpoint(tmp_path: Path, *overrides: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    dump_config(load_config(None, [f"run.output_dir={run}", *overrides]), run / "config.yaml")
    tmp = ck.begin(run / "checkpoints", 4)
    (tmp / "model.safetensors").write_bytes(b"w" * 16)
    ck.write_json(tmp / "learner_state.json", {"version": 4, "world_size": 1, "zero_stage": 2})
    ck.finalize(run / "checkpoints", tmp, 4, 2)
    return run


def test_without_a_checkpoint_the_run_starts_afresh(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text("{}\n")  # a run that died before its first checkpoint
    cfg = resolve_auto_resume(load_config(None, [f"run.output_dir={tmp_path}", "run.auto_resume=true"]))
    assert (cfg.run.resume, cfg.run.overwrite, cfg.run.auto_resume) == (False, True, False)


def test_a_checkpoint_of_the_same_config_is_resumed_even_with_more_steps(tmp_path: Path) -> None:
    run = _run_dir_with_checkpoint(tmp_path, "run.steps=10")
    cfg = resolve_auto_resume(load_config(None, [f"run.output_dir={run}", "run.steps=20", "run.auto_resume=true"]))
    assert (cfg.run.resume, cfg.run.overwrite, cfg.run.steps) == (True, False, 20)


def test_a_checkpoint_of_another_config_is_refused_naming_the_keys(tmp_path: Path) -> None:
    run = _run_dir_with_checkpoint(tmp_path, "algo.k_risk=2.0")
    with pytest.raises(ValueError, match=r"algo\.k_risk"):
        resolve_auto_resume(load_config(None, [f"run.output_dir={run}", "run.auto_resume=true"]))


def test_auto_resume_off_changes_nothing(tmp_path: Path) -> None:
    cfg = load_config(None, [f"run.output_dir={_run_dir_with_checkpoint(tmp_path)}"])
    assert resolve_auto_resume(cfg) is cfg


def test_a_checkpoint_without_its_run_config_is_refused(tmp_path: Path) -> None:
    run = _run_dir_with_checkpoint(tmp_path)
    (run / "config.yaml").unlink()
    with pytest.raises(ValueError, match="different config"):
        resolve_auto_resume(load_config(None, [f"run.output_dir={run}", "run.auto_resume=true"]))


def test_only_run_length_and_restart_flags_may_change_on_resume(tmp_path: Path) -> None:
    run = _run_dir_with_checkpoint(tmp_path)
    same = [f"run.output_dir={run}", "run.auto_resume=true"]
    cfg = resolve_auto_resume(load_config(None, same + ["run.steps=99", "run.progress=false", "run.overwrite=true"]))
    assert (cfg.run.resume, cfg.run.overwrite, cfg.run.auto_resume, cfg.run.steps) == (True, False, False, 99)
    for change, key in [("judges.engine.max_model_len=4096", "judges.engine.max_model_len"),
                        ("rollout.resources={x: 1}", "rollout.resources"), ("run.seed=9", "run.seed")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            resolve_auto_resume(load_config(None, same + [change]))
