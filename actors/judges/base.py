"""What every judge kind shares: the `Judge` and `SlotJudge` protocols (defined in rvpo_async.interfaces),
the `Builder` signature, `Params` (a spec's params checked against what a kind accepts) and `masked` results.

The rule judges and the factory (actors.judges.factory) and the model judges (actors.judges.llm,
actors.judges.rubric) all build on this module, and it on none of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any

from rvpo_async.config import JudgeSpec
from rvpo_async.interfaces import Judge, SlotJudge  # noqa: F401 (the protocols, re-exported)
from rvpo_async.types import JudgeResult

_REASON_CHARS = 500


Builder = Callable[[JudgeSpec, Mapping[str, Any]], "Judge | SlotJudge"]


class Params:
    """A spec's params merged over defaults, refusing unknown and missing keys: a misspelt param would
    otherwise silently fall back to its default and change the reward without anyone noticing."""

    def __init__(self, spec: JudgeSpec, required: Sequence[str], optional: Mapping[str, Any]):
        self.spec = spec
        valid = [*required, *optional]
        for key in spec.params:
            if key not in valid:
                raise self.error(key, f"is unknown; valid params: {', '.join(valid)}")
        for key in required:
            if key not in spec.params:
                raise self.error(key, f"is required; valid params: {', '.join(valid)}")
        self.values: dict[str, Any] = {**optional, **spec.params}

    def error(self, key: str, problem: str) -> ValueError:
        return ValueError(f"judge '{self.spec.name}' (kind '{self.spec.kind}'): param '{key}' {problem}")

    def text(self, key: str) -> str:
        v = self.values[key]
        if not isinstance(v, str) or not v:
            raise self.error(key, f"must be a non-empty string, got {v!r}")
        return v

    def choice(self, key: str, options: Sequence[str]) -> str:
        v = self.values[key]
        if v not in options:
            raise self.error(key, f"must be one of {', '.join(map(repr, options))}, got {v!r}")
        return str(v)

    def flag(self, key: str) -> bool:
        v = self.values[key]
        if not isinstance(v, bool):
            raise self.error(key, f"must be true or false, got {v!r}")
        return v

    def number(self, key: str, *, minimum: float | None = None, integer: bool = False) -> float:
        v = self.values[key]
        ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)
        if not ok or (integer and int(v) != v):
            raise self.error(key, f"must be {'an integer' if integer else 'a finite number'}, got {v!r}")
        if minimum is not None and v < minimum:
            raise self.error(key, f"must be >= {minimum}, got {v!r}")
        return float(v)

    def words(self, key: str) -> tuple[str, ...]:
        v = self.values[key]
        if not isinstance(v, (list, tuple)) or not v or not all(isinstance(w, str) and w for w in v):
            raise self.error(key, f"must be a non-empty list of non-empty strings, got {v!r}")
        return tuple(v)

    def score_range(self) -> tuple[float, float]:
        """Every judge maps its native [0, 1] onto params `low`/`high` when they are given."""
        low, high = self.number("low"), self.number("high")
        if not low < high:
            raise self.error("high", f"must be greater than low ({low}), got {high}")
        return low, high


def masked(status: str, reason: str, latency_s: float) -> JudgeResult:
    """A masked entry (NaN value); the reason is cut short, as it becomes a metrics label and a log line."""
    short = reason if len(reason) <= _REASON_CHARS else reason[:_REASON_CHARS] + "..."
    return JudgeResult(value=math.nan, status=status, latency_s=latency_s, reason=short)  # type: ignore[arg-type]
