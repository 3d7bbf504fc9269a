"""Prompt sources: the built-in multi-constraint task, or a file of prompts (.jsonl, .json, .parquet, or a
directory written by `datasets.save_to_disk`), optionally with a rubric per prompt (rvpo_async.rubric).

The built-in task asks for one short sentence about a topic that must use a given word. Its rule judges
(configs/tiny-cpu.yaml) score length, a sentence format, a safety list and the required word. The
required word is the hard "bottleneck" constraint: a policy can raise the mean of the other rewards
while never producing it, which is the constraint neglect RVPO is meant to prevent.
"""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path
from typing import Any, Iterator

from rvpo_async.config import Config
from rvpo_async.rubric import DROPPED_KEY, Criterion, Overflow, RubricError, as_meta, parse_rubric
from rvpo_async.rubric import META_KEY as RUBRIC_META
from rvpo_async.rubric import rubric_without_engine
from rvpo_async.types import Prompt

log = logging.getLogger("rvpo_async")

TOPICS = ["the cat", "a robot", "the river", "my friend", "the garden", "a teacher", "the ship", "the sun",
          "the city", "a bird", "our team", "green tea", "the red ball", "clean water", "a quiet room"]
REQUIRED_WORDS = ["safe"]


def constraint_prompts(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        word = rng.choice(REQUIRED_WORDS)
        rows.append({"id": f"c{i:05d}", "prompt": f"Write one short sentence about {topic}. Use the word {word}.",
                     "meta": {"topic": topic, "required_word": word}})
    return rows


class PromptFileError(ValueError):
    """A prompts file is unreadable or a row is malformed; the message names the file, row and field."""


def _source_rows(p: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) of every row of a prompts source. jsonl and json are read here, line by line, so an
    error can name the line (the `datasets` json reader reports neither line nor field); parquet and
    save_to_disk directories are read by the `datasets` library."""
    if p.is_dir() or p.suffix == ".parquet":
        import datasets

        datasets.disable_progress_bars()
        try:
            ds: Any = datasets.load_from_disk(str(p)) if p.is_dir() else \
                datasets.Dataset.from_parquet(str(p), cache_dir=None, keep_in_memory=True)
        except Exception as e:  # the library raises many kinds; all mean the same to a user here
            kind = "datasets.save_to_disk directory" if p.is_dir() else "parquet file"
            raise PromptFileError(f"{p}: cannot be read as a {kind}"
                                  f" ({type(e).__name__}: {e})") from e
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise PromptFileError(f"{p}: a DatasetDict without a 'train' split (splits: {sorted(ds)})")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield f"{p}: row {i + 1}", row
        return
    if p.suffix not in (".jsonl", ".json"):
        raise PromptFileError(f"{p}: unsupported prompts file type {p.suffix or '(none)'!r}; use .jsonl, .json, "
                              f".parquet or a datasets.save_to_disk directory")
    data = p.read_bytes()
    if p.suffix == ".json" and data.lstrip()[:1] == b"[":
        try:
            rows = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            raise PromptFileError(f"{p}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})"
                                  ) from None
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        for i, row in enumerate(rows):
            yield f"{p}: row {i + 1}", row
        return
    for lineno, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptFileError(f"{p}:{lineno}: not UTF-8 text (byte {raw[e.start]:#04x} at column "
                                  f"{e.start + 1})") from None
        if not line.strip():
            continue
        try:
            yield f"{p}:{lineno}", json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptFileError(f"{p}:{lineno}: not valid JSON ({e.msg})") from None


def _prompt_value(v: Any, where: str, field: str) -> str | list[dict[str, str]]:
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, (list, tuple)) and v and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in v):
        return [{"role": m["role"], "content": m["content"]} for m in v]
    raise PromptFileError(f"{where}: field '{field}' must be a non-empty string or a chat message list "
                          f"[{{role, content}}], got {str(v)[:80] if v is not None else 'nothing'}")


def _drop_none(v: Any) -> Any:
    """Columnar sources fill a field a row lacks with None; dropping those keeps one row's meta the same
    whichever format it was read from."""
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v


def file_prompts(path: str, *, prompt_field: str = "prompt", rubric_field: str = "rubric",
                 criterion_key: str = "criterion", weight_key: str = "points", rubric_max_items: int | None = None,
                 rubric_overflow: Overflow = "error", need_rubric: bool = False,
                 need_checks: bool = False) -> list[dict[str, Any]]:
    """Rows {id, prompt, meta} of a prompts source. Fields other than id and the prompt stay in meta
    for the judges. With `need_rubric` (a rubric judge is configured) every row needs a rubric (under
    `rubric_field`, or HealthBench's `rubrics`), checked and stored as meta["rubric"] = [{criterion, points}].
    A criterion's `check` is built here, so a bad rule fails the load; with `need_checks` (a rubric judge
    with no LLM engine) every criterion needs one. Errors name the file, the row (or line) and the field."""
    p = Path(path)
    if not p.exists():
        packaged = Path(__file__).resolve().parent.parent / path  # rvpo_async/data/... from any directory
        if packaged.exists() and not p.is_absolute():
            p = packaged
        else:
            raise FileNotFoundError(f"task.prompts_file not found: {p}")
    rows = []
    for n, (where, obj) in enumerate(_source_rows(p), 1):
        if not isinstance(obj, dict):
            raise PromptFileError(f"{where}: each row must be a JSON object, got {type(obj).__name__}")
        obj = _drop_none(obj)
        if prompt_field not in obj:
            raise PromptFileError(f"{where}: missing field '{prompt_field}' (task.prompt_field); fields: {sorted(obj)}")
        prompt = _prompt_value(obj[prompt_field], where, prompt_field)
        rfield = rubric_field if rubric_field in obj or "rubrics" not in obj else "rubrics"
        if not need_rubric:  # no rubric judge: a field of that name is plain judge metadata
            rfield = ""
        meta = {k: v for k, v in obj.items() if k not in ("id", prompt_field, rfield)}
        if rfield in obj:
            try:
                criteria, dropped = parse_rubric(obj[rfield], rfield, criterion_key=criterion_key,
                                                 weight_key=weight_key, max_items=rubric_max_items,
                                                 overflow=rubric_overflow)
            except RubricError as e:
                raise PromptFileError(f"{where} (id {obj.get('id', '?')}): {e}") from None
            _check_rules(criteria, need_checks, f"{where} (id {obj.get('id', '?')}): field '{rfield}'")
            meta[RUBRIC_META] = as_meta(criteria)
            if dropped:
                meta[DROPPED_KEY] = dropped
        elif rfield:
            raise PromptFileError(f"{where}: missing field '{rubric_field}' (task.rubric_field); the rubric judge "
                                  f"grades each prompt's own criteria")
        rows.append({"id": str(obj.get("id", f"p{n:05d}")), "prompt": prompt, "meta": meta})
    if not rows:
        raise PromptFileError(f"{p}: no prompts (the file is empty)")
    return rows


def _check_rules(criteria: list[Criterion], need_checks: bool, where: str) -> None:
    from actors.judges.rule_builders import build_check  # pure; deferred so that this module's imports stay small

    for i, c in enumerate(criteria):
        if c.check is None:
            if need_checks:
                raise PromptFileError(f"{where}[{i}] has no 'check', and the rubric judge has no LLM engine "
                                      f"(params.engine: null) to grade it: {c.text!r}")
            continue
        try:
            build_check(c.check)
        except ValueError as e:
            raise PromptFileError(f"{where}[{i}] check: {e}") from None


def file_rows(cfg: Config, path: str) -> list[dict[str, Any]]:
    """`file_prompts` of `path` with the configured field mapping and the rubric judge's limits."""
    t, spec = cfg.task, cfg.rubric_spec
    rows = file_prompts(path, prompt_field=t.prompt_field, rubric_field=t.rubric_field, criterion_key=t.criterion_key,
                        weight_key=t.weight_key, rubric_max_items=len(spec.slot_names) if spec else None,
                        rubric_overflow=spec.params.get("overflow", "error") if spec else "error",
                        need_rubric=spec is not None, need_checks=spec is not None and rubric_without_engine(spec))
    dropped = [r["meta"][DROPPED_KEY] for r in rows if DROPPED_KEY in r["meta"]]
    if dropped:
        log.warning("%s: %d criteria of %d prompt(s) beyond the rubric judge's max_items were dropped "
                    "(overflow: drop)", path, sum(dropped), len(dropped))
    return rows


def load_prompts(cfg: Config, tokenizer: Any, path: str | None = None) -> list[Prompt]:
    """Chat-format and tokenise every prompt of the configured task, or of the prompts file `path` (an
    evaluation file, read with the same field mapping)."""
    if path is None and cfg.task.name == "constraints":
        rows = constraint_prompts(cfg.task.num_prompts, cfg.run.seed)
    else:
        rows = file_rows(cfg, path or str(cfg.task.prompts_file))
    out = []
    for r in rows:
        msgs = r["prompt"] if isinstance(r["prompt"], list) else [{"role": "user", "content": r["prompt"]}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        out.append(Prompt(prompt_id=r["id"], text=text, token_ids=tuple(int(i) for i in ids), meta=r["meta"]))
    return out


def prompt_stream(prompts: list[Prompt], seed: int) -> Iterator[Prompt]:
    """Endless epochs over the prompts, each epoch in a fresh seeded order."""
    rng = random.Random(seed)
    while True:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for i in order:
            yield prompts[i]
