"""Prompt sources: the built-in constraint task and jsonl prompt files."""

from __future__ import annotations

from pathlib import Path

import pytest

from rvpo_async.task import constraint_prompts, file_prompts, prompt_stream
from rvpo_async.types import Prompt


def test_constraint_prompts_are_deterministic_and_name_the_required_word():
    a, b = constraint_prompts(20, seed=3), constraint_prompts(20, seed=3)
    assert a == b and a != constraint_prompts(20, seed=4)
    assert all(r["meta"]["required_word"] in r["prompt"] for r in a)
    assert len({r["id"] for r in a}) == 20


def test_file_prompts_keep_extra_fields_as_judge_metadata(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "q1", "prompt": "2+2?", "answer": "4"}\n\n{"prompt": "hi"}\n')
    rows = file_prompts(str(f))
    assert rows[0] == {"id": "q1", "prompt": "2+2?", "meta": {"answer": "4"}}
    assert rows[1]["prompt"] == "hi" and rows[1]["meta"] == {}


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "ok"}\nnot json\n', r"p\.jsonl:2: not valid JSON"),
    ('{"question": "no prompt"}\n', r"p\.jsonl:1: missing field 'prompt'"),
    ("\n", r"no prompts"),
])
def test_malformed_prompt_files_name_the_file_and_line(tmp_path: Path, text: str, match: str):
    f = tmp_path / "p.jsonl"
    f.write_text(text)
    with pytest.raises(ValueError, match=match):
        file_prompts(str(f))


def test_missing_prompt_file_is_named():
    with pytest.raises(FileNotFoundError, match="task.prompts_file not found: /nope.jsonl"):
        file_prompts("/nope.jsonl")


def test_prompt_stream_visits_every_prompt_once_per_epoch():
    prompts = [Prompt(f"p{i}", "t", (1,)) for i in range(7)]
    stream = prompt_stream(prompts, seed=0)
    first, second = [next(stream).prompt_id for _ in range(7)], [next(stream).prompt_id for _ in range(7)]
    assert sorted(first) == sorted(second) == sorted(p.prompt_id for p in prompts)
