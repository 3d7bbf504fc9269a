"""One typed, frozen config tree, loaded from YAML with dotted `key=value` overrides.

Every key is a field of a frozen dataclass below. Loading checks each value's type against the field's
annotation and then each section's `check()` rules; any problem raises ConfigError naming the dotted key
and what would be valid. Nothing mutates a config after load: derive a new one with `override()`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Literal, Optional

import yaml


# YAML 1.1 reads 1e-4 (no dot) as a string; accept such strings where a number is expected
_FLOAT_RE = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key."""


@dataclass(frozen=True)
class RunConfig:
    mode: Literal["async", "sync"] = "async"
    steps: int = 20
    output_dir: str = "runs/tiny"
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # a fresh run may replace a previous run's files in output_dir
    progress: bool = True

    def check(self) -> Iterator[tuple[str, str]]:
        if self.steps < 1:
            yield "steps", f"must be >= 1, got {self.steps}"
        if self.resume and self.overwrite:
            yield "overwrite", "cannot be combined with run.resume (resume keeps the previous run's files)"


@dataclass(frozen=True)
class ModelConfig:
    path: str = ".cache/tiny-qwen2"
    build_if_missing: bool = True  # build the tiny local model at `path` when it is absent
    tiny_seed: int = 0
    max_model_len: int = 256

    def check(self) -> Iterator[tuple[str, str]]:
        if self.max_model_len < 16:
            yield "max_model_len", f"must be >= 16, got {self.max_model_len}"


@dataclass(frozen=True)
class TaskConfig:
    name: Literal["constraints", "file"] = "constraints"
    prompts_file: Optional[str] = None  # jsonl with a "prompt" field, for name=file
    num_prompts: int = 256

    def check(self) -> Iterator[tuple[str, str]]:
        if self.name == "file" and not self.prompts_file:
            yield "prompts_file", "is required when task.name is 'file'"
        if self.num_prompts < 1:
            yield "num_prompts", f"must be >= 1, got {self.num_prompts}"


@dataclass(frozen=True)
class RolloutConfig:
    num_engines: int = 1
    group_size: int = 8
    groups_per_step: int = 8
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache_memory_bytes: int = 64 * 1024 * 1024
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources per engine
    max_restarts: int = 1

    def check(self) -> Iterator[tuple[str, str]]:
        if self.num_engines < 1:
            yield "num_engines", f"must be >= 1, got {self.num_engines}"
        if self.group_size < 2:
            yield "group_size", f"must be >= 2 (group normalisation needs two samples), got {self.group_size}"
        if self.groups_per_step < 1:
            yield "groups_per_step", f"must be >= 1, got {self.groups_per_step}"
        if self.max_new_tokens < 1:
            yield "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"
        if not self.temperature > 0:
            yield "temperature", f"must be > 0, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    kind: Literal["regex", "length", "keywords", "forbidden", "json_schema", "exact_match", "llm", "http"]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: Optional[float] = None  # overrides judges.timeout_s

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.name:
            yield "name", "must be a non-empty string"
        if self.weight < 0:
            yield "weight", f"must be >= 0, got {self.weight}"


@dataclass(frozen=True)
class JudgesConfig:
    num_workers: int = 2
    min_workers: int = 1
    max_workers: int = 8
    concurrency: int = 8  # requests in flight per worker
    timeout_s: float = 10.0
    max_retries: int = 1
    num_cpus: float = 0.25
    resources: dict[str, float] = field(default_factory=dict)
    autoscale: bool = False  # follow queue depth within [min_workers, max_workers]
    specs: list[JudgeSpec] = field(default_factory=list)

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.min_workers <= self.num_workers <= self.max_workers:
            yield "num_workers", (f"must be within [min_workers, max_workers] = "
                                  f"[{self.min_workers}, {self.max_workers}], got {self.num_workers}")
        if self.min_workers < 1:
            yield "min_workers", f"must be >= 1, got {self.min_workers}"
        if not self.timeout_s > 0:
            yield "timeout_s", f"must be > 0, got {self.timeout_s}"
        if self.max_retries < 0:
            yield "max_retries", f"must be >= 0, got {self.max_retries}"
        if self.concurrency < 1:
            yield "concurrency", f"must be >= 1, got {self.concurrency}"
        names = [s.name for s in self.specs]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            yield "specs", f"judge names must be unique, repeated: {dup}"


