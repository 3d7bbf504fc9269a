"""The study driver (rvpo_async.compare) with a fake runner: planning, resuming and the output files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rvpo_async import compare as cmp
from rvpo_async.config import Config, ConfigError, dump_config

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")
BASE = ["run.steps=10", "run.progress=false", "metrics.enabled=false"]
VARIANTS = ["gdpo:algo.aggregator=gdpo", "rvpo-k2:algo.aggregator=rvpo algo.k_risk=2"]


@pytest.fixture(autouse=True)
def _quick_plots(monkeypatch):
    """Drawing costs seconds a study; one test below draws for real."""
    from rvpo_async import study_report

    monkeypatch.setattr(study_report, "plot_study", lambda runs, metrics, path: Path(path).write_bytes(b""))


class FakeRunner:
    """Writes what a real run leaves behind; `stop_after` steps imitates a run killed after a checkpoint."""

    def __init__(self, stop_after: int | None = None, fail_on_call: int | None = None,
                 error: BaseException = KeyboardInterrupt("killed")) -> None:
        self.calls: list[Config] = []
        self.stop_after, self.fail_on_call, self.error = stop_after, fail_on_call, error

    def __call__(self, cfg: Config) -> dict:
        self.calls.append(cfg)
        if self.fail_on_call == len(self.calls):
            raise self.error
        run = Path(cfg.run.output_dir)
        run.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run / "config.yaml")
        start = 0
        if cfg.run.resume:
            start = int((run / "checkpoints" / "latest").read_text())
        last = cfg.run.steps if self.stop_after is None else min(self.stop_after, cfg.run.steps)
        bias = 0.1 * (cfg.algo.aggregator == "gdpo") + 0.01 * cfg.run.seed
        with open(run / "metrics.jsonl", "a" if cfg.run.resume else "w") as f:
            for s in range(start + 1, last + 1):
                v = min(1.0, bias + s / cfg.run.steps / 2)
                f.write(json.dumps({"step": s, "reward_mean": {n: v for n in cfg.reward_names},
                                    "worst_reward_mean": v / 2, "all_met_share": v / 4}) + "\n")
        (run / "checkpoints").mkdir(exist_ok=True)
        (run / "checkpoints" / "latest").write_text(str(last))
        report = {"steps": last}
        (run / "report.json").write_text(json.dumps(report))
        return report


def _study(out: Path, runner, *, overrides=BASE, seeds=(0, 1), run=True) -> dict:
    return cmp.compare(CONFIG, list(overrides), out_dir=str(out), variants=VARIANTS, seeds=seeds, runner=runner,
                       run=run)


def _never(cfg: Config) -> None:
    raise AssertionError(f"recomputed {cfg.run.output_dir}")


def test_a_finished_study_recomputes_nothing(tmp_path):
    runner = FakeRunner()
    first = _study(tmp_path, runner)
    assert sorted((Path(c.run.output_dir).parent.name, c.run.seed) for c in runner.calls) == [
        ("gdpo", 0), ("gdpo", 1), ("rvpo-k2", 0), ("rvpo-k2", 1)]
    assert all(not c.run.resume for c in runner.calls)
    for name in ("study.json", "study.md", "study.png", "progress.json"):
        assert (tmp_path / name).is_file(), name
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["counts"] == {"done": 4}
    # the same study again, and with overrides that change neither data nor math, starts no run
    again = _study(tmp_path, _never)
    _study(tmp_path, _never, overrides=BASE + ["metrics.port=23456", "checkpoint.every=3", "run.progress=true",
                                         "learner.master_port=23457", "rollout.engine_core=process"])
    assert again["variants"] == first["variants"] and again["pairs"] == first["pairs"]
    assert again["this_invocation"] == {"skipped": 4}


def test_a_killed_study_resumes_unfinished_runs_and_restarts_changed_ones(tmp_path):
    _study(tmp_path, FakeRunner(stop_after=6), seeds=(0,))  # every run stopped at step 6 of 10, checkpointed
    # one run has no checkpoint: it starts again; one was run under another config: it starts again
    import shutil

    shutil.rmtree(tmp_path / "gdpo" / "seed0" / "checkpoints")
    runner = FakeRunner()
    _study(tmp_path, runner, seeds=(0, 1))
    by_run = {(Path(c.run.output_dir).parent.name, c.run.seed): c for c in runner.calls}
    assert set(by_run) == {("gdpo", 0), ("gdpo", 1), ("rvpo-k2", 0), ("rvpo-k2", 1)}
    assert by_run[("rvpo-k2", 0)].run.resume and not by_run[("rvpo-k2", 0)].run.overwrite
    assert not by_run[("gdpo", 0)].run.resume and by_run[("gdpo", 0)].run.overwrite
    rows = cmp.read_rows(tmp_path / "rvpo-k2" / "seed0" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 11))

    changed = BASE + ["learner.lr=0.001"]
    runner = FakeRunner()
    _study(tmp_path, runner, overrides=changed, seeds=(0, 1))
    assert len(runner.calls) == 4 and all(c.run.overwrite and not c.run.resume for c in runner.calls)


def test_a_study_interrupted_between_runs_continues_with_the_rest(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        _study(tmp_path, FakeRunner(fail_on_call=3))
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["counts"] == {"done": 2, "interrupted": 1, "pending": 1}
    summary = _study(tmp_path, _never, run=False)  # --report-only: what is finished so far
    assert summary["runs_finished"] == 2 and list(summary["variants"]) == ["gdpo"]
    runner = FakeRunner()
    _study(tmp_path, runner)
    assert [(Path(c.run.output_dir).parent.name, c.run.seed) for c in runner.calls] == [("rvpo-k2", 0), ("rvpo-k2", 1)]


def test_study_json_and_md_carry_the_per_variant_and_pairwise_figures(tmp_path, monkeypatch):
    s = _study(tmp_path, FakeRunner(), seeds=(0, 1, 2))
    assert s["metrics"] == ["reward/length", "reward/format", "reward/safety", "reward/keyword",
                            "worst_reward_mean", "all_met_share"]
    g = s["variants"]["gdpo"]["metrics"]["reward/keyword"]
    # final: mean of the last tenth (1 step of 10) = min(1, 0.1 + 0.01 seed + 0.5), over seeds 0..2
    assert g["final"]["mean"] == pytest.approx(0.61)
    (pair,) = s["pairs"]
    t = pair["final"]["reward/keyword"]
    assert t["diff"] == pytest.approx(0.1) and t["exact"] and t["p_value"] == pytest.approx(2 / 20)
    md = (tmp_path / "study.md").read_text()
    for text in ("## Final value", "## Best value and late collapse", "gdpo - rvpo-k2", "all_met_share", "p=0.1",
                 f"over all {s['tests']} tests", "Significant at q < 0.05 (0):\n\n- none"):  # 3 vs 3: p >= 0.1
        assert text in md, text
    assert f"q={t['q_value']:.3g}" in md and t["q_value"] >= t["p_value"]
    monkeypatch.undo()
    from rvpo_async.study_report import plot_study

    runs = {name: {seed: cmp.read_rows(tmp_path / name / f"seed{seed}" / "metrics.jsonl") for seed in (0, 1, 2)}
            for name in ("gdpo", "rvpo-k2")}
    plot_study(runs, s["metrics"], tmp_path / "real.png")
    assert (tmp_path / "real.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_variant_specs_and_their_errors():
    assert cmp.parse_variant("rvpo-sched:algo.k_risk=1 'task.name=constraints'") == cmp.Variant(
        "rvpo-sched", ("algo.k_risk=1", "task.name=constraints"))
    assert cmp.parse_variant("base:") == cmp.Variant("base", ())
    vs = cmp.build_variants(["a:algo.k_risk=2"], ["mean", "gdpo"])
    assert [v.name for v in vs] == ["a", "mean", "gdpo"] and vs[1].overrides == ("algo.aggregator=mean",)
    with pytest.raises(ConfigError, match="repeated: \\['gdpo'\\]"):
        cmp.build_variants(["gdpo:algo.k_risk=2"], ["gdpo"])
    with pytest.raises(ConfigError, match="name before ':'"):
        cmp.parse_variant("../x:algo.k_risk=2")
    with pytest.raises(ConfigError, match="not of the form key=value"):
        cmp.parse_variant("a:algo.k_risk")
    with pytest.raises(ConfigError, match="variant 'bad'.*algo.aggregator"):
        cmp.plan(CONFIG, BASE, [cmp.Variant("bad", ("algo.aggregator=median",))], [0], "/tmp/unused")
    with pytest.raises(ConfigError, match="run.seed"):
        cmp.plan(CONFIG, BASE, [cmp.Variant("a", ("run.seed=3",))], [0], "/tmp/unused")


def test_global_overrides_typed_after_variants_are_told_apart():
    vs, ovs = cmp.split_variant_args(["rvpo:algo.k_risk=1", "mean:", "run.steps=300", "model.path=/a:b"], ["x=1"])
    assert vs == ["rvpo:algo.k_risk=1", "mean:"] and ovs == ["x=1", "run.steps=300", "model.path=/a:b"]


def test_read_rows_keeps_the_last_row_of_a_repeated_step_and_names_a_bad_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "v": 0}\n{"step": 2, "v": 0}\n{"step": 2, "v": 1}\n\n{"step": 3, "v": 0}\n')
    assert [(r["step"], r["v"]) for r in cmp.read_rows(p)] == [(1, 0), (2, 1), (3, 0)]
    p.write_text('{"step": 1}\n{"nostep": 2}\n')
    with pytest.raises(ValueError, match="metrics.jsonl, line 2"):
        cmp.read_rows(p)


def test_one_study_at_a_time_per_directory(tmp_path):
    with cmp._Lock(tmp_path / "study.lock"):
        with pytest.raises(RuntimeError, match="another study is running"):
            _study(tmp_path, _never)


def test_cli_report_only_parses_variants_followed_by_global_overrides(tmp_path, capsys):
    from rvpo_async.cli import main

    _study(tmp_path, FakeRunner())
    (tmp_path / "study.json").unlink()
    argv = ["compare", "--config", CONFIG, "--out", str(tmp_path), "--seeds", "0,1", "--report-only",
            "--variants", *VARIANTS, *BASE]
    assert main(argv) == 0
    s = json.loads((tmp_path / "study.json").read_text())
    assert s["runs_finished"] == 4 and s["overrides"] == BASE and s["this_invocation"] == {}
    assert "gdpo - rvpo-k2" in capsys.readouterr().out


def test_a_study_reports_rule_rewards_one_by_one_but_not_rubric_slots():
    from rvpo_async.config import load_config

    configs = Path(CONFIG).parent
    assert cmp.study_reward_names(load_config(CONFIG)) == ["length", "format", "safety", "keyword"]
    rubric = load_config(str(configs / "tiny-cpu-rubric-rules.yaml"))
    assert rubric.reward_names[:2] == ["rubric/00", "rubric/01"] and cmp.study_reward_names(rubric) == []
    mixed = load_config(str(configs / "tiny-cpu-rubric.yaml"))
    assert [s.kind for s in mixed.judges.specs] == ["length", "rubric"]
    assert cmp.study_reward_names(mixed) == ["length"]


def test_a_failed_run_is_recorded_and_the_study_goes_on_then_the_same_command_retries_it(tmp_path):
    runner = FakeRunner(fail_on_call=2, error=RuntimeError("engine died\nActorDiedError: rollout-0 is dead"))
    s = _study(tmp_path, runner)
    assert len(runner.calls) == 4  # the runs after the failed one still ran
    assert s["failed"] == [{"variant": "gdpo", "seed": 1, "error": "RuntimeError: ActorDiedError: rollout-0 is dead"}]
    assert s["runs_finished"] == 3 and s["variants"]["gdpo"]["seeds"] == [0]
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert progress["counts"] == {"done": 3, "failed": 1}
    (bad,) = [r for r in progress["runs"] if r["status"] == "failed"]
    assert (bad["variant"], bad["seed"], bad["error"]) == ("gdpo", 1, s["failed"][0]["error"])
    runner = FakeRunner()
    s = _study(tmp_path, runner)
    assert [(Path(c.run.output_dir).parent.name, c.run.seed) for c in runner.calls] == [("gdpo", 1)]
    assert s["failed"] == [] and s["runs_finished"] == 4


def test_a_run_stopped_by_a_signal_stops_the_study(tmp_path, monkeypatch):
    import sys
    import types

    class Interrupted(RuntimeError):
        pass

    monkeypatch.setitem(sys.modules, "rvpo_async.driver", types.SimpleNamespace(Interrupted=Interrupted))
    runner = FakeRunner(fail_on_call=2, error=Interrupted("SIGTERM"))
    with pytest.raises(Interrupted):
        _study(tmp_path, runner)
    assert len(runner.calls) == 2
    assert json.loads((tmp_path / "progress.json").read_text())["counts"] == {
        "done": 1, "interrupted": 1, "pending": 2}


def test_the_cli_exits_non_zero_naming_each_failed_run(tmp_path, monkeypatch, capsys):
    from rvpo_async.cli import main

    monkeypatch.setattr(cmp, "_default_runner", FakeRunner(fail_on_call=1, error=ValueError("bad row 3")))
    argv = ["compare", "--config", CONFIG, "--out", str(tmp_path), "--seeds", "0", "--variants", *VARIANTS, *BASE]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "1 run(s) failed: gdpo seed 0: ValueError: bad row 3" in err and "tries them again" in err


def test_order_seeds_runs_every_variant_on_a_seed_before_the_next_seed(tmp_path):
    runner = FakeRunner()
    cmp.compare(CONFIG, BASE, out_dir=str(tmp_path), variants=VARIANTS, seeds=(3, 1), runner=runner, order="seeds")
    assert [(Path(c.run.output_dir).parent.name, c.run.seed) for c in runner.calls] == [
        ("gdpo", 3), ("rvpo-k2", 3), ("gdpo", 1), ("rvpo-k2", 1)]
    runner = FakeRunner()
    cmp.compare(CONFIG, BASE, out_dir=str(tmp_path), variants=VARIANTS, seeds=(3, 1, 2), runner=runner)
    assert [(Path(c.run.output_dir).parent.name, c.run.seed) for c in runner.calls] == [("gdpo", 2), ("rvpo-k2", 2)]
    with pytest.raises(ConfigError, match="order must be one of variants, seeds, got 'random'"):
        cmp.compare(CONFIG, BASE, out_dir=str(tmp_path), variants=VARIANTS, runner=runner, order="random")


def test_detach_passes_the_order_on(tmp_path, monkeypatch):
    import subprocess

    seen = {}

    class Popen:
        def __init__(self, cmd, **kw):
            seen["cmd"], self.pid = cmd, 4242

    monkeypatch.setattr(subprocess, "Popen", Popen)
    pid, _ = cmp.detach(CONFIG, BASE, variants=VARIANTS, aggregators="", seeds="0,1", out_dir=str(tmp_path),
                        order="seeds")
    cmd = seen["cmd"]
    assert pid == 4242 and cmd[cmd.index("--order") + 1] == "seeds" and cmd[-len(VARIANTS):] == VARIANTS
