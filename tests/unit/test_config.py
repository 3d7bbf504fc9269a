"""The typed config tree: defaults, dotted overrides, and errors that name the offending key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rvpo_async.config import (AlgoConfig, Config, ConfigError, JudgeSpec, apply_overrides, dump_config, from_dict,
                               load_config)

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "configs"
TWO_JUDGES = "judges.specs=[{name: format, kind: regex}, {name: length, kind: length, weight: 2.0}]"


def test_defaults_load():
    cfg = load_config()
    assert cfg == Config()
    assert from_dict({}) == cfg
    assert cfg.algo.aggregator == "rvpo" and cfg.rollout.group_size >= 2


def test_empty_yaml_file_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()


@pytest.mark.parametrize("override, path, value", [
    ("rollout.group_size=4", ("rollout", "group_size"), 4),
    ("algo.k_risk=2.5", ("algo", "k_risk"), 2.5),
    ("algo.k_risk=3", ("algo", "k_risk"), 3.0),
    ("algo.batch_norm=false", ("algo", "batch_norm"), False),
    ("run.resume=true", ("run", "resume"), True),
    ("algo.aggregator=gdpo", ("algo", "aggregator"), "gdpo"),
    ("ray.address=auto", ("ray", "address"), "auto"),
    ("ray.num_cpus=4", ("ray", "num_cpus"), 4),
    ("rollout.resources={accelerator_x: 0.5}", ("rollout", "resources"), {"accelerator_x": 0.5}),
    ("rollout.resources.accelerator_x=2", ("rollout", "resources"), {"accelerator_x": 2.0}),
])
def test_dotted_override_sets_typed_value(override, path, value):
    cfg = load_config(None, [override])
    got = getattr(getattr(cfg, path[0]), path[1])
    assert got == value and type(got) is type(value)


def test_list_override_of_weights_and_nested_judge_specs():
    cfg = load_config(None, [TWO_JUDGES, "algo.reward_weights=[1, 0.5]"])
    assert cfg.judges.specs == [JudgeSpec(name="format", kind="regex"),
                                JudgeSpec(name="length", kind="length", weight=2.0)]
    assert cfg.reward_names == ["format", "length"]
    assert cfg.algo.reward_weights == [1.0, 0.5] and all(type(w) is float for w in cfg.algo.reward_weights)
    assert cfg.reward_weights == [1.0, 0.5]
    assert load_config(None, [TWO_JUDGES]).reward_weights == [1.0, 2.0]


def test_override_file_values_and_later_override_wins(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo:\n  k_risk: 0.5\n  aggregator: min\nrollout:\n  group_size: 4\n")
    cfg = load_config(p, ["algo.k_risk=2.0", "rollout.group_size=6", "rollout.group_size=12"])
    assert (cfg.algo.k_risk, cfg.algo.aggregator, cfg.rollout.group_size) == (2.0, "min", 12)


def test_apply_overrides_returns_new_dict():
    data = {"algo": {"k_risk": 1.0}}
    out = apply_overrides(data, ["algo.k_risk=2", "run.steps=3"])
    assert out == {"algo": {"k_risk": 2}, "run": {"steps": 3}}
    assert data == {"algo": {"k_risk": 1.0}}


def test_config_override_derives_new_config_and_keeps_original():
    cfg = load_config()
    new = cfg.override("algo.k_risk=4.0")
    assert new.algo.k_risk == 4.0 and cfg.algo.k_risk == AlgoConfig().k_risk


def test_dump_then_load_round_trips(tmp_path):
    cfg = load_config(None, [TWO_JUDGES, "algo.reward_weights=[1, 3]", "rollout.resources={x: 1}"])
    dump_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


# ---------------------------------------------------------------- errors name the key

@pytest.mark.parametrize("override, key, suggestion", [
    ("algo.krisk=2", "algo.krisk", "k_risk"),
    ("rollot.group_size=4", "rollot", "rollout"),
    ("rollout.group_sise=4", "rollout.group_sise", "group_size"),
    ("metrics.prot=9000", "metrics.prot", "port"),
])
def test_unknown_key_names_full_dotted_key_and_close_match(override, key, suggestion):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and suggestion in msg


def test_unknown_key_inside_judge_spec_names_its_path():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["judges.specs=[{name: a, kind: regex, wieght: 2}]"])
    assert "judges.specs[0].wieght" in str(e.value) and "weight" in str(e.value)


def test_unknown_key_in_yaml_file_is_reported(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("algo:\n  krisk: 2.0\n")
    with pytest.raises(ConfigError, match=r"algo\.krisk.*k_risk"):
        load_config(p)


@pytest.mark.parametrize("override, key, expected", [
    ("rollout.group_size=abc", "rollout.group_size", "integer"),
    ("rollout.group_size=2.5", "rollout.group_size", "integer"),
    ("run.resume=abc", "run.resume", "true or false"),
    ("run.resume=1", "run.resume", "true or false"),
    ("algo.k_risk=abc", "algo.k_risk", "number"),
    ("algo.k_risk=true", "algo.k_risk", "number"),
    ("algo.aggregator=median", "algo.aggregator", "rvpo"),
    ("algo.reward_weights=3", "algo.reward_weights", "list"),
    ("rollout.resources=[1]", "rollout.resources", "mapping"),
    ("algo=3", "algo", "mapping"),
])
def test_wrong_type_names_key_and_expected_type(override, key, expected):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert f"'{key}'" in msg and expected in msg


@pytest.mark.parametrize("overrides, key", [
    (["algo.k_risk=0"], "algo.k_risk"),
    (["algo.k_risk=-1.5"], "algo.k_risk"),
    (["rollout.group_size=1"], "rollout.group_size"),
    (["metrics.port=10002"], "metrics.port"),
    (["metrics.port=15000"], "metrics.port"),
    (["metrics.port=19999"], "metrics.port"),
    (["metrics.port=70000"], "metrics.port"),
    ([TWO_JUDGES, "algo.reward_weights=[1.0]"], "algo.reward_weights"),
    ([TWO_JUDGES, "algo.reward_weights=[1.0, 2.0, 3.0]"], "algo.reward_weights"),
    (["algo.reward_weights=[1.0, -1.0]", TWO_JUDGES], "algo.reward_weights"),
    (["judges.specs=[{name: a, kind: regex}, {name: a, kind: length}]"], "judges.specs"),
    (["judges.specs=[{name: a}]"], "judges.specs[0].kind"),
    (["algo.staleness_decay=0"], "algo.staleness_decay"),
    (["staleness.max_staleness=-1"], "staleness.max_staleness"),
    (["judges.engine.max_model_len=8"], "judges.engine.max_model_len"),
    (["judges.engine.num_gpus=-1"], "judges.engine.num_gpus"),
    (["judges.engine.model_path=' '"], "judges.engine.model_path"),
    (["judges.engine.kv_cache_memory_bytes=0"], "judges.engine.kv_cache_memory_bytes"),
])
def test_invalid_value_names_key(overrides, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert f"'{key}'" in str(e.value)


@pytest.mark.parametrize("override, path, value", [
    ("metrics.port=10001", ("metrics", "port"), 10001),
    ("metrics.port=20000", ("metrics", "port"), 20000),
    ("algo.k_risk=0.001", ("algo", "k_risk"), 0.001),
    ("rollout.group_size=2", ("rollout", "group_size"), 2),
    ("staleness.max_staleness=0", ("staleness", "max_staleness"), 0),
])
def test_boundary_values_are_accepted(override, path, value):
    cfg = load_config(None, [override])
    assert getattr(getattr(cfg, path[0]), path[1]) == value


def test_non_positive_k_risk_is_allowed_for_other_aggregators():
    assert load_config(None, ["algo.aggregator=gdpo", "algo.k_risk=0"]).algo.k_risk == 0.0


def test_exponent_float_without_dot_is_accepted():
    assert load_config(None, ["algo.eps=1e-4"]).algo.eps == 1e-4


def test_malformed_override_and_missing_file_raise():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["run.steps"])
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/config.yaml")


# ---------------------------------------------------------------- frozen

def _sections(obj):
    yield obj
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            yield from _sections(v)
        elif isinstance(v, list):
            for item in v:
                if dataclasses.is_dataclass(item):
                    yield from _sections(item)


def test_every_config_section_is_frozen():
    cfg = load_config(None, [TWO_JUDGES])
    sections = list(_sections(cfg))
    assert len(sections) >= 14
    for section in sections:
        name = dataclasses.fields(section)[0].name
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(section, name, getattr(section, name))


# ---------------------------------------------------------------- CLI

def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rvpo_async.cli", "config", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("override, key", [("algo.krisk=2", "algo.krisk"),
                                           ("rollout.group_size=abc", "rollout.group_size")])
def test_cli_config_bad_override_exits_2_naming_key(override, key):
    proc = _cli(override)
    assert proc.returncode == 2
    assert key in proc.stderr


def test_cli_config_prints_resolved_config():
    proc = _cli("algo.k_risk=3.5", "rollout.group_size=4")
    assert proc.returncode == 0, proc.stderr
    printed = yaml.safe_load(proc.stdout)
    assert printed["algo"]["k_risk"] == 3.5 and printed["rollout"]["group_size"] == 4
    assert from_dict(printed) == load_config(None, ["algo.k_risk=3.5", "rollout.group_size=4"])


# ---------------------------------------------------------------- shipped configs

# every config the README, docs, Makefile and tests name; a new file in configs/ is checked as well
KNOWN_CONFIGS = ["qwen2.5-1.5b-gpu.yaml", "rubric-gpu.yaml", "smollm2-cpu.yaml", "tiny-cpu-frequent.yaml",
                 "tiny-cpu-rubric-smollm2.yaml", "tiny-cpu-rubric.yaml", "tiny-cpu-rubric-rules.yaml", "tiny-cpu.yaml"]
SHIPPED = sorted(set(KNOWN_CONFIGS) | {p.name for p in CONFIG_DIR.glob("*.yaml")})


def test_configs_folder_ships_every_known_config():
    assert CONFIG_DIR.is_dir(), f"{CONFIG_DIR} is missing"
    missing = [n for n in KNOWN_CONFIGS if not (CONFIG_DIR / n).is_file()]
    assert not missing, f"{CONFIG_DIR} lacks {missing} (tiny-cpu.yaml is what make demo runs)"


def _file_values_differ(raw, loaded, key=""):
    """Where a value the YAML file sets is not the loaded config's value: keys the file leaves out keep their
    defaults and are not compared; an int in the file may load as a float, nothing else changes type."""
    if isinstance(raw, dict):
        assert isinstance(loaded, dict), f"{key}: the file sets a mapping, the config holds {loaded!r}"
        return [d for k, v in raw.items() for d in _file_values_differ(v, loaded.get(k, "<absent>"),
                                                                             f"{key}.{k}" if key else k)]
    if isinstance(raw, list):
        if not isinstance(loaded, list) or len(loaded) != len(raw):
            return [f"{key}: {raw!r} in the file, {loaded!r} loaded"]
        return [d for i, (r, v) in enumerate(zip(raw, loaded)) for d in _file_values_differ(r, v, f"{key}[{i}]")]
    same_type = type(raw) is type(loaded) or (type(raw) is int and type(loaded) is float)
    return [] if same_type and raw == loaded else [f"{key}: {raw!r} in the file, {loaded!r} loaded"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads_every_value_the_file_sets(name):
    path = CONFIG_DIR / name
    raw = yaml.safe_load(path.read_text())
    assert isinstance(raw, dict) and {"run", "model", "judges", "algo", "learner"} <= raw.keys(), sorted(raw or {})
    cfg = load_config(path)  # loading runs every section's validation
    assert not _file_values_differ(raw, cfg.to_dict()), _file_values_differ(raw, cfg.to_dict())
    # one reward per judge, in the file's order (a rubric judge's criteria are rewards "<name>/NN")
    assert list(dict.fromkeys(n.split("/")[0] for n in cfg.reward_names)) == [s["name"] for s in raw["judges"]["specs"]]
    assert len(cfg.reward_weights) == len(cfg.reward_names) and all(w > 0 for w in cfg.reward_weights)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_survives_a_dump_and_reload(name, tmp_path):
    cfg = load_config(CONFIG_DIR / name)
    dump_config(cfg, tmp_path / "again.yaml")
    assert load_config(tmp_path / "again.yaml") == cfg


def test_the_frequent_task_is_the_default_less_its_rare_success_judge():
    """tiny-cpu-frequent.yaml differs from tiny-cpu.yaml in its judges and output folder only (the e2e tests
    train tiny-cpu.yaml; the frequent one is not trained there)."""
    base, freq = load_config(CONFIG_DIR / "tiny-cpu.yaml"), load_config(CONFIG_DIR / "tiny-cpu-frequent.yaml")
    assert [s.name for s in base.judges.specs] == [s.name for s in freq.judges.specs] + ["keyword"]
    assert base.judges.specs[:-1] == freq.judges.specs
    same = dataclasses.replace(freq, judges=base.judges, run=dataclasses.replace(freq.run, output_dir=base.run.output_dir))
    assert same == base


def test_the_file_comparison_reports_a_value_the_loader_would_change():
    assert _file_values_differ({"a": {"b": 1, "c": [1, 2]}}, {"a": {"b": 1.0, "c": [1, 2], "d": 0}}) == []
    assert _file_values_differ({"a": {"b": 2}}, {"a": {"b": 3}}) == ["a.b: 2 in the file, 3 loaded"]
    assert _file_values_differ({"a": True}, {"a": 1}) and _file_values_differ({"a": 1}, {"a": "1"})
    assert _file_values_differ({"a": {"x": 1}}, {"a": {}}) and _file_values_differ({"a": [1]}, {"a": [1, 2]})


def test_judge_engine_placement_falls_back_to_the_judge_workers_and_follows_judges_engine():
    from rvpo_async.placement import actor_options

    base = ["judges.num_cpus=0.5", "judges.resources={rvpo_judge: 1}"]
    worker = actor_options("judge", load_config(None, base))
    assert actor_options("judge_engine", load_config(None, base)) == {**worker, "num_gpus": 0.0, "max_restarts": 1,
                                                                       "max_task_retries": 1}
    own = load_config(None, base + ["judges.engine.num_cpus=4", "judges.engine.num_gpus=1",
                                    "judges.engine.resources={rvpo_judge_gpu: 1}"])
    assert actor_options("judge_engine", own) == {"num_cpus": 4.0, "num_gpus": 1.0,
                                                  "resources": {"rvpo_judge_gpu": 1.0}, "max_restarts": 1,
                                                  "max_task_retries": 1}
    assert actor_options("judge", own) == worker  # the judge workers keep their own options


def test_min_new_tokens_must_fit_the_response_budget():
    from rvpo_async.config import Config, ConfigError

    assert Config().override("rollout.min_new_tokens=32").rollout.min_new_tokens == 32
    for bad in ("rollout.min_new_tokens=33", "rollout.min_new_tokens=-1"):
        with pytest.raises(ConfigError, match=r"'rollout.min_new_tokens': must be in \[0, max_new_tokens=32\]"):
            Config().override(bad)


def test_a_compiled_engine_needs_repacked_weight_loading():
    """rollout.compile traces the model on vLLM's packed CPU kernels; in_place loading swaps them out."""
    assert Config().override("rollout.compile=true").rollout.compile is True
    assert load_config(CONFIG_DIR / "tiny-cpu.yaml").rollout.compile is True  # the embedded default compiles
    with pytest.raises(ConfigError, match=r"'rollout.compile': needs weight_load=repack"):
        Config().override("rollout.compile=true", "rollout.weight_load=in_place")
