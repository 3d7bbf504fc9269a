"""Judges: each turns one response into one entry of the reward vector.

A judge is anything with `name`, a declared range `[low, high]` and `score(prompt, text) -> float`
(the `Judge` protocol). The rule judges are cheap, deterministic CPU checks (`actors/judges/rules.py`)
built from a `JudgeSpec` (kind + params) by `actors/judges/rule_builders.py`; `build_judge` is the one
factory, a table from kind to builder, so a spec in the config maps to code you can jump to. LLM and HTTP judges live in
`actors/judges/llm.py`, the rubric judge in `actors/judges/rubric.py`; what every kind shares (the protocols,
`Params`, `masked`) in `actors/judges/base.py`.

`evaluate` / `run_judge` wrap a call so that it can never raise: a judge that throws, returns a
non-number, NaN/inf, a value outside its range, or misses its deadline gives a masked `JudgeResult`
whose status and reason say which. The learner masks those entries instead of training on them.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from numbers import Real
from typing import Any

# the shared judge types and the rule checks are re-exported: callers import them from here
from actors.judges.base import Builder, Judge, Params, SlotJudge, masked  # noqa: F401
from actors.judges.rules import (  # noqa: F401
    Check,
    RuleJudge,
    exact_match_check,
    final_answer,
    first_json_object,
    forbidden_check,
    json_schema_check,
    keywords_check,
    length_check,
    normalise_answer,
    regex_check,
)
from actors.judges.rule_builders import RULE_BUILDERS, build_check  # noqa: F401
from rvpo_async.config import JudgeSpec
from rvpo_async.types import JudgeResult, Prompt

def _model_builders() -> dict[str, Builder]:
    # imported here: the rule judges stay importable without ray or an HTTP stack
    from actors.judges.llm import build_http_judge, build_llm_judge
    from actors.judges.rubric import build_rubric_judge

    return {"llm": build_llm_judge, "http": build_http_judge, "rubric": build_rubric_judge}


def build_judge(spec: JudgeSpec, **deps: Any) -> Judge | SlotJudge:
    """Build the judge a spec names. `deps` carry what some kinds need: `engine_handles` (name ->
    JudgeEngine actor, for 'llm'), `default_timeout_s`, and `extra_builders` (kind -> builder) for
    kinds defined outside this package, which may not shadow a built-in kind."""
    builders = {**RULE_BUILDERS, **_model_builders()}
    extra: Mapping[str, Builder] = deps.get("extra_builders") or {}
    clash = sorted(set(extra) & set(builders))
    if clash:
        raise ValueError(f"judge '{spec.name}': extra_builders may not replace built-in kinds {clash}")
    builders.update(extra)
    if spec.kind not in builders:
        raise ValueError(f"judge '{spec.name}': unknown kind {spec.kind!r}; valid kinds: {', '.join(builders)}")
    return builders[spec.kind](spec, deps)


def check_value(judge: Judge, value: Any, latency_s: float) -> JudgeResult:
    """An ok result, or 'invalid' naming the judge and the value when it is not a score in range."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return masked("invalid", f"judge '{judge.name}' returned {type(value).__name__} {value!r}, not a number",
                      latency_s)
    v = float(value)
    if not math.isfinite(v):
        return masked("invalid", f"judge '{judge.name}' returned non-finite {v!r}", latency_s)
    if not judge.low <= v <= judge.high:
        return masked("invalid", f"judge '{judge.name}' returned {v!r}, outside its range "
                                 f"[{judge.low}, {judge.high}]", latency_s)
    return JudgeResult(value=v, status="ok", latency_s=latency_s)


def evaluate(judge: Judge, prompt: Prompt, text: str) -> JudgeResult:
    """Call `judge.score` with no deadline; never raises."""
    t0 = time.perf_counter()
    try:
        value = judge.score(prompt, text)
    except Exception as e:  # any failure of one judge masks only its entry
        return masked("error", f"judge '{judge.name}' raised {type(e).__name__}: {e}", time.perf_counter() - t0)
    return check_value(judge, value, time.perf_counter() - t0)


def evaluate_slots(judge: SlotJudge, prompt: Prompt, text: str) -> list[JudgeResult]:
    """`judge.score_all`, made total: an exception or a wrong number of entries masks every slot 'error'."""
    t0 = time.perf_counter()
    try:
        results = list(judge.score_all(prompt, text))
        if len(results) == judge.slots and all(isinstance(r, JudgeResult) for r in results):
            return results
        reason = f"judge '{judge.name}' returned {len(results)} entries, expected {judge.slots}"
    except Exception as e:  # any failure of one judge masks only its entries
        reason = f"judge '{judge.name}' raised {type(e).__name__}: {e}"
    return [masked("error", reason, time.perf_counter() - t0)] * judge.slots


def timed_out(judge: Judge | SlotJudge, timeout_s: float, latency_s: float) -> JudgeResult:
    return masked("timeout", f"judge '{judge.name}' still running at its deadline {timeout_s:g}s", latency_s)


def run_judge(judge: Judge, prompt: Prompt, text: str, timeout_s: float) -> JudgeResult:
    """Score with a deadline; never raises. A judge past its deadline is abandoned on a daemon thread
    (Python cannot interrupt a thread), so its entry is 'timeout' and the caller moves on."""
    fut: Future[JudgeResult] = Future()

    def body() -> None:
        fut.set_result(evaluate(judge, prompt, text))

    t0 = time.perf_counter()
    threading.Thread(target=body, name=f"judge-{judge.name}", daemon=True).start()
    try:
        return fut.result(timeout=timeout_s)
    except FutureTimeout:
        return timed_out(judge, timeout_s, time.perf_counter() - t0)
