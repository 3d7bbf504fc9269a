"""The judge sections of the config tree (rvpo_async.config re-exports them): one spec per judge, the judge
workers' pool, and the vLLM engine that serves the LLM judges."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional

from rvpo_async.rubric import DEFAULT_MAX_ITEMS, rubric_without_engine, slot_names


@dataclass(frozen=True)
class JudgeSpec:
    name: str
    kind: Literal["regex", "length", "keywords", "forbidden", "json_schema", "exact_match", "llm", "http", "rubric"]
    weight: float = 1.0
    params: dict[str, Any] = field(default_factory=dict)
    timeout_s: Optional[float] = None  # overrides judges.timeout_s

    def check(self) -> Iterator[tuple[str, str]]:
        if not self.name:
            yield "name", "must be a non-empty string"
        if self.weight < 0:
            yield "weight", f"must be >= 0, got {self.weight}"
        m = self.params.get("max_items", DEFAULT_MAX_ITEMS) if self.kind == "rubric" else 1
        if self.kind == "rubric" and (isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 99):
            yield "params.max_items", f"must be an integer in [1, 99], got {m!r}"
        if self.kind == "rubric" and self.params.get("overflow", "error") not in ("error", "drop"):
            yield "params.overflow", f"must be 'error' or 'drop', got {self.params['overflow']!r}"

    @property
    def slot_names(self) -> list[str]:
        """The reward names this judge fills: its own name, or one per rubric slot for kind 'rubric'."""
        if self.kind != "rubric":
            return [self.name]
        return slot_names(self.name, self.params.get("max_items", DEFAULT_MAX_ITEMS))


@dataclass(frozen=True)
class JudgeEngineConfig:
    """The vLLM engine(s) serving the 'llm' judges. Unset keys fall back: model_path to the policy's starting
    model (model.path), max_model_len to model.max_model_len, kv_cache_memory_bytes to the rollout
    engines', num_cpus and resources to the judge workers' (judges.num_cpus, judges.resources)."""

    model_path: Optional[str] = None  # a local dir or a hub name the cluster can reach
    max_model_len: Optional[int] = None
    kv_cache_memory_bytes: Optional[int] = None
    num_cpus: Optional[float] = None
    num_gpus: float = 0.0
    resources: Optional[dict[str, float]] = None
    gpu_memory_utilization: float = 0.9  # share of its GPU's memory; CUDA only
    gpu_kv_cache_memory_bytes: Optional[int] = None  # KV cache on CUDA; None: what the share leaves
    max_restarts: int = 1  # a dead engine is started again (its pending grading calls are sent again)

    def check(self) -> Iterator[tuple[str, str]]:
        if not 0 < self.gpu_memory_utilization <= 1:
            yield "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}"
        if self.max_restarts < 0:
            yield "max_restarts", f"must be >= 0, got {self.max_restarts}"
        if self.model_path is not None and not self.model_path.strip():
            yield "model_path", "must be a model directory or hub name, or null for the policy's model (model.path)"
        if self.max_model_len is not None and self.max_model_len < 16:
            yield "max_model_len", f"must be >= 16, got {self.max_model_len}"
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            yield "kv_cache_memory_bytes", f"must be >= 1, got {self.kv_cache_memory_bytes}"
        if self.num_cpus is not None and self.num_cpus < 0:
            yield "num_cpus", f"must be >= 0, got {self.num_cpus}"
        if self.num_gpus < 0:
            yield "num_gpus", f"must be >= 0, got {self.num_gpus}"


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
    engine: JudgeEngineConfig = field(default_factory=JudgeEngineConfig)  # serves the 'llm' judges

    @property
    def engine_names(self) -> list[str]:
        """The judge engines the specs name: each 'llm' judge's, and a rubric judge's unless it asks an HTTP
        judge or has no LLM tier (`engine: null`, every criterion graded by its check)."""
        return sorted({s.params.get("engine", "default") for s in self.specs
                       if s.kind == "llm" or (s.kind == "rubric" and s.params.get("base_url") is None
                                              and not rubric_without_engine(s))})

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
        rubric = [i for i, s in enumerate(self.specs) if s.kind == "rubric"]
        if len(rubric) > 1 or (rubric and rubric[0] != len(self.specs) - 1):
            yield "specs", "allows one judge of kind 'rubric', listed last (rule judges' slots come first)"
