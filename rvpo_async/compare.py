"""A study (`rvpo-async compare`): the same task under several variants, each over several seeds.

A variant is a name and a set of config overrides (`rvpo:algo.aggregator=rvpo algo.k_risk=1`). Each
(variant, seed) run gets its own directory, `<out>/<variant>/seed<seed>`, and the study is resumable:
- a run whose report.json covers every step and whose saved config matches the one the study would run
  is finished and never recomputed;
- an unfinished run with a matching config and a checkpoint continues from it (run.resume);
- anything else (no checkpoint, another config) starts again in its directory.
So a killed study, started again with the same command, picks up where it stopped. `<out>/progress.json`
says where it stands; one study at a time holds `<out>/study.lock`. A run that fails (any error but a stop:
Ctrl-C, SIGTERM) is marked failed with its error, and the study goes on with the others; it reports what
finished and exits non-zero, and the same command tries the failed run again.

Output: study.json (every summary and pairwise test: rvpo_async.study_stats), study.md (tables) and
study.png (each metric over steps, mean over seeds with a band of one standard deviation).
"""

from __future__ import annotations

import fcntl
import json
import re
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from rvpo_async.config import Config, ConfigError, from_dict, load_config
from rvpo_async.fileio import atomic_write, brief_error
from rvpo_async.study_stats import study_summary

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
# keys that change neither the data nor the math of a run: a run may differ in them and still count
_IGNORED = {"run": ("resume", "overwrite", "progress"), "metrics": None, "ray": None, "checkpoint": None,
            "learner": ("master_port",), "rollout": ("engine_core",)}  # both engine cores sample the same tokens
_STUDY_OWNED = ("run.seed", "run.output_dir", "run.resume", "run.overwrite")

Runner = Callable[[Config], Any]


@dataclass(frozen=True)
class Variant:
    name: str
    overrides: tuple[str, ...] = ()


def parse_variant(text: str) -> Variant:
    """`name:key=value key=value` (or `name:` for the config as it is) -> Variant."""
    name, _, rest = text.partition(":")
    name = name.strip()
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(f"variant {text!r}: the name before ':' must be letters, digits, '_', '.', '+' or '-' "
                          f"(it names the run directory), got {name!r}")
    overrides = tuple(shlex.split(rest))
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"variant {name!r}: override {o!r} is not of the form key=value")
    return Variant(name, overrides)


def build_variants(variants: Sequence[str] = (), aggregators: Sequence[str] = ()) -> list[Variant]:
    """--variants specs, then one variant per --aggregators name (shorthand for `name:algo.aggregator=name`)."""
    out = [parse_variant(v) for v in variants]
    out += [Variant(a, (f"algo.aggregator={a}",)) for a in aggregators if a]
    if not out:
        raise ConfigError("a study needs at least one variant (--variants or --aggregators)")
    names = [v.name for v in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"variant names must be unique, repeated: {dup}")
    return out


@dataclass(frozen=True)
class PlannedRun:
    variant: str
    seed: int
    cfg: Config  # as a fresh run (run.resume false, run.overwrite true)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run.output_dir)


ORDERS = ("variants", "seeds")


def plan(config_path: str | None, overrides: Sequence[str], variants: Sequence[Variant], seeds: Sequence[int],
         out_dir: str | Path, order: str = "variants") -> list[PlannedRun]:
    """Every (variant, seed) run's config, all checked before any run starts, in the order they run: each
    variant's seeds in turn (`variants`), or each seed's variants in turn (`seeds`: a study cut short leaves
    whole seeds, every variant on each)."""
    if order not in ORDERS:
        raise ConfigError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    for o in list(overrides) + [o for v in variants for o in v.overrides]:
        if o.split("=", 1)[0].strip() in _STUDY_OWNED:
            raise ConfigError(f"override {o!r}: the study sets {', '.join(_STUDY_OWNED)} itself (use --seeds, --out)")
    runs = []
    for v in variants:
        for seed in seeds:
            run_dir = Path(out_dir) / v.name / f"seed{seed}"
            try:
                cfg = load_config(config_path, list(overrides) + list(v.overrides) + [
                    f"run.seed={seed}", f"run.output_dir={run_dir}", "run.resume=false", "run.overwrite=true"])
            except ConfigError as e:
                raise ConfigError(f"variant {v.name!r}: {e}") from None
            runs.append(PlannedRun(v.name, seed, cfg))
    if order == "seeds":
        runs.sort(key=lambda r: seeds.index(r.seed))  # stable: the variants keep their order within a seed
    return runs