@dataclass(frozen=True)
class AlgoConfig:
    aggregator: Literal["mean", "gdpo", "rvpo", "rvpo_explicit", "min"] = "rvpo"
    k_risk: float = 1.0
    beta: float = 0.5
    reward_weights: Optional[list[float]] = None  # one per judge spec; None = uniform
    batch_norm: bool = True
    eps: float = 1e-4
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.28
    is_mode: Literal["truncate", "mask", "none"] = "truncate"
    is_cap: float = 2.0
    is_low: float = 0.5
    is_high: float = 5.0
    is_level: Literal["token", "sequence"] = "token"
    staleness_decay: float = 1.0  # lambda in lambda**staleness; 1.0 = off
    nan_policy: Literal["error", "mask"] = "mask"  # what a non-finite judge score becomes

    def check(self) -> Iterator[tuple[str, str]]:
        for key in ("k_risk", "beta", "eps", "is_cap", "is_low", "is_high", "clip_eps_low", "clip_eps_high"):
            if not math.isfinite(getattr(self, key)):
                yield key, f"must be a finite number, got {getattr(self, key)}"
        if not self.eps > 0:
            yield "eps", f"must be > 0, got {self.eps}"
        if not 0 <= self.clip_eps_low < 1:
            yield "clip_eps_low", f"must be in [0, 1), got {self.clip_eps_low}"
        if self.clip_eps_high < 0:
            yield "clip_eps_high", f"must be >= 0, got {self.clip_eps_high}"
        if self.aggregator == "rvpo" and not self.k_risk > 0:
            yield "k_risk", f"must be > 0 for the rvpo aggregator, got {self.k_risk}"
        if self.is_cap <= 0:
            yield "is_cap", f"must be > 0, got {self.is_cap}"
        if not 0 <= self.is_low < self.is_high:
            yield "is_low", f"must satisfy 0 <= is_low < is_high, got [{self.is_low}, {self.is_high}]"
        if not 0 < self.staleness_decay <= 1:
            yield "staleness_decay", f"must be in (0, 1], got {self.staleness_decay}"
        if self.reward_weights is not None and any(w < 0 for w in self.reward_weights):
            yield "reward_weights", f"must be non-negative, got {self.reward_weights}"


@dataclass(frozen=True)
class StalenessConfig:
    max_staleness: int = 2

    def check(self) -> Iterator[tuple[str, str]]:
        if self.max_staleness < 0:
            yield "max_staleness", f"must be >= 0, got {self.max_staleness}"


@dataclass(frozen=True)
class BufferConfig:
    capacity_groups: int = 256
    persist_dir: Optional[str] = None  # Arrow IPC spill of scored groups; None = <output_dir>/buffer

    def check(self) -> Iterator[tuple[str, str]]:
        if self.capacity_groups < 1:
            yield "capacity_groups", f"must be >= 1, got {self.capacity_groups}"


