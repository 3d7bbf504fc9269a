"""Per-prompt rubrics: reading a row's criteria, the reward slots they fill, and rubric statistics.

A rubric prompt carries its own list of criteria (HealthBench: `rubrics: [{criterion, points, tags}]`;
RaR: `rubric: [{title, description, weight}]`). The `rubric` judge kind grades criterion j of a prompt
into reward slot j of `max_items` fixed slots named `<judge>/00`, `<judge>/01`, ...; slots the prompt
lacks are masked with status 'absent'. A criterion with negative points is a pitfall: the judge asks
whether the response shows it, and the slot scores 1 - p, so 1 always means "met" (pitfall avoided).
A criterion may carry a `check`, a rule that grades it in place of the LLM judge tier (a verifiable
criterion, as in IFEval): {"kind": <a rule judge kind>, "params": {...}}, scoring 1 when the response does what
the criterion says (a pitfall's check finds the pitfall; the slot then scores 1 - that).

Pure: no ray, vllm or torch. The loader (rvpo_async.task) and the judge (actors/judges/rubric.py) share
`parse_rubric`; the driver uses `rubric_stats`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Real
from typing import Any, Literal, Sequence

import numpy as np

DEFAULT_MAX_ITEMS = 17
META_KEY = "rubric"  # a loaded prompt's criteria: meta["rubric"] = [{"criterion": str, "points": float[, "check"]}]
CHECK_KEY = "check"  # a criterion's rule: {"kind": str, "params": {...}}
DROPPED_KEY = "rubric_dropped"  # criteria beyond max_items dropped from this prompt (overflow: drop)
MET = 0.5  # a slot's score at or above this counts as met
Overflow = Literal["error", "drop"]


class RubricError(ValueError):
    """A row's rubric is malformed; the message names the field (the loader adds file and row)."""


@dataclass(frozen=True)
class Criterion:
    text: str
    points: float  # < 0: a pitfall
    check: dict[str, Any] | None = None  # a rule grading it ({"kind", "params"}); None: the LLM judge tier
    tags: tuple[str, ...] = ()  # HealthBench's item tags ("axis:accuracy", ...): met ratios are reported per tag

    @property
    def pitfall(self) -> bool:
        return self.points < 0


def rubric_without_engine(spec: Any) -> bool:
    """A rubric judge spec with `engine: null` and no HTTP judge: only criteria with a check can be graded."""
    return "engine" in spec.params and spec.params["engine"] is None and spec.params.get("base_url") is None


def slot_names(judge_name: str, max_items: int) -> list[str]:
    """The reward names of a rubric judge's slots."""
    return [f"{judge_name}/{j:02d}" for j in range(max_items)]


def _text(item: dict[str, Any], field: str, criterion_key: str) -> str:
    if criterion_key in item:
        v = item[criterion_key]
        if isinstance(v, str) and v.strip():
            if criterion_key == "description" and isinstance(item.get("title"), str) and item["title"].strip():
                return f"{item['title'].strip()}: {v.strip()}"
            return v.strip()
        raise RubricError(f"field '{field}' item: '{criterion_key}' must be non-empty text, got {v!r}")
    for key in ("criterion", "description", "title"):  # the HealthBench and RaR spellings
        if isinstance(item.get(key), str) and item[key].strip():
            return _text(item, field, key)
    raise RubricError(f"field '{field}' item has no criterion text (looked for '{criterion_key}', 'criterion', "
                      f"'description', 'title'); keys: {sorted(item)}")


def _points(item: dict[str, Any], field: str, weight_key: str) -> float:
    keys = [weight_key] + [k for k in ("points", "weight") if k != weight_key]
    for key in keys:
        if key in item and item[key] is not None:
            v = item[key]
            if isinstance(v, bool) or not isinstance(v, Real) or not math.isfinite(float(v)) or v == 0:
                raise RubricError(f"field '{field}' item: '{key}' must be a non-zero finite number, got {v!r}")
            return float(v)
    return 1.0


def _check(item: dict[str, Any], field: str) -> dict[str, Any] | None:
    """The item's rule, shape-checked ({"kind": str, "params": mapping}); its params are checked by the
    loader, which builds it (actors.judges.rule_builders.build_check)."""
    if CHECK_KEY not in item:
        return None
    v = item[CHECK_KEY]
    if not isinstance(v, dict) or not isinstance(v.get("kind"), str) or not v["kind"]:
        raise RubricError(f"field '{field}' item: '{CHECK_KEY}' must be a mapping with a rule kind, "
                          f"{{kind: ..., params: {{...}}}}, got {v!r}")
    extra = sorted(set(v) - {"kind", "params"})
    params = v.get("params", {})
    if extra or not isinstance(params, dict):
        raise RubricError(f"field '{field}' item: '{CHECK_KEY}' takes 'kind' and a 'params' mapping only, got {v!r}")
    return {"kind": v["kind"], "params": dict(params)}