def _fingerprint(cfg: Config) -> dict[str, Any]:
    d = cfg.to_dict()
    for section, keys in _IGNORED.items():
        if keys is None:
            d.pop(section, None)
        else:
            for k in keys:
                d.get(section, {}).pop(k, None)
    return d


def _saved_config_matches(run: PlannedRun) -> bool:
    import yaml

    path = run.run_dir / "config.yaml"
    if not path.is_file():
        return False
    try:
        saved = from_dict(yaml.safe_load(path.read_text()))
    except (ConfigError, yaml.YAMLError, TypeError):
        return False  # written by another version of the config: not the same run
    return _fingerprint(saved) == _fingerprint(run.cfg)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl, one training row per step: a step logged twice (a resumed run repeats the steps
    after its last checkpoint) keeps its last row."""
    by_step: dict[int, dict[str, Any]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if row.get("kind") == "eval":  # held-out evaluation rows: the study reads training steps
                continue
            by_step[int(row["step"])] = row
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}, line {n}: not a step row with a 'step' field ({e})") from None
    return [by_step[s] for s in sorted(by_step)]


def run_status(run: PlannedRun) -> str:
    """'done', 'resume' or 'fresh' (see the module docstring)."""
    if not _saved_config_matches(run):
        return "fresh"
    try:
        report = json.loads((run.run_dir / "report.json").read_text())
        finished = int(report["steps"]) >= run.cfg.run.steps
    except (OSError, ValueError, KeyError, TypeError):
        finished = False
    if finished and (run.run_dir / "metrics.jsonl").is_file():
        steps = {int(r["step"]) for r in read_rows(run.run_dir / "metrics.jsonl")}
        if set(range(1, run.cfg.run.steps + 1)) <= steps:
            return "done"
    return "resume" if (run.run_dir / "checkpoints" / "latest").is_file() else "fresh"


def _default_runner(cfg: Config) -> Any:
    from rvpo_async.driver import train

    return train(cfg)


@dataclass
class _Lock:
    path: Path

    def __enter__(self) -> "_Lock":
        self._fh = open(self.path, "w")
        try:
            fcntl.flock(self._fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._fh.close()
            raise RuntimeError(f"another study is running in {self.path.parent} (it holds {self.path})") from None
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fh, fcntl.LOCK_UN)
        self._fh.close()


def _write_progress(out: Path, runs: Sequence[PlannedRun], status: dict[tuple[str, int], str],
                    errors: Mapping[tuple[str, int], str] | None = None) -> None:
    errors = errors or {}

    def entry(r: PlannedRun) -> dict[str, Any]:
        key = (r.variant, r.seed)
        return {"variant": r.variant, "seed": r.seed, "dir": str(r.run_dir), "status": status[key],
                **({"error": errors[key]} if key in errors else {})}

    doc = {"updated": time.time(),
           "counts": {s: sum(1 for v in status.values() if v == s) for s in sorted(set(status.values()))},
           "runs": [entry(r) for r in runs]}
    atomic_write(out / "progress.json", json.dumps(doc, indent=2) + "\n")


def _stops_the_study(e: BaseException) -> bool:
    """Ctrl-C, exits and a run stopped by a signal (the driver's Interrupted, raised after its final checkpoint)
    stop the study; any other error fails only its run."""
    if not isinstance(e, Exception):
        return True
    driver = sys.modules.get("rvpo_async.driver")  # not imported: the error cannot be its Interrupted
    return driver is not None and isinstance(e, driver.Interrupted)


def execute(runs: Sequence[PlannedRun], out: Path, runner: Runner,
            errors: dict[tuple[str, int], str] | None = None) -> Iterator[tuple[PlannedRun, str]]:
    """Run what is not finished, one run at a time; yields (run, what was done: skipped|resumed|started|failed).
    A failed run's error goes into `errors` (and progress.json) and the study goes on."""
    errors = {} if errors is None else errors
    status = {(r.variant, r.seed): ("done" if run_status(r) == "done" else "pending") for r in runs}
    _write_progress(out, runs, status)
    for i, r in enumerate(runs, 1):
        state = run_status(r)
        if state == "done":
            yield r, "skipped"
            continue
        tag = f"[{i}/{len(runs)}] {r.variant} seed {r.seed}"
        print(f"{tag}: {'resuming from its checkpoint' if state == 'resume' else 'starting'} in {r.run_dir}",
              flush=True)
        status[(r.variant, r.seed)] = "running"
        _write_progress(out, runs, status)
        cfg = r.cfg.override("run.resume=true", "run.overwrite=false") if state == "resume" else r.cfg
        try:
            runner(cfg)
        except BaseException as e:
            if _stops_the_study(e):
                status[(r.variant, r.seed)] = "interrupted"
                _write_progress(out, runs, status, errors)
                raise
            errors[(r.variant, r.seed)] = brief = brief_error(e)
            status[(r.variant, r.seed)] = "failed"
            _write_progress(out, runs, status, errors)
            print(f"{tag}: failed ({brief}); the study goes on, and the same command tries this run again",
                  file=sys.stderr, flush=True)
            yield r, "failed"
            continue
        status[(r.variant, r.seed)] = "done" if run_status(r) == "done" else "unfinished"
        _write_progress(out, runs, status, errors)
        yield r, "resumed" if state == "resume" else "started"


def compare(config_path: str | None, overrides: Sequence[str], *, out_dir: str, variants: Sequence[str] = (),
            aggregators: Sequence[str] = (), seeds: Sequence[int] = (0,), runner: Runner | None = None,
            run: bool = True, order: str = "variants") -> dict[str, Any]:
    """Run (or, with run=False, only summarise) the study; returns study.json's content."""
    vs = build_variants(variants, aggregators)
    runs = plan(config_path, overrides, vs, seeds, out_dir, order)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    actions: dict[str, int] = {}
    errors: dict[tuple[str, int], str] = {}
    with _Lock(out / "study.lock"):
        if run:
            for _r, action in execute(runs, out, runner or _default_runner, errors):
                actions[action] = actions.get(action, 0) + 1
        finished = [r for r in runs if run_status(r) == "done"]
    failed = [{"variant": v, "seed": s, "error": e} for (v, s), e in errors.items()]
    if not finished:
        print(f"no finished run under {out} yet: nothing to summarise", flush=True)
        return {"runs_finished": 0, "runs_planned": len(runs), "this_invocation": actions, "failed": failed}
    by_variant: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for r in finished:
        by_variant.setdefault(r.variant, {})[r.seed] = read_rows(r.run_dir / "metrics.jsonl")[:r.cfg.run.steps]
    summary = study_summary(by_variant, study_reward_names(finished[0].cfg))
    summary.update({"config": config_path, "overrides": list(overrides), "seeds": list(seeds),
                    "variants_spec": {v.name: list(v.overrides) for v in vs}, "runs_finished": len(finished),
                    "runs_planned": len(runs), "this_invocation": actions, "failed": failed})
    from rvpo_async.study_report import plot_study, study_markdown

    (out / "study.json").write_text(json.dumps(summary, indent=2) + "\n")
    md = study_markdown(summary)
    (out / "study.md").write_text(md)
    plot_study(by_variant, summary["metrics"], out / "study.png")
    print(md)
    return summary



def study_reward_names(cfg: Config) -> list[str]:
    """The rewards a study reports one by one: every judge's but a rubric judge's slots (slot j is a different
    criterion in each prompt, so its mean over prompts means nothing); the rubric measures and the met ratio
    per tag stand for those."""
    return [n for spec in cfg.judges.specs if spec.kind != "rubric" for n in spec.slot_names]


def split_variant_args(variants: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """argparse's `--variants` takes every word after it, global `key=value` overrides included; a variant
    has its ':' before any '=', an override does not."""
    vs, ovs = [], list(overrides)
    for item in variants:
        colon, eq = item.find(":"), item.find("=")
        (vs if colon >= 0 and (eq < 0 or colon < eq) else ovs).append(item)
    return vs, ovs


def detach(config_path: str, overrides: Sequence[str], *, variants: Sequence[str], aggregators: str, seeds: str,
           out_dir: str, order: str = "variants") -> tuple[int, Path]:
    """Start the same study in a new session (it outlives this shell); returns (pid, log path)."""
    import subprocess

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "study.log"
    cmd = [sys.executable, "-m", "rvpo_async.cli", "compare", "--config", config_path, "--out", out_dir,
           "--seeds", seeds, "--aggregators", aggregators, "--order", order, *overrides]
    if variants:
        cmd += ["--variants", *variants]
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    (out / "study.pid").write_text(f"{proc.pid}\n")
    return proc.pid, log_path