@dataclass(frozen=True)
class LearnerConfig:
    num_ranks: int = 1
    zero_stage: int = 2
    dtype: Literal["fp32", "bf16"] = "fp32"
    lr: float = 1e-4
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    grad_clip: float = 1.0
    # sequences per forward/backward pass; one optimizer step accumulates the gradients of every
    # micro-batch of the step's batch (gradient accumulation follows from the batch size)
    micro_batch_size: int = 64
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    sync_transport: Literal["object_store", "collective"] = "object_store"
    master_port: int = 29600

    def check(self) -> Iterator[tuple[str, str]]:
        if self.zero_stage not in (0, 1, 2, 3):
            yield "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"
        if self.num_ranks < 1:
            yield "num_ranks", f"must be >= 1, got {self.num_ranks}"
        if not self.lr > 0:
            yield "lr", f"must be > 0, got {self.lr}"
        if self.micro_batch_size < 1:
            yield "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}"
        if 10002 <= self.master_port <= 19999:
            yield "master_port", f"{self.master_port} lies in Ray's worker port range 10002-19999; pick another"


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 10  # steps; 0 = only the final checkpoint
    keep: int = 2

    def check(self) -> Iterator[tuple[str, str]]:
        if self.every < 0:
            yield "every", f"must be >= 0, got {self.every}"
        if self.keep < 1:
            yield "keep", f"must be >= 1, got {self.keep}"


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 20900

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0 <= self.port <= 65535:
            yield "port", f"must be a TCP port in [0, 65535], got {self.port}"
        if 10002 <= self.port <= 19999:
            yield "port", f"{self.port} lies in Ray's worker port range 10002-19999; pick another"


@dataclass(frozen=True)
class RayConfig:
    address: Optional[str] = None  # None: start a local Ray instance
    num_cpus: Optional[int] = None


@dataclass(frozen=True)
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    judges: JudgesConfig = field(default_factory=JudgesConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    staleness: StalenessConfig = field(default_factory=StalenessConfig)
    buffer: BufferConfig = field(default_factory=BufferConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def check(self) -> Iterator[tuple[str, str]]:
        w = self.algo.reward_weights
        if w is not None and len(w) != len(self.judges.specs):
            yield "algo.reward_weights", (f"needs one weight per judge spec ({len(self.judges.specs)}), "
                                          f"got {len(w)}")
        elif self.judges.specs and sum(self.reward_weights) <= 0:
            yield "algo.reward_weights", f"must not all be zero, got {self.reward_weights}"

    @property
    def reward_names(self) -> list[str]:
        return [s.name for s in self.judges.specs]

    @property
    def reward_weights(self) -> list[float]:
        if self.algo.reward_weights is not None:
            return list(self.algo.reward_weights)
        return [s.weight for s in self.judges.specs]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, *overrides: str) -> "Config":
        return from_dict(apply_overrides(self.to_dict(), overrides))


# ---------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__} {value!r}")
        return _build(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, got {type(value).__name__} {value!r}")
        return [_convert(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _convert(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}': expected true or false, got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}': expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}': expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(f"config key '{key}': unsupported type {tp}")  # pragma: no cover


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            where = f"under '{prefix}'" if prefix else "at the top level"
            raise ConfigError(f"unknown config key '{key}'{hint}; valid keys {where}: {', '.join(names)}")
        kwargs[k] = _convert(v, hints[k], key)
    for f in dataclasses.fields(cls):
        if f.name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{prefix}.{f.name}' is required")
    obj = cls(**kwargs)
    for sub, problem in getattr(obj, "check", lambda: iter(()))():
        key = f"{prefix}.{sub}" if prefix else sub
        raise ConfigError(f"config key '{key}': {problem}")
    return obj


def from_dict(data: dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"a config must be a mapping at the top level, got {type(data).__name__}")
    return _build(Config, data, "")


def apply_overrides(data: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` strings (value parsed as YAML) to a nested dict, returning a new dict."""
    import copy
    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value (for example algo.k_risk=2.0)")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override for '{key}': value {raw!r} is not valid YAML ({e})") from e
        node = out
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            nxt = node.get(p)
            if nxt is None:
                nxt = node[p] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override '{key}': '{'.'.join(parts[:i + 1])}' is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when `path` is None) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p}: expected a mapping at the top level, got {type(loaded).__name__}")
        data = loaded
    return from_dict(apply_overrides(data, overrides))


def dump_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
