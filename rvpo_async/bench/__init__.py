"""Benchmarks, one module each; `rvpo-async bench <what>` runs one through `run`. Each prints its figures and
a ratio against a baseline run in the same process.

- algo: RVPO advantages (torch) against the float64 NumPy reference (`rvpo_async.reference`)
- buffer: the Arrow GroupBuffer against a list-of-dicts store
- rollout: generated tokens/s of the rollout engines on the tiny model
- sync: seconds per GB of weights, learner -> vLLM engine, for both transports
- pipeline: async against sync training on the same config
- trl: this project's async and sync modes against TRL's GRPOTrainer
- driver (not a subcommand): `python -m rvpo_async.bench.driver`, driver CPU seconds per trained sample

The modules are imported only when their benchmark runs.
"""

from __future__ import annotations

from typing import Callable, Sequence


def _bench_algo(argv: Sequence[str]) -> int:
    from rvpo_async.bench.algo import bench_algo

    return bench_algo(argv)


def _bench_buffer(argv: Sequence[str]) -> int:
    from rvpo_async.bench.buffer import bench_buffer

    return bench_buffer(argv)


def _bench_rollout(argv: Sequence[str]) -> int:
    from rvpo_async.bench.rollout import bench_rollout

    return bench_rollout(argv)


def _bench_sync(argv: Sequence[str]) -> int:
    from rvpo_async.bench.sync import bench_sync

    return bench_sync(argv)


def _bench_pipeline(argv: Sequence[str]) -> int:
    from rvpo_async.bench.pipeline import bench_pipeline

    return bench_pipeline(argv)


def _bench_trl(argv: Sequence[str]) -> int:
    from rvpo_async.bench.trl import bench_trl

    return bench_trl(argv)


BENCHES: dict[str, Callable[[Sequence[str]], int]] = {
    "algo": _bench_algo,
    "buffer": _bench_buffer,
    "rollout": _bench_rollout,
    "sync": _bench_sync,
    "pipeline": _bench_pipeline,
    "trl": _bench_trl,
}


def run(what: str, argv: Sequence[str]) -> int:
    return BENCHES[what](list(argv))
