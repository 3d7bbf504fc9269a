"""The judge worker: the Ray actor that scores one sample with all K judges, and the engines its LLM judges call.

A `JudgeWorker` scores the samples of a call (`score_samples`; `score_sample` for one) concurrently, each sample's
K judges concurrently, each with its own deadline: a judge still running at its deadline gives a 'timeout' entry
and the call returns without it. Each judge has `concurrency` threads and the pool never has more samples in
flight on a worker, so every sample of a call starts at once and its deadlines count from the call's start. `JudgePool`
(actors/judges/pool.py) queues samples onto these workers; `create_judge_engines` starts the `JudgeEngine`
actors that the 'llm' judges of every worker share.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import ray

from actors.judges.factory import Builder, SlotJudge, build_judge, evaluate, evaluate_slots, timed_out
from actors.judges.llm import JudgeEngine
from rvpo_async.config import Config, JudgeSpec
from rvpo_async.placement import actor_options
from rvpo_async.types import JudgeResult, Prompt


_SLOT_GRACE_S = 2.0


class SampleScorer:
    """All K judges of a run, scoring one sample per call (the plain class inside `JudgeWorker`)."""

    def __init__(self, specs: list[JudgeSpec], engine_handles: dict[str, Any] | None = None,
                 concurrency: int = 8, default_timeout_s: float = 10.0,
                 extra_builders: dict[str, Builder] | None = None):
        deps = dict(engine_handles=engine_handles or {}, default_timeout_s=default_timeout_s,
                    extra_builders=extra_builders or {})
        self.judges = [build_judge(s, **deps) for s in specs]
        self.timeouts = [float(s.timeout_s or default_timeout_s) for s in specs]
        # one pool of `concurrency` threads per judge: a slow or hung judge ties up only its own threads (its
        # entries time out), never another judge's
        self._pools = [ThreadPoolExecutor(max_workers=max(1, concurrency), thread_name_prefix=f"judge-{k}")
                       for k in range(len(self.judges))]

    def ready(self) -> int:
        return sum(j.slots if isinstance(j, SlotJudge) else 1 for j in self.judges)

    def score_sample(self, prompt: Prompt, text: str) -> list[JudgeResult]:
        """K entries: one per judge, or `slots` for a slot judge (the rubric judge), in spec order."""
        return self.score_samples([(prompt, text)])[0]

    def score_samples(self, batch: list[tuple[Prompt, str]]) -> list[list[JudgeResult]]:
        """`score_sample` of each (prompt, text), all started together."""
        t0 = time.perf_counter()
        started = [[pool.submit(evaluate_slots if isinstance(j, SlotJudge) else evaluate, j, prompt, text)
                    for j, pool in zip(self.judges, self._pools)] for prompt, text in batch]
        return [self._collect(futures, t0) for futures in started]

    def _collect(self, futures: list[Any], t0: float) -> list[JudgeResult]:
        results: list[JudgeResult] = []
        for judge, fut, limit in zip(self.judges, futures, self.timeouts):
            slots = judge.slots if isinstance(judge, SlotJudge) else 0
            # a slot judge keeps a deadline per slot itself; this one only catches a judge that hangs
            grace = _SLOT_GRACE_S if slots else 0.0
            try:
                got = fut.result(timeout=max(0.0, t0 + limit + grace - time.perf_counter()))
            except FutureTimeout:
                fut.cancel()
                got = timed_out(judge, limit, time.perf_counter() - t0)
                got = [got] * slots if slots else got
            results.extend(got if slots else [got])
        return results


JudgeWorker = ray.remote(SampleScorer)


def create_judge_engines(cfg: Config, model_path: str, *, wait: bool = True) -> dict[str, Any]:
    """One JudgeEngine per name of `judges.engine_names` (the 'llm' judges' and a rubric judge's), each serving
    the judge model of `judges.engine` (`model_path`, the policy's starting model, when that names none). Waits until each
    has loaded its model (`wait`), so no judge's first deadline is spent on startup."""
    names = cfg.judges.engine_names
    judge_model = cfg.judges.engine
    path = judge_model.model_path or model_path
    max_len = judge_model.max_model_len or cfg.model.max_model_len
    kv = judge_model.kv_cache_memory_bytes or cfg.rollout.kv_cache_memory_bytes
    # a rubric judge sends one call per (response, criterion): let them all run in the engine (an async actor:
    # max_concurrency bounds its calls in flight), which batches them, rather than wait for a free slot (which
    # would spend their deadline)
    slots = max((len(s.slot_names) for s in cfg.judges.specs if s.kind == "rubric"), default=1)
    concurrency = min(1024, max(64, slots * cfg.judges.concurrency * cfg.judges.num_workers))
    opts = actor_options("judge_engine", cfg, max_concurrency=concurrency)
    engines = {name: JudgeEngine.options(**opts).remote(
        path, max_model_len=max_len, seed=cfg.run.seed, kv_cache_memory_bytes=kv,
        gpu_memory_utilization=judge_model.gpu_memory_utilization,
        gpu_kv_cache_memory_bytes=judge_model.gpu_kv_cache_memory_bytes)
               for name in names}
    if wait:
        ray.get([e.ready.remote() for e in engines.values()])
    return engines
