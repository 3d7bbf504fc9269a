"""Test-only judge kinds (a slow judge, a judge that raises) passed to the judge pool through
`extra_builders`. Ray workers cannot import test files, so this module travels to them by value."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from typing import Any

import ray.cloudpickle

from rvpo_async.config import JudgeSpec
from rvpo_async.types import Prompt

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@dataclasses.dataclass(frozen=True)
class SleepJudge:
    """Scores 1.0 after `seconds`: a judge bound by waiting (an HTTP rubric call), not by CPU."""

    name: str
    seconds: float
    low: float = 0.0
    high: float = 1.0

    def score(self, prompt: Prompt, sample_text: str) -> float:
        time.sleep(self.seconds)
        return 1.0


@dataclasses.dataclass(frozen=True)
class RaiseJudge:
    name: str
    low: float = 0.0
    high: float = 1.0

    def score(self, prompt: Prompt, sample_text: str) -> float:
        raise RuntimeError("rubric service exploded")


def build_sleep(spec: JudgeSpec, deps: Mapping[str, Any]) -> SleepJudge:
    return SleepJudge(spec.name, float(spec.params["seconds"]))


def build_raise(spec: JudgeSpec, deps: Mapping[str, Any]) -> RaiseJudge:
    return RaiseJudge(spec.name)


EXTRA_BUILDERS = {"sleep": build_sleep, "raise": build_raise}


@ray.remote
class SlowCriterionProxy:
    """Stands in front of a real JudgeEngine and holds back every question that contains `marker`, so one
    criterion of a rubric misses its deadline while the others are graded by the real engine."""

    def __init__(self, engine: Any, marker: str, seconds: float):
        self.engine, self.marker, self.seconds = engine, marker, seconds

    async def grade(self, prompts: list[str], mode: str) -> list[float]:
        import asyncio

        if any(self.marker in p for p in prompts):
            await asyncio.sleep(self.seconds)
        return await self.engine.grade.remote(prompts, mode)
