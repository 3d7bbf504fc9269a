"""One typed, frozen config tree, loaded from YAML with dotted `key=value` overrides.

Every key is a field of a frozen dataclass below. Loading checks each value's type against the field's
annotation and then each section's `check()` rules; any problem raises ConfigError naming the dotted key
and what would be valid. Nothing mutates a config after load: derive a new one with `override()`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Optional

# the judge sections and the loading machinery live in their own modules; callers import them from here
from rvpo_async.config_judges import JudgeEngineConfig, JudgesConfig, JudgeSpec  # noqa: F401
from rvpo_async.config_load import ConfigError, apply_overrides, build, dump_config, read_config_file
from rvpo_async.gpu_share import check_gpu_shares


@dataclass(frozen=True)
class RunConfig:
    mode: Literal["async", "sync"] = "async"
    steps: int = 20
    output_dir: str = "runs/tiny"
    seed: int = 0
    resume: bool = False  # continue from the latest checkpoint in output_dir
    overwrite: bool = False  # a fresh run may replace a previous run's files in output_dir
    auto_resume: bool = False  # resume if output_dir holds a checkpoint of this config (a retried KubeRay driver)
    max_restarts: int = 2  # in-run recoveries after an actor died: stop all actors, resume from the last checkpoint
    progress: bool = True

    def check(self) -> Iterator[tuple[str, str]]:
        if self.steps < 1:
            yield "steps", f"must be >= 1, got {self.steps}"
        if self.resume and self.overwrite:
            yield "overwrite", "cannot be combined with run.resume (resume keeps the previous run's files)"
        if self.max_restarts < 0:
            yield "max_restarts", f"must be >= 0, got {self.max_restarts}"
        if self.auto_resume and self.resume:
            yield "auto_resume", "cannot be combined with run.resume (auto_resume decides whether to resume)"


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
    prompts_file: Optional[str] = None  # .jsonl, .json, .parquet or a datasets.save_to_disk dir, for name=file
    num_prompts: int = 256
    prompt_field: str = "prompt"  # a string, or a chat message list [{role, content}]
    rubric_field: str = "rubric"  # a prompt's own criteria, for the 'rubric' judge kind
    criterion_key: str = "criterion"  # criterion text inside a rubric item ('description' reads RaR's title too)
    weight_key: str = "points"  # a rubric item's points or weight (negative: a pitfall)
    # held-out evaluation prompts: a share of the task's prompts (split by run.seed) or a file; never a training one
    eval_fraction: float = 0.0
    eval_file: Optional[str] = None
    # a long-tailed workload (benchmarks of rollout.weight_update): with short_max_new_tokens > 0, responses to
    # every training prompt stop there, except those to a share long_tail_share of prompts (by prompt id)
    short_max_new_tokens: int = 0
    long_tail_share: float = 0.0

    def check(self) -> Iterator[tuple[str, str]]:
        if self.short_max_new_tokens < 0:
            yield "short_max_new_tokens", f"must be >= 0 (0: off), got {self.short_max_new_tokens}"
        if not 0 <= self.long_tail_share <= 1:
            yield "long_tail_share", f"must be in [0, 1], got {self.long_tail_share}"
        if self.name == "file" and not self.prompts_file:
            yield "prompts_file", "is required when task.name is 'file'"
        if not 0 <= self.eval_fraction < 1:
            yield "eval_fraction", f"must be in [0, 1), got {self.eval_fraction}"
        if self.eval_fraction > 0 and self.eval_file:
            yield "eval_file", "cannot be combined with task.eval_fraction (pick one source of evaluation prompts)"
        if self.num_prompts < 1:
            yield "num_prompts", f"must be >= 1, got {self.num_prompts}"
        for key in ("prompt_field", "rubric_field", "criterion_key", "weight_key"):
            if not getattr(self, key):
                yield key, "must be a non-empty field name"


@dataclass(frozen=True)
class RolloutConfig:
    num_engines: int = 1
    group_size: int = 8
    groups_per_step: int = 8
    max_new_tokens: int = 32
    # no end of sequence before this many tokens (vLLM's min_tokens, transformers' min_new_tokens): benchmarks
    # at equal response lengths; the engine's behaviour log-probs then include its mask on the end token
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    kv_cache_memory_bytes: int = 64 * 1024 * 1024
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)  # Ray custom resources per engine
    max_restarts: int = 1
    # share of its GPU's memory that one engine's vLLM may use (weights, activations, KV cache); CUDA only
    gpu_memory_utilization: float = 0.9
    gpu_kv_cache_memory_bytes: Optional[int] = None  # KV cache on CUDA; None: what the share leaves
    # how an engine loads new weights: `repack` (vLLM's reload_weights; CPU kernels repacked each time) or
    # `in_place` (plain weights copied in place: a sync costs about one memory copy, matmuls are slower)
    weight_load: Literal["repack", "in_place"] = "repack"
    # what a weight update does to responses being generated: `drain` (they finish under the old weights),
    # `interrupt` (stopped, prefilled again under the new ones) or `in_flight` (go on with their KV cache)
    weight_update: Literal["drain", "interrupt", "in_flight"] = "drain"
    # where an engine's vLLM engine core runs: `inproc` (a thread of the rollout actor steps it; starts faster)
    # or `process` (vLLM's AsyncLLM: a process of its own, fed over ZeroMQ). Same tokens and throughput here
    engine_core: Literal["inproc", "process"] = "inproc"
    compile: bool = False  # vLLM's torch.compile (inductor) of the model, else eager: faster steps, ~5 s to start

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0 < self.gpu_memory_utilization <= 1:
            yield "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}"
        for key in ("num_engines", "groups_per_step", "max_new_tokens"):
            if getattr(self, key) < 1:
                yield key, f"must be >= 1, got {getattr(self, key)}"
        if self.group_size < 2:
            yield "group_size", f"must be >= 2 (group normalisation needs two samples), got {self.group_size}"
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            yield "min_new_tokens", f"must be in [0, max_new_tokens={self.max_new_tokens}], got {self.min_new_tokens}"
        if not self.temperature > 0:
            yield "temperature", f"must be > 0, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            yield "top_p", f"must be in (0, 1], got {self.top_p}"
        if self.compile and self.weight_load == "in_place":
            yield "compile", "needs weight_load=repack (in_place swaps the kernels the compiled graph was traced on)"


@dataclass(frozen=True)
class AlgoConfig:
    aggregator: Literal["mean", "gdpo", "rvpo", "rvpo_explicit", "min", "gdpo_focus", "rvpo_focus"] = "rvpo"
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
    rubric_weights: Literal["uniform", "points"] = "uniform"  # a prompt's own criteria: 1/M, or |points| share
    # k_risk per step: constant (k_risk), or k_risk_start to k_risk_end over k_risk_steps (None: run.steps - 1)
    k_risk_schedule: Literal["constant", "linear", "cosine"] = "constant"
    k_risk_start: float = 0.5
    k_risk_end: float = 2.0
    k_risk_steps: Optional[int] = None
    kl_coef: float = 0.0  # weight of k3 KL(policy || initial model) per token; 0 = no reference model at all

    def check(self) -> Iterator[tuple[str, str]]:
        for key in ("k_risk", "beta", "eps", "is_cap", "is_low", "is_high", "clip_eps_low", "clip_eps_high",
                    "k_risk_start", "k_risk_end", "kl_coef"):
            if not math.isfinite(getattr(self, key)):
                yield key, f"must be a finite number, got {getattr(self, key)}"
        if not self.eps > 0:
            yield "eps", f"must be > 0, got {self.eps}"
        if not 0 <= self.clip_eps_low < 1:
            yield "clip_eps_low", f"must be in [0, 1), got {self.clip_eps_low}"
        if self.clip_eps_high < 0:
            yield "clip_eps_high", f"must be >= 0, got {self.clip_eps_high}"
        if self.aggregator in ("rvpo", "rvpo_focus") and not self.k_risk > 0:
            yield "k_risk", f"must be > 0 for the {self.aggregator} aggregator, got {self.k_risk}"
        if self.aggregator == "gdpo_focus" and not self.k_risk >= 0:
            yield "k_risk", f"must be >= 0 for the gdpo_focus aggregator (0 = gdpo), got {self.k_risk}"
        if self.is_cap <= 0:
            yield "is_cap", f"must be > 0, got {self.is_cap}"
        if not 0 <= self.is_low < self.is_high:
            yield "is_low", f"must satisfy 0 <= is_low < is_high, got [{self.is_low}, {self.is_high}]"
        if not 0 < self.staleness_decay <= 1:
            yield "staleness_decay", f"must be in (0, 1], got {self.staleness_decay}"
        if self.reward_weights is not None and any(w < 0 for w in self.reward_weights):
            yield "reward_weights", f"must be non-negative, got {self.reward_weights}"
        if self.k_risk_schedule != "constant":
            for key in ("k_risk_start", "k_risk_end"):
                if not getattr(self, key) > 0:
                    yield key, f"must be > 0 with k_risk_schedule={self.k_risk_schedule}, got {getattr(self, key)}"
            if self.k_risk_steps is not None and self.k_risk_steps < 1:
                yield "k_risk_steps", f"must be >= 1 (or null for run.steps - 1), got {self.k_risk_steps}"
        if not self.kl_coef >= 0:
            yield "kl_coef", f"must be >= 0 (0 turns the KL anchor off), got {self.kl_coef}"


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
    # sequences per forward/backward pass; the micro-batches of a step's batch accumulate into one optimizer step
    micro_batch_size: int = 64
    # torch threads per rank; more than one pays only where a rank has cores to itself (sync mode, a
    # compute-bound model): oversubscribed threads make a CPU step many times slower
    num_threads: int = 1
    # CPU niceness (0-19) of the thread that runs each rank's steps; None: Ray's (15, as every actor's)
    nice: Optional[int] = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)
    sync_transport: Literal["object_store", "collective"] = "object_store"
    master_port: int = 29600
    # run a separate no-grad forward for the proximal log-probs; off: one optimizer step per batch makes the
    # training forward's detached log-probs exactly the proximal ones
    recompute_proximal: bool = False
    # run each distinct prompt of a micro-batch through the model once, its responses after its KV cache
    # (learner/logprobs.py): the plain forward's log-probs and gradients without the prompt's G-1 repeats
    shared_prefix: bool = True
    # with shared_prefix: a micro-batch's responses run in up to this many forwards by length (1: one, padded)
    length_buckets: int = 4

    def check(self) -> Iterator[tuple[str, str]]:
        if self.zero_stage not in (0, 1, 2, 3):
            yield "zero_stage", f"must be 0, 1, 2 or 3, got {self.zero_stage}"
        for key in ("num_ranks", "num_threads", "micro_batch_size", "length_buckets"):
            if getattr(self, key) < 1:
                yield key, f"must be >= 1, got {getattr(self, key)}"
        if self.nice is not None and not 0 <= self.nice <= 19:
            yield "nice", f"must be in 0..19 (a niceness) or null (Ray's), got {self.nice}"
        if not self.lr > 0:
            yield "lr", f"must be > 0, got {self.lr}"
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
class EvalConfig:
    """Held-out evaluation during training (prompts: task.eval_fraction / task.eval_file)."""

    every: int = 0  # steps; 0 = off
    num_prompts: int = 32  # evaluation prompts per evaluation (the first ones of the held-out set)
    temperature: float = 0.0  # 0 = greedy
    samples_per_prompt: int = 1
    max_new_tokens: Optional[int] = None  # None: rollout.max_new_tokens

    def check(self) -> Iterator[tuple[str, str]]:
        if self.every < 0:
            yield "every", f"must be >= 0, got {self.every}"
        if self.num_prompts < 1:
            yield "num_prompts", f"must be >= 1, got {self.num_prompts}"
        if not self.temperature >= 0:
            yield "temperature", f"must be >= 0 (0 = greedy), got {self.temperature}"
        if self.samples_per_prompt < 1:
            yield "samples_per_prompt", f"must be >= 1, got {self.samples_per_prompt}"
        if self.temperature == 0 and self.samples_per_prompt > 1:
            yield "samples_per_prompt", (f"must be 1 with eval.temperature 0 (greedy decoding gives one response), "
                                         f"got {self.samples_per_prompt}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            yield "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}"


@dataclass(frozen=True)
class TrackingConfig:
    """Experiment trackers fed every metrics.jsonl scalar (nested names joined with '/')."""

    backends: list[Literal["tensorboard", "wandb", "mlflow"]] = field(default_factory=list)
    project: str = "rvpo-async"  # W&B project / MLflow experiment
    run_name: Optional[str] = None  # None: the run directory's name
    dir: Optional[str] = None  # None: <run.output_dir>/tracking

    def check(self) -> Iterator[tuple[str, str]]:
        dup = sorted({b for b in self.backends if self.backends.count(b) > 1})
        if dup:
            yield "backends", f"each backend at most once, repeated: {dup}"


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
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def check(self) -> Iterator[tuple[str, str]]:
        if self.eval.every and not (self.task.eval_fraction > 0 or self.task.eval_file):
            yield "eval.every", "needs held-out prompts: set task.eval_fraction (e.g. 0.2) or task.eval_file"
        yield from check_gpu_shares(self)
        w = self.algo.reward_weights
        if w is not None and len(w) != len(self.judges.specs):
            yield "algo.reward_weights", (f"needs one weight per judge spec ({len(self.judges.specs)}), "
                                          f"got {len(w)}")
        elif self.judges.specs and sum(self.reward_weights) <= 0:
            yield "algo.reward_weights", f"must not all be zero, got {self.reward_weights}"

    @property
    def reward_names(self) -> list[str]:
        """One per reward slot (K): a judge's name, or `<judge>/NN` for each slot of a rubric judge."""
        return [n for s in self.judges.specs for n in s.slot_names]

    @property
    def reward_weights(self) -> list[float]:
        """One per reward slot; a rubric judge's weight is repeated over its slots."""
        w = self.algo.reward_weights if self.algo.reward_weights is not None else [s.weight for s in self.judges.specs]
        return [float(x) for x, s in zip(w, self.judges.specs) for _ in s.slot_names]

    @property
    def reward_judges(self) -> list[str]:
        """The judge spec name of each reward slot (a bounded label: one per spec, not per slot)."""
        return [s.name for s in self.judges.specs for _ in s.slot_names]

    @property
    def rubric_spec(self) -> Optional[JudgeSpec]:
        return next((s for s in self.judges.specs if s.kind == "rubric"), None)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def override(self, *overrides: str) -> "Config":
        return from_dict(apply_overrides(self.to_dict(), overrides))


def from_dict(data: dict[str, Any]) -> Config:
    """A checked Config from a nested dict (a parsed YAML file); a problem raises ConfigError naming its key."""
    return build(Config, data)


def load_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> Config:
    """Load a YAML config file (or the defaults when `path` is None) and apply dotted overrides."""
    return from_dict(apply_overrides(read_config_file(path), overrides))


__all__ = ["Config", "ConfigError", "JudgeEngineConfig", "JudgeSpec", "JudgesConfig", "apply_overrides", "dump_config",
           "from_dict", "load_config"]
