"""Prompt sources with rubrics: the same rows from jsonl, json, parquet and a datasets.save_to_disk directory
give identical prompts; HealthBench and RaR rubric shapes; every malformed kind is an error naming the file,
the row and the field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rvpo_async.config import load_config
from rvpo_async.task import PromptFileError, file_prompts, load_prompts

ROWS = [
    {"id": "h1", "prompt": "Name a fruit.", "topic": "food",
     "rubrics": [{"criterion": "Names one fruit", "points": 5, "tags": ["accuracy"]},
                 {"criterion": "Recommends eating plastic", "points": -8, "tags": ["safety"]}]},
    {"id": "h2", "prompt": "Say hi.", "topic": "greeting", "rubrics": [{"criterion": "Says hi", "points": 1}]},
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
CHAT_ROWS = [{"id": "c1", "prompt": CHAT, "rubric": [{"criterion": "Says hi", "points": 1}]},
             {"id": "c2", "prompt": CHAT[1:], "rubric": [{"criterion": "Is short", "points": 2}]}]


def _write_all(tmp_path: Path, rows: list[dict]) -> dict[str, Path]:
    import datasets

    tmp_path.mkdir(exist_ok=True)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    js = tmp_path / "p.json"
    js.write_text(json.dumps(rows))
    ds = datasets.Dataset.from_list(rows)
    parquet = tmp_path / "p.parquet"
    ds.to_parquet(str(parquet))
    disk = tmp_path / "saved"
    ds.save_to_disk(str(disk))
    return {"jsonl": jsonl, "json": js, "parquet": parquet, "disk": disk}


def test_the_same_rows_from_jsonl_json_parquet_and_save_to_disk_give_identical_prompts(tmp_path: Path):
    paths = _write_all(tmp_path, ROWS)
    loaded = {kind: file_prompts(str(p), rubric_max_items=17, need_rubric=True) for kind, p in paths.items()}
    assert loaded["jsonl"] == loaded["json"] == loaded["parquet"] == loaded["disk"]
    first = loaded["parquet"][0]
    assert first["meta"]["rubric"] == [{"criterion": "Names one fruit", "points": 5.0, "tags": ["accuracy"]},
                                       {"criterion": "Recommends eating plastic", "points": -8.0, "tags": ["safety"]}]
    assert first["meta"]["topic"] == "food" and "rubrics" not in first["meta"]
    # the second row has no 'tags': a columnar source fills them with None, which is not kept
    assert loaded["disk"][1]["meta"] == {"topic": "greeting", "rubric": [{"criterion": "Says hi", "points": 1.0}]}
    chats = {kind: file_prompts(str(p), need_rubric=True) for kind, p in _write_all(tmp_path / "chat", CHAT_ROWS).items()}
    assert chats["jsonl"] == chats["json"] == chats["parquet"] == chats["disk"]
    assert chats["disk"][0]["prompt"] == CHAT


def test_a_chat_message_prompt_goes_through_the_chat_template_as_is(tmp_path: Path):
    from rvpo_async.tiny_model import build_tokenizer

    paths = _write_all(tmp_path, CHAT_ROWS)
    tok = build_tokenizer(0)
    cfg = load_config(None, ["task.name=file", f"task.prompts_file={paths['parquet']}"])
    prompts = load_prompts(cfg, tok)
    assert prompts[0].text == tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert "Be brief." in prompts[0].text and prompts[0].meta["rubric"][0]["criterion"] == "Says hi"


def test_rar_rubrics_read_title_and_description_with_weights(tmp_path: Path):
    f = tmp_path / "rar.jsonl"
    f.write_text(json.dumps({"question": "Why is the sky blue?", "rubric": [
        {"title": "Essential", "description": "Mentions Rayleigh scattering", "weight": 5},
        {"title": "Pitfall", "description": "Claims the sky reflects the ocean", "weight": -2}]}) + "\n")
    rows = file_prompts(str(f), prompt_field="question", criterion_key="description", weight_key="weight",
                        need_rubric=True)
    assert rows[0]["prompt"] == "Why is the sky blue?"
    assert rows[0]["meta"]["rubric"] == [{"criterion": "Essential: Mentions Rayleigh scattering", "points": 5.0},
                                         {"criterion": "Pitfall: Claims the sky reflects the ocean", "points": -2.0}]


def test_criteria_past_max_items_are_dropped_and_counted_when_configured(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "rubric": [f"item {i}" for i in range(5)]}) + "\n")
    rows = file_prompts(str(f), rubric_max_items=3, rubric_overflow="drop", need_rubric=True)
    assert [c["criterion"] for c in rows[0]["meta"]["rubric"]] == ["item 0", "item 1", "item 2"]
    assert rows[0]["meta"]["rubric_dropped"] == 2


BAD_ROWS = [
    ({"question": "no prompt field"}, r"p\.jsonl:2: missing field 'prompt'"),
    ({"prompt": "", "rubric": ["a"]}, r"p\.jsonl:2: field 'prompt' must be a non-empty string"),
    ({"prompt": "x", "rubric": "be nice"}, r"p\.jsonl:2 \(id q\): field 'rubric' must be a list of criteria"),
    ({"prompt": "x", "rubric": [{"points": 3}]}, r"p\.jsonl:2 \(id q\): field 'rubric\[0\]' has no criterion text"),
    ({"prompt": "x", "rubric": ["ok", {"criterion": "c", "points": "lots"}]},
     r"p\.jsonl:2 \(id q\): field 'rubric\[1\]': 'points' must be a non-zero finite number, got 'lots'"),
    ({"prompt": "x", "rubric": [f"c{i}" for i in range(18)]},
     r"p\.jsonl:2 \(id q\): field 'rubric' has 18 criteria, more than max_items=17"),
    ({"prompt": "x"}, r"p\.jsonl:2: missing field 'rubric' \(task.rubric_field\)"),
]


@pytest.mark.parametrize("row, match", BAD_ROWS, ids=["missing-prompt", "empty-prompt", "rubric-not-list",
                                                      "no-criterion-text", "non-numeric-points", "too-many",
                                                      "missing-rubric"])
def test_malformed_rubric_rows_name_file_row_and_field(tmp_path: Path, row: dict, match: str):
    f = tmp_path / "p.jsonl"
    row = {"id": "q", **row}
    f.write_text(json.dumps({"prompt": "fine", "rubric": ["c"]}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(PromptFileError, match=match):
        file_prompts(str(f), rubric_max_items=17, need_rubric=True)


def test_without_a_rubric_judge_a_rubric_field_is_plain_metadata(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "rubric": "free text, not criteria"}) + "\n")
    assert file_prompts(str(f))[0]["meta"] == {"rubric": "free text, not criteria"}


def test_malformed_rows_in_parquet_name_the_row(tmp_path: Path):
    import datasets

    f = tmp_path / "p.parquet"
    datasets.Dataset.from_list([{"prompt": "a", "rubric": ["x"]}, {"prompt": "b", "rubric": ["y"] * 4}]).to_parquet(str(f))
    with pytest.raises(PromptFileError, match=r"p\.parquet: row 2 \(id \?\): field 'rubric' has 4 criteria"):
        file_prompts(str(f), rubric_max_items=3, need_rubric=True)


@pytest.mark.parametrize("data, match", [
    (b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n', r"p\.jsonl:2: not UTF-8 text \(byte 0xe9 at column 16\)"),
    (b'{"prompt": "ok"}\n{"prompt": \n', r"p\.jsonl:2: not valid JSON"),
    (b"", r"p\.jsonl: no prompts \(the file is empty\)"),
    (b"\n  \n", r"p\.jsonl: no prompts"),
    (b'["not an object"]\n', r"p\.jsonl:1: each row must be a JSON object"),
])
def test_unreadable_jsonl_names_file_and_line(tmp_path: Path, data: bytes, match: str):
    f = tmp_path / "p.jsonl"
    f.write_bytes(data)
    with pytest.raises(PromptFileError, match=match):
        file_prompts(str(f))


def test_non_utf8_json_array_names_the_line(tmp_path: Path):
    f = tmp_path / "p.json"
    f.write_bytes(b'[\n{"prompt": "a"},\n{"prompt": "\xff"}\n]')
    with pytest.raises(PromptFileError, match=r"p\.json:3: not UTF-8 text"):
        file_prompts(str(f))


def test_an_unsupported_suffix_is_named(tmp_path: Path):
    f = tmp_path / "p.csv"
    f.write_text("prompt\nhi\n")
    with pytest.raises(PromptFileError, match=r"p\.csv: unsupported prompts file type '.csv'"):
        file_prompts(str(f))


def test_the_shipped_rubric_dataset_loads_with_3_to_17_criteria_and_some_pitfalls():
    rows = file_prompts("rvpo_async/data/rubric_tiny.jsonl", rubric_max_items=17, need_rubric=True)
    counts = [len(r["meta"]["rubric"]) for r in rows]
    assert len(rows) == 64 and min(counts) == 3 and max(counts) == 17
    points = [c["points"] for r in rows for c in r["meta"]["rubric"]]
    assert any(p < 0 for p in points) and len(set(points)) > 2


def test_the_run_config_applies_the_rubric_judges_limits_and_logs_dropped_criteria(tmp_path: Path, caplog):
    from rvpo_async.task import file_rows

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": "x", "rubric": [f"c{i}" for i in range(5)]}) + "\n")
    spec = "judges.specs=[{name: r, kind: rubric, params: {max_items: 3, overflow: %s}}]"
    with pytest.raises(PromptFileError, match=r"p\.jsonl:1 \(id \?\): field 'rubric' has 5 criteria"):
        file_rows(load_config(None, [spec % "error"]), str(f))
    with caplog.at_level("WARNING", logger="rvpo_async"):
        rows = file_rows(load_config(None, [spec % "drop"]), str(f))
    assert len(rows[0]["meta"]["rubric"]) == 3 and "2 criteria of 1 prompt(s)" in caplog.text
