"""Builders of the rule judges (actors/judges/rules.py) from a `JudgeSpec`, its params checked, and of a rubric
criterion's `check` (rvpo_async.rubric) from its {kind, params}. `actors.judges.factory.build_judge` maps the rule
kinds here; the rubric judge builds its criteria's checks with `build_check`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from actors.judges.base import Builder, Judge, Params
from actors.judges.rules import (
    RuleJudge,
    exact_match_check,
    forbidden_check,
    json_schema_check,
    keywords_check,
    length_check,
    regex_check,
)
from rvpo_async.config import JudgeSpec

_RANGE = {"low": 0.0, "high": 1.0}


def _word_patterns(words: Sequence[str], case_sensitive: bool) -> tuple[re.Pattern[str], ...]:
    """Whole-word matches, so 'cat' is not found inside 'category'."""
    flags = 0 if case_sensitive else re.IGNORECASE
    return tuple(re.compile(rf"(?<!\w){re.escape(w)}(?!\w)", flags) for w in words)


def _build_regex(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    p = Params(spec, ["pattern"], {"mode": "search", **_RANGE})
    try:
        pattern = re.compile(p.text("pattern"))
    except re.error as e:
        raise p.error("pattern", f"is not a valid regular expression ({e}): {p.values['pattern']!r}") from None
    fullmatch = p.choice("mode", ["search", "fullmatch"]) == "fullmatch"
    return RuleJudge(spec.name, *p.score_range(), partial(regex_check, pattern, fullmatch))


def _build_length(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    p = Params(spec, ["max_chars"], {"min_chars": 0, "slack": 50, **_RANGE})
    lo, hi = p.number("min_chars", minimum=0, integer=True), p.number("max_chars", minimum=0, integer=True)
    if hi < lo:
        raise p.error("max_chars", f"must be >= min_chars ({int(lo)}), got {int(hi)}")
    slack = p.number("slack")
    if slack <= 0:
        raise p.error("slack", f"must be > 0, got {slack}")
    return RuleJudge(spec.name, *p.score_range(), partial(length_check, int(lo), int(hi), slack))


def _build_keywords(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    p = Params(spec, ["words"], {"mode": "all", "case_sensitive": False, **_RANGE})
    patterns = _word_patterns(p.words("words"), p.flag("case_sensitive"))
    require_all = p.choice("mode", ["all", "any"]) == "all"
    return RuleJudge(spec.name, *p.score_range(), partial(keywords_check, patterns, require_all))


def _build_forbidden(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    p = Params(spec, ["words"], {"case_sensitive": False, **_RANGE})
    patterns = _word_patterns(p.words("words"), p.flag("case_sensitive"))
    return RuleJudge(spec.name, *p.score_range(), partial(forbidden_check, patterns))


def _build_json_schema(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    import jsonschema

    p = Params(spec, ["schema"], dict(_RANGE))
    schema = p.values["schema"]
    if not isinstance(schema, dict):
        raise p.error("schema", f"must be a JSON schema mapping, got {schema!r}")
    cls = jsonschema.validators.validator_for(schema)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as e:
        raise p.error("schema", f"is not a valid JSON schema: {e.message}") from None
    return RuleJudge(spec.name, *p.score_range(), partial(json_schema_check, cls(schema)))


def _build_exact_match(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    p = Params(spec, [], {"field": "answer", "normalize": True, **_RANGE})
    return RuleJudge(spec.name, *p.score_range(),
                     partial(exact_match_check, spec.name, p.text("field"), p.flag("normalize")))


RULE_BUILDERS: dict[str, Builder] = {
    "regex": _build_regex, "length": _build_length, "keywords": _build_keywords, "forbidden": _build_forbidden,
    "json_schema": _build_json_schema, "exact_match": _build_exact_match,
}


def build_check(check: Mapping[str, Any], name: str = "check") -> RuleJudge:
    """A rubric criterion's rule, {"kind": <a rule kind>, "params": {...}}, as a judge scoring [0, 1]."""
    kind, params = check.get("kind"), dict(check.get("params") or {})
    if kind not in RULE_BUILDERS:
        raise ValueError(f"check kind {kind!r} is not a rule judge kind; valid: {', '.join(RULE_BUILDERS)}")
    clash = sorted({"low", "high"} & set(params))
    if clash:
        raise ValueError(f"check params {clash} are not allowed: a criterion's grade is in [0, 1]")
    judge = RULE_BUILDERS[kind](JudgeSpec(name, kind, params=params), {})
    assert isinstance(judge, RuleJudge)
    return judge