def _tags(item: dict[str, Any], field: str) -> tuple[str, ...]:
    v = item.get("tags", [])
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, str) and t for t in v):
        raise RubricError(f"field '{field}' item: 'tags' must be a list of non-empty strings, got {v!r}")
    return tuple(v)


def parse_rubric(value: Any, field: str = "rubric", *, criterion_key: str = "criterion",
                 weight_key: str = "points", max_items: int | None = None,
                 overflow: Overflow = "error") -> tuple[list[Criterion], int]:
    """A row's rubric value as criteria, and how many were dropped past max_items (overflow 'drop').

    An item is a string (the criterion, 1 point) or a mapping with the criterion text under
    `criterion_key` (or 'criterion', or 'description' with an optional 'title') and its points under
    `weight_key` (or 'points', or 'weight'; default 1). Errors name the field and the item index."""
    if not isinstance(value, (list, tuple)):
        raise RubricError(f"field '{field}' must be a list of criteria, got {type(value).__name__}")
    out: list[Criterion] = []
    for i, item in enumerate(value):
        try:
            if isinstance(item, str) and item.strip():
                out.append(Criterion(item.strip(), 1.0))
            elif isinstance(item, dict):
                out.append(Criterion(_text(item, field, criterion_key), _points(item, field, weight_key),
                                     _check(item, field), _tags(item, field)))
            else:
                raise RubricError(f"field '{field}' item: must be a string or a mapping, got {item!r}")
        except RubricError as e:
            raise RubricError(str(e).replace(f"field '{field}' item", f"field '{field}[{i}]'", 1)) from None
    if not out:
        raise RubricError(f"field '{field}' is an empty list; a rubric needs at least one criterion")
    dropped = 0
    if max_items is not None and len(out) > max_items:
        if overflow != "drop":
            raise RubricError(f"field '{field}' has {len(out)} criteria, more than max_items={max_items} "
                              f"(raise the rubric judge's max_items, or set its overflow: drop)")
        dropped, out = len(out) - max_items, out[:max_items]
    return out, dropped


def as_meta(criteria: Sequence[Criterion]) -> list[dict[str, Any]]:
    return [{"criterion": c.text, "points": c.points, **({CHECK_KEY: c.check} if c.check else {}),
             **({"tags": list(c.tags)} if c.tags else {})} for c in criteria]


def from_meta(meta: dict[str, Any]) -> list[Criterion]:
    """The criteria a loaded prompt carries (empty when it has none)."""
    return [Criterion(str(c["criterion"]), float(c["points"]), c.get(CHECK_KEY), tuple(c.get("tags") or ()))
            for c in meta.get(META_KEY) or []]


def points_matrix(prompt_criteria: Sequence[Sequence[Criterion]], max_items: int) -> np.ndarray:
    """[B, max_items] points per prompt's slot (0 where the prompt has no criterion)."""
    out = np.zeros((len(prompt_criteria), max_items))
    for b, cs in enumerate(prompt_criteria):
        for j, c in enumerate(cs[:max_items]):
            out[b, j] = c.points
    return out


def rubric_stats(scores: np.ndarray, valid: np.ndarray, pitfall: np.ndarray,
                 tags: Sequence[Sequence[Sequence[str]]] | None = None) -> dict[str, Any]:
    """Statistics of the rubric slots of a batch. scores, valid: [B, G, M] (M rubric slots; valid = graded
    'ok'); pitfall: [B, M] (True where the prompt's criterion is a pitfall). Scores are 'met' values
    (pitfalls already inverted). met_ratio: share of valid criteria met; worst_mean: each response's
    lowest valid criterion score, averaged over responses with one; pitfall_rate: share of valid pitfall
    criteria NOT avoided. With `tags` (tags[b][m]: the tags of prompt b's criterion m), `rubric_met_by_tag`
    is the met ratio over the valid criteria carrying each tag. A statistic with nothing to average is NaN."""
    v = valid.astype(bool)
    met = (scores >= MET) & v
    n = int(v.sum())
    has = v.any(-1)
    worst = np.where(v, scores, np.inf).min(-1)
    pv = v & pitfall[:, None, :].astype(bool)
    npit = int(pv.sum())
    out: dict[str, Any] = {"rubric_met_ratio": float(met.sum() / n) if n else math.nan,
                           "rubric_worst_mean": float(worst[has].mean()) if has.any() else math.nan,
                           "pitfall_rate": float((pv & ~met).sum() / npit) if npit else math.nan}
    if tags is not None:
        sel: dict[str, np.ndarray] = {}  # tag -> [B, M], where the prompt's criterion carries it
        for b, row in enumerate(tags):
            for m, ts in enumerate(row[:pitfall.shape[1]]):
                for t in ts:
                    sel.setdefault(t, np.zeros(pitfall.shape, dtype=bool))[b, m] = True
        out["rubric_met_by_tag"] = {t: float((met & vt).sum() / vt.sum()) if vt.any() else math.nan
                                    for t in sorted(sel) for vt in [v & sel[t][:, None, :]]}
    return out
