"""Prompt sources: the built-in multi-constraint task, or a jsonl file of prompts.

The built-in task asks for one short sentence about a topic that must use a given word. Its rule judges
(configs/tiny-cpu.yaml) score length, a sentence format, a safety list and the required word. The
required word is the hard "bottleneck" constraint: a policy can raise the mean of the other rewards
while never producing it, which is the constraint neglect RVPO is meant to prevent.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Iterator

from rvpo_async.config import Config
from rvpo_async.types import Prompt

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


def file_prompts(path: str) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"task.prompts_file not found: {p}")
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}:{lineno}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
            raise ValueError(f"{p}:{lineno}: each line needs a string field 'prompt'")
        meta = {k: v for k, v in obj.items() if k not in ("id", "prompt")}
        rows.append({"id": str(obj.get("id", f"p{lineno:05d}")), "prompt": obj["prompt"], "meta": meta})
    if not rows:
        raise ValueError(f"{p}: no prompts")
    return rows


def load_prompts(cfg: Config, tokenizer: Any) -> list[Prompt]:
    """Chat-format and tokenise every prompt of the configured task."""
    if cfg.task.name == "constraints":
        rows = constraint_prompts(cfg.task.num_prompts, cfg.run.seed)
    else:
        rows = file_prompts(str(cfg.task.prompts_file))
    out = []
    for r in rows:
        text = tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                             add_generation_prompt=True)
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
