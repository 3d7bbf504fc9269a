"""Benchmarks, one module each; `rvpo-async bench <what>` runs one through `run`. Each prints its figures and
a ratio against a baseline run in the same process.

- algo: RVPO advantages (torch) against the float64 NumPy reference (`rvpo_async.reference`)
- buffer: the Arrow GroupBuffer against a list-of-dicts store
- rollout: generated tokens/s of the rollout engines on the tiny model
- sync: seconds per GB of weights, learner -> vLLM engine, for both transports
- learner: one DeepSpeed learner step, each distinct prompt run once against the plain forward
- pipeline: async against sync training on the same config
- trl: this project's async and sync modes against TRL's GRPOTrainer
- driver (not a subcommand): `python -m rvpo_async.bench.driver`, driver CPU seconds per trained sample

The modules are imported only when their benchmark runs.
"""

from __future__ import annotations

import importlib
import time
from typing import Callable, Sequence

# subcommand -> (module, function taking argv and returning an exit code)
BENCHES: dict[str, tuple[str, str]] = {
    "algo": ("rvpo_async.bench.algo", "bench_algo"),
    "buffer": ("rvpo_async.bench.buffer", "bench_buffer"),
    "rollout": ("rvpo_async.bench.rollout", "bench_rollout"),
    "sync": ("rvpo_async.bench.sync", "bench_sync"),
    "learner": ("rvpo_async.bench.learner", "bench_learner"),
    "pipeline": ("rvpo_async.bench.pipeline", "bench_pipeline"),
    "trl": ("rvpo_async.bench.trl", "bench_trl"),
}


def run(what: str, argv: Sequence[str]) -> int:
    module, fn = BENCHES[what]
    return getattr(importlib.import_module(module), fn)(list(argv))


def best_of(fn: Callable[[], object], repeat: int) -> float:
    """The shortest of `repeat` timed calls of `fn`, in seconds."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
