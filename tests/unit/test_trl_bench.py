"""`rvpo-async bench trl`: the steady-state window arithmetic and the printed table (the runs are faked here;
tests/e2e/test_bench_trl.py runs TRL's GRPOTrainer for real)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from rvpo_async.bench import trl as trl_bench


def test_window_rate_counts_steps_after_the_first_end_time_to_the_last() -> None:
    ends = [100.0, 110.0, 111.0, 113.0, 114.0]  # index 0: start; step 1 ends at 110 (start-up)
    samples = [0, 64, 64, 64, 64]
    assert trl_bench.window_rate(ends, samples, (1, 4)) == pytest.approx(3 * 64 / 4.0)
    assert trl_bench.window_rate(ends, samples, (0, 4)) == pytest.approx(4 * 64 / 14.0)


def test_window_rate_refuses_a_window_past_the_run() -> None:
    with pytest.raises(ValueError, match="window 2:9 needs 9 steps, the run logged 4"):
        trl_bench.window_rate([0.0, 1, 2, 3, 4], [0, 1, 1, 1, 1], (2, 9))


@pytest.mark.parametrize("text", ["6-30", "30:6", "a:b", "-1:3"])
def test_parse_window_names_the_flag(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--window"):
        trl_bench.parse_window(text)


def test_table_prints_rates_ratios_and_differences(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                                   tmp_path) -> None:
    step_s = {"trl": 2.0, "async": 3.0, "sync": 1.0}  # 64 samples per step: 32, 21.3 and 64 samples/s
    calls: list[str] = []

    def run_system(system, a, overrides, work, rep):
        calls.append(system)
        return [i * step_s[system] for i in range(6)], [0] + [64] * 5

    monkeypatch.setattr(trl_bench, "ensure_rung_model", lambda name, rung: str(tmp_path))
    monkeypatch.setattr(trl_bench, "run_system", run_system)
    assert trl_bench.bench_trl(["--repeats", "2", "--steps", "5", "--window", "1:5", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert calls == ["trl", "async", "sync", "async", "sync", "trl"]  # interleaved, order rotated
    assert "  trl             32.00" in out and "  sync            64.00" in out
    assert "async/trl: median of medians 0.67x" in out and "async/sync: median of medians 0.33x" in out
    assert "how the setups differ" in out


def test_the_differences_name_the_learner_threads_and_forward_of_the_config(monkeypatch: pytest.MonkeyPatch,
                                                                         capsys: pytest.CaptureFixture, tmp_path) -> None:
    monkeypatch.setattr(trl_bench, "ensure_rung_model", lambda name, rung: str(tmp_path))
    monkeypatch.setattr(trl_bench, "run_system", lambda s, a, o, w, r: ([float(i) for i in range(4)], [0] + [64] * 3))
    assert trl_bench.bench_trl(["--repeats", "1", "--steps", "3", "--window", "1:3", "--out", str(tmp_path),
                                "learner.num_threads=2", "learner.shared_prefix=false", "learner.length_buckets=2"]) == 0
    out = capsys.readouterr().out
    assert "2 torch thread(s) per learner rank" in out
    assert "learner.shared_prefix (false)" in out and "learner.length_buckets (2)" in out


def test_an_engine_core_system_runs_its_mode_with_that_core_and_prints_its_ratio(monkeypatch, tmp_path, capsys) -> None:
    commands: list[list[str]] = []

    def run(cmd, log, env):
        commands.append(cmd)
        run_dir = next(Path(c.split("=", 1)[1]) for c in cmd if c.startswith("run.output_dir="))
        per_step = 1.0 if "rollout.engine_core=inproc" in cmd else 2.0
        (run_dir / "metrics.jsonl").write_text("".join(
            json.dumps({"time": 1e9 + per_step * (i + 1), "trained_samples_total": 64 * (i + 1)}) + "\n"
            for i in range(5)))

    monkeypatch.setattr(trl_bench, "ensure_rung_model", lambda name, rung: str(tmp_path))
    monkeypatch.setattr(trl_bench, "_run", run)
    assert trl_bench.bench_trl(["--systems", "async-process,async-inproc", "--repeats", "1", "--steps", "5",
                                "--window", "1:5", "--out", str(tmp_path)]) == 0
    assert [("run.mode=async" in c, [x for x in c if x.startswith("rollout.engine_core=")]) for c in commands] == [
        (True, ["rollout.engine_core=process"]), (True, ["rollout.engine_core=inproc"])]
    assert "async-inproc/async-process: median of medians 2.00x" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        trl_bench.bench_trl(["--systems", "async-gpu"])
