"""Rule judges: cheap, deterministic CPU checks of one response, each scoring [0, 1].

Each `*_check` function takes its params first and `(prompt, text)` last; `actors/judges/factory.py` validates a
spec's params, binds them with `functools.partial` and wraps the result in a `RuleJudge`, which maps the
[0, 1] score onto the judge's declared [low, high]. Nothing here needs Ray, a model or the network.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from rvpo_async.types import Prompt

Check = Callable[[Prompt, str], float]


@dataclass(frozen=True)
class RuleJudge:
    """A rule judge: a pure check scoring [0, 1], mapped onto the declared [low, high]."""

    name: str
    low: float
    high: float
    check: Check  # one of the *_check functions below with its params bound

    def score(self, prompt: Prompt, sample_text: str) -> float:
        return self.low + self.check(prompt, sample_text) * (self.high - self.low)


def regex_check(pattern: re.Pattern[str], fullmatch: bool, prompt: Prompt, text: str) -> float:
    """fullmatch: the whole response, surrounding whitespace stripped, must match."""
    return 1.0 if (pattern.fullmatch(text.strip()) if fullmatch else pattern.search(text)) else 0.0


def length_check(min_chars: int, max_chars: int, slack: float, prompt: Prompt, text: str) -> float:
    """1 inside [min_chars, max_chars], decaying linearly to 0 over `slack` characters outside."""
    miss = max(min_chars - len(text), len(text) - max_chars, 0)
    return max(0.0, 1.0 - miss / slack)


def keywords_check(patterns: Sequence[re.Pattern[str]], require_all: bool, prompt: Prompt, text: str) -> float:
    """all: the fraction of words present (partial credit); any: 1 if one is present."""
    found = sum(1 for p in patterns if p.search(text))
    return found / len(patterns) if require_all else float(found > 0)


def forbidden_check(patterns: Sequence[re.Pattern[str]], prompt: Prompt, text: str) -> float:
    return 0.0 if any(p.search(text) for p in patterns) else 1.0


def first_json_object(text: str) -> dict[str, Any] | None:
    """The first `{...}` in `text` that parses as a JSON object, or None."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            obj, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict):
            return obj
        start = text.find("{", start + 1)
    return None


def json_schema_check(validator: Any, prompt: Prompt, text: str) -> float:
    """1 for a JSON object that validates, 0.5 for one that does not (the format was tried), 0 for none."""
    obj = first_json_object(text)
    return 0.0 if obj is None else (1.0 if validator.is_valid(obj) else 0.5)


_STRIP_CHARS = " \t\n.,;:!?\"'`$*()[]"


def final_answer(text: str) -> str:
    """The response's final answer: the last \\boxed{...}, else what follows the last 'answer:' /
    'answer is', else the last non-empty line."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", text)
    if boxed:
        return boxed[-1]
    marks = list(re.finditer(r"answer\s*(?:is|:)", text, re.IGNORECASE))
    if marks:
        rest = text[marks[-1].end():].strip()
        return rest.splitlines()[0] if rest else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def normalise_answer(answer: str) -> str:
    """Case, surrounding punctuation, inner whitespace and thousands separators do not count."""
    s = re.sub(r"\s+", " ", answer.strip().lower()).strip(_STRIP_CHARS)
    if re.fullmatch(r"[-+]?[\d,]*\.?\d+", s):
        value = float(s.replace(",", ""))
        s = str(int(value)) if value.is_integer() else repr(value)
    return s


def exact_match_check(judge_name: str, field: str, normalize: bool, prompt: Prompt, text: str) -> float:
    if field not in prompt.meta:
        raise ValueError(f"judge '{judge_name}': prompt {prompt.prompt_id!r} has no meta field {field!r} "
                       f"(meta keys: {sorted(prompt.meta)})")
    got, want = final_answer(text), str(prompt.meta[field])
    return float(normalise_answer(got) == normalise_answer(want) if normalize else got.strip() == want.strip())
