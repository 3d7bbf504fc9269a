"""The 'rubric' judge kind: every criterion of the prompt's own rubric graded by the LLM judge tier.

params: {engine: <judge engine name>, mode: yesno|grade, max_items: 17, overflow: error|drop}, or, in place
of `engine`, the HTTP judge's {base_url, model, api_key_env}. A criterion with a `check` (rvpo_async.rubric) is
graded by that rule, in place, with no judge request; `engine: null` starts no LLM tier, and then every
criterion needs a check (the prompt loader refuses a row without one). The judge fills `max_items` reward slots
(`<name>/00` ...): criterion j of the prompt -> slot j, one judge request per (response, criterion), all sent
at once so the engine batches them (continuous batching: every request in flight shares its steps). Each criterion
has its own deadline: one that misses it masks only its slot ('timeout'). Slots the prompt does not have
are masked 'absent' (not zero). A pitfall (negative points) is asked as written, and the slot scores 1 - p:
1 always means the criterion is met.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any

import ray

from actors.judges.base import Params, masked
from actors.judges.rule_builders import build_check
from actors.judges.rules import RuleJudge
from actors.judges.llm import MODES, HTTPJudge, http_url, judge_question
from rvpo_async.config import JudgeSpec
from rvpo_async.rubric import DEFAULT_MAX_ITEMS, Criterion, from_meta
from rvpo_async.types import JudgeResult, Prompt

# questions and mode in, one future per question out (a grade in [0, 1], NaN when unparseable)
Asker = Callable[[list[str], str], list["Future[float]"]]


class EngineAsker:
    """Sends each question as its own call to a JudgeEngine actor; the engine batches the calls in flight."""

    def __init__(self, engine: Any):
        self.engine = engine

    def __call__(self, questions: list[str], mode: str) -> list[Future[float]]:
        out = []
        for q in questions:
            ref = self.engine.grade.remote([q], mode)
            fut: Future[float] = Future()
            ref.future().add_done_callback(lambda f, fut=fut: _first(f, fut))
            fut.add_done_callback(lambda f, ref=ref: f.cancelled() and _cancel(ref))
            out.append(fut)
        return out


class HTTPAsker:
    """Asks an OpenAI-compatible URL, one request per question, from a thread pool."""

    def __init__(self, judge: HTTPJudge, concurrency: int = 32):
        self.judge = judge
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix=f"rubric-{judge.name}")

    def __call__(self, questions: list[str], mode: str) -> list[Future[float]]:
        return [self._pool.submit(self.judge.ask, q) for q in questions]

    def __reduce__(self) -> tuple[Any, ...]:  # a thread pool does not pickle: rebuild it where it lands
        return (HTTPAsker, (self.judge,))


def _first(src: Future, dst: Future) -> None:
    if dst.cancelled():
        return
    try:
        dst.set_result(float(src.result()[0]))
    except BaseException as e:  # the engine call failed: this criterion's entry says why
        dst.set_exception(e)


def _failed(e: BaseException) -> Future[float]:
    fut: Future[float] = Future()
    fut.set_exception(e)
    return fut


def _cancel(ref: Any) -> None:
    try:
        ray.cancel(ref)
    except Exception:  # finished, or its actor is gone: nothing to cancel
        pass


@dataclass(frozen=True)
class RubricJudge:
    name: str
    slots: int  # max_items
    mode: str
    ask: Asker | None  # None: no LLM tier (engine: null), only criteria with a check are graded
    timeout_s: float
    low: float = 0.0
    high: float = 1.0
    rules: dict[str, RuleJudge] = field(default_factory=dict, compare=False)  # built checks, by rule

    def score_all(self, prompt: Prompt, sample_text: str) -> list[JudgeResult]:
        """One entry per slot; never raises."""
        t0 = time.perf_counter()
        criteria = from_meta(prompt.meta)[:self.slots]
        asked = [j for j, c in enumerate(criteria) if c.check is None]
        futs: dict[int, Future[float]] = {}
        if asked and self.ask is None:
            futs = {j: _failed(ValueError("the criterion has no check and this judge has no LLM engine "
                                          "(engine: null)")) for j in asked}
        elif asked:
            try:
                questions = [judge_question(criteria[j].text, prompt.text, sample_text, self.mode) for j in asked]
                futs = dict(zip(asked, self.ask(questions, self.mode)))
            except Exception as e:  # the judge tier refused the questions: every asked slot says why
                futs = {j: _failed(ValueError(f"could not send the criteria: {type(e).__name__}: {e}"))
                        for j in asked}
        checked = {j: self._checked(j, c, prompt, sample_text) for j, c in enumerate(criteria) if c.check is not None}
        wait_futures(list(futs.values()), timeout=self.timeout_s)
        out = []
        for j, c in enumerate(criteria):
            if j in checked:
                out.append(checked[j])
                continue
            fut, latency = futs[j], time.perf_counter() - t0
            if not fut.done():
                fut.cancel()
                out.append(masked("timeout", f"judge '{self.name}' criterion {j}: no grade within its deadline "
                                             f"{self.timeout_s:g}s", latency))
            elif (err := fut.exception()) is not None:
                out.append(masked("error", f"judge '{self.name}' criterion {j}: {type(err).__name__}: {err}", latency))
            else:
                out.append(self._entry(j, c.pitfall, fut.result(), latency))
        return out + self._absent(len(criteria))

    def _checked(self, j: int, c: Criterion, prompt: Prompt, text: str) -> JudgeResult:
        """Criterion j graded by its own rule (built once per distinct rule)."""
        key = json.dumps(c.check, sort_keys=True)
        if key not in self.rules:
            self.rules[key] = build_check(c.check, f"{self.name}/{j:02d}")
        t0 = time.perf_counter()
        try:
            value = self.rules[key].score(prompt, text)
        except Exception as e:  # a failing check masks only its slot
            return masked("error", f"judge '{self.name}' criterion {j} check: {type(e).__name__}: {e}",
                          time.perf_counter() - t0)
        return self._entry(j, c.pitfall, value, time.perf_counter() - t0)

    def _entry(self, j: int, pitfall: bool, value: Any, latency: float) -> JudgeResult:
        v = float(value) if isinstance(value, (int, float)) else math.nan
        if not 0.0 <= v <= 1.0:  # NaN too: a grade reply with no number in it
            return masked("invalid", f"judge '{self.name}' criterion {j}: grade {value!r} is not in [0, 1]", latency)
        return JudgeResult(value=1.0 - v if pitfall else v, status="ok", latency_s=latency)

    def _absent(self, present: int) -> list[JudgeResult]:
        return [JudgeResult(math.nan, "absent", 0.0, f"prompt has {present} criteria")] * (self.slots - present)


def build_rubric_judge(spec: JudgeSpec, deps: Mapping[str, Any]) -> RubricJudge:
    p = Params(spec, [], {"engine": "default", "mode": "yesno", "max_items": DEFAULT_MAX_ITEMS, "overflow": "error",
                          "base_url": None, "model": None, "api_key_env": "OPENAI_API_KEY"})
    mode = p.choice("mode", MODES)
    p.choice("overflow", ["error", "drop"])  # applied by the prompt loader
    slots = int(p.number("max_items", minimum=1, integer=True))
    timeout = float(spec.timeout_s or deps.get("default_timeout_s") or 10.0)
    ask: Asker | None = None
    if p.values["base_url"] is not None:
        judge = HTTPJudge(spec.name, http_url(p), p.text("model"), "", mode, p.text("api_key_env"), timeout)
        ask = HTTPAsker(judge)
    elif p.values["engine"] is not None:
        engines: Mapping[str, Any] = deps.get("engine_handles") or {}
        name = p.text("engine")
        if name not in engines:
            raise p.error("engine", f"names no judge engine: {name!r}; engines started: {sorted(engines) or 'none'}")
        ask = EngineAsker(engines[name])
    return RubricJudge(spec.name, slots, mode, ask, timeout)
