"""Verifiable rubric criteria: a criterion with a `check` is graded by that rule in place of the LLM judge tier;
a rubric judge with `engine: null` starts no judge engine and needs a check on every criterion."""

from __future__ import annotations

import json
import math
from collections import Counter
from concurrent.futures import Future
from pathlib import Path

import pytest

from actors.judges.rule_builders import RULE_BUILDERS, build_check
from actors.judges.rubric import RubricJudge, build_rubric_judge
from rvpo_async.config import JudgeSpec, load_config
from rvpo_async.rubric import RubricError, as_meta, from_meta, parse_rubric
from rvpo_async.task import PromptFileError, file_prompts, file_rows
from rvpo_async.types import Prompt

ROOT = Path(__file__).resolve().parents[2]
DIGITS = {"kind": "regex", "params": {"pattern": "[0-9]"}}
WORD = {"kind": "keywords", "params": {"words": ["sea"]}}


class FakeTier:
    """Grades every question 0.75 and records what it was asked."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def __call__(self, questions: list[str], mode: str) -> list[Future[float]]:
        self.calls.append(list(questions))
        futs = [Future() for _ in questions]
        for f in futs:
            f.set_result(0.75)
        return futs


def _prompt(items: list[dict]) -> Prompt:
    criteria, _ = parse_rubric(items)
    return Prompt("p", "t", (1,), {"rubric": as_meta(criteria)})


def test_a_check_travels_from_the_row_through_the_prompt_meta():
    criteria, _ = parse_rubric([{"criterion": "No digits", "points": -3, "check": DIGITS}, "Is kind"])
    assert criteria[0].check == {"kind": "regex", "params": {"pattern": "[0-9]"}} and criteria[1].check is None
    back = from_meta({"rubric": as_meta(criteria)})
    assert back == criteria and "check" not in as_meta(criteria)[1]


@pytest.mark.parametrize("check, problem", [
    ("regex", "'check' must be a mapping with a rule kind"),
    ({"params": {"pattern": "x"}}, "'check' must be a mapping with a rule kind"),
    ({"kind": "regex", "params": "x", }, "takes 'kind' and a 'params' mapping only"),
    ({"kind": "regex", "pattern": "x"}, "takes 'kind' and a 'params' mapping only"),
])
def test_a_malformed_check_is_an_error_naming_the_item(check, problem):
    with pytest.raises(RubricError, match=rf"field 'rubric\[1\]': .*{problem}"):
        parse_rubric(["fine", {"criterion": "c", "check": check}])


def test_checked_criteria_are_graded_by_their_rule_and_never_asked():
    tier = FakeTier()
    judge = RubricJudge("rubric", 5, "yesno", tier, timeout_s=2.0)
    prompt = _prompt([{"criterion": "Mentions the sea", "points": 2, "check": WORD},
                      {"criterion": "Is kind", "points": 1},
                      {"criterion": "Contains digits", "points": -3, "check": DIGITS}])
    met = judge.score_all(prompt, "The sea is calm.")
    assert len(tier.calls) == 1 and len(tier.calls[0]) == 1 and "Is kind" in tier.calls[0][0]
    assert [r.status for r in met] == ["ok", "ok", "ok", "absent", "absent"]
    assert [r.value for r in met[:3]] == [1.0, 0.75, 1.0]  # a pitfall's check finds it: 1 - 0 when absent
    missed = judge.score_all(prompt, "Route 66 is long.")
    assert [r.value for r in missed[:3]] == [0.0, 0.75, 0.0]  # no 'sea'; the digits pitfall shown: 1 - 1


def test_a_rubric_judge_with_no_engine_grades_checks_and_masks_only_unchecked_slots():
    judge = build_rubric_judge(JudgeSpec("rubric", "rubric", params={"engine": None, "max_items": 3}), {})
    assert judge.ask is None
    out = judge.score_all(_prompt([{"criterion": "Mentions the sea", "check": WORD}, "Is kind"]), "sea")
    assert [r.status for r in out] == ["ok", "error", "absent"] and out[0].value == 1.0
    assert "criterion 1" in out[1].reason and "no check" in out[1].reason and math.isnan(out[1].value)


def test_a_check_that_raises_masks_its_slot_naming_the_criterion():
    judge = RubricJudge("rubric", 2, "yesno", None, timeout_s=1.0)
    answer = {"kind": "exact_match", "params": {"field": "answer"}}  # the prompt has no meta 'answer'
    out = judge.score_all(_prompt([{"criterion": "Right answer", "check": answer}]), "42")
    assert out[0].status == "error" and "criterion 0 check" in out[0].reason and "no meta field" in out[0].reason


def test_check_rules_are_the_rule_judge_kinds_with_their_own_param_checks():
    assert build_check(DIGITS).score(Prompt("p", "t", (1,), {}), "a1") == 1.0
    with pytest.raises(ValueError, match="check kind 'llm' is not a rule judge kind; valid: regex"):
        build_check({"kind": "llm", "params": {}})
    with pytest.raises(ValueError, match=r"check params \['high'\] are not allowed"):
        build_check({"kind": "regex", "params": {"pattern": "x", "high": 2}})
    with pytest.raises(ValueError, match="param 'pattern' is not a valid regular expression"):
        build_check({"kind": "regex", "params": {"pattern": "("}})


def _write(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "rubric.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_the_loader_builds_every_check_and_names_file_row_and_item(tmp_path):
    bad = {"kind": "length", "params": {"max_chars": 10, "min_chars": 20}}
    path = _write(tmp_path, [{"id": "a", "prompt": "p", "rubric": ["fine"]},
                             {"id": "b", "prompt": "p", "rubric": ["fine", {"criterion": "short", "check": bad}]}])
    with pytest.raises(PromptFileError, match=r"rubric.jsonl:2 \(id b\): field 'rubric'\[1\] check: .*"
                                              r"param 'max_chars' must be >= min_chars"):
        file_prompts(path, need_rubric=True)


def test_with_no_engine_the_loader_refuses_a_criterion_without_a_check(tmp_path):
    path = _write(tmp_path, [{"id": "a", "prompt": "p", "rubric": [{"criterion": "sea", "check": WORD}, "Is kind"]}])
    assert len(file_prompts(path, need_rubric=True)) == 1  # an engine would grade 'Is kind'
    with pytest.raises(PromptFileError, match=r"rubric.jsonl:1 \(id a\): field 'rubric'\[1\] has no 'check', and the "
                                              r"rubric judge has no LLM engine .*'Is kind'"):
        file_prompts(path, need_rubric=True, need_checks=True)


def test_engine_null_starts_no_judge_engine():
    rules = load_config(str(ROOT / "configs/tiny-cpu-rubric-rules.yaml"))
    assert rules.judges.engine_names == []  # create_judge_engines starts one per name
    assert load_config(str(ROOT / "configs/tiny-cpu-rubric.yaml")).judges.engine_names == ["default"]


def test_the_shipped_verifiable_rubrics_load_with_a_working_check_on_every_criterion():
    cfg = load_config(str(ROOT / "configs/tiny-cpu-rubric-rules.yaml"))
    rows = file_rows(cfg, str(ROOT / cfg.task.prompts_file))
    sizes = Counter(len(r["meta"]["rubric"]) for r in rows)
    assert len(rows) == 64 and min(sizes) == 3 and max(sizes) == 17
    kinds = {c["check"]["kind"] for r in rows for c in r["meta"]["rubric"]}
    assert kinds <= set(RULE_BUILDERS) and {"regex", "keywords", "length"} <= kinds
    assert any(c["points"] < 0 for r in rows for c in r["meta"]["rubric"])  # pitfalls too
    axes = Counter(t for r in rows for c in r["meta"]["rubric"] for t in c["tags"])
    assert all(len(c["tags"]) == 1 for r in rows for c in r["meta"]["rubric"])
    assert axes["axis:instruction"] == 64 and set(axes) == {f"axis:{a}" for a in (
        "instruction", "topic", "length", "style", "format", "safety")}
    judge = build_rubric_judge(cfg.rubric_spec, {})
    for r in rows[:8]:
        out = judge.score_all(Prompt(r["id"], r["prompt"], (1,), r["meta"]), "A calm and clear answer.")
        n = len(r["meta"]["rubric"])
        assert [x.status for x in out] == ["ok"] * n + ["absent"] * (17 - n)


def test_checks_and_tags_load_the_same_from_parquet_as_from_jsonl(tmp_path):
    import datasets

    src = ROOT / "rvpo_async/data/rubric_rules_tiny.jsonl"
    rows = [json.loads(line) for line in src.read_text().splitlines()]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "rules.parquet"))  # params unify into one struct
    kw = {"rubric_max_items": 17, "need_rubric": True, "need_checks": True}
    assert file_prompts(str(tmp_path / "rules.parquet"), **kw) == file_prompts(str(src), **kw)
