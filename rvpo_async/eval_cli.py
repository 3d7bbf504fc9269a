"""`rvpo-async eval`: score a Hugging Face model directory on the evaluation prompts with the run's judges.

The prompts are the task's held-out split (task.eval_fraction / task.eval_file), or the task's own prompts
when the config has no split; the first `eval.num_prompts` of them, `eval.samples_per_prompt` responses
each at `eval.temperature` (0 = greedy). With a baseline, both models answer the same prompts and the
difference (model - baseline) is printed and written too.
"""

from __future__ import annotations

import gc
import json
import time
from pathlib import Path
from typing import Any

from rvpo_async.config import Config
from rvpo_async.evaluate import load_split, make_scorer, score_responses, summarise_scores

ROWS = (("worst_reward_mean", "lowest reward per response"), ("all_met_share", "share meeting every constraint"))


def evaluate_model(cfg: Config, model_dir: str, judge_engines: dict[str, Any] | None = None) -> dict[str, Any]:
    """One model's evaluation summary (per-reward means, lowest reward per response, share meeting all)."""
    from transformers import AutoTokenizer

    from actors.rollout.call import CallRollout

    if not Path(model_dir).is_dir():
        raise FileNotFoundError(f"model directory not found: {model_dir}")
    tok = AutoTokenizer.from_pretrained(model_dir)
    train, held = load_split(cfg, tok)
    prompts = (held or train)[:cfg.eval.num_prompts]
    e = cfg.eval
    max_tokens = e.max_new_tokens or cfg.rollout.max_new_tokens
    engine = CallRollout("eval", str(Path(model_dir).resolve()), group_size=1, max_new_tokens=max_tokens,
                           seed=cfg.run.seed, max_model_len=cfg.model.max_model_len,
                           kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes,
                           gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
                           gpu_kv_cache_memory_bytes=cfg.rollout.gpu_kv_cache_memory_bytes)
    t0 = time.perf_counter()
    try:
        texts, _, tokens = engine.sample_texts(prompts, e.samples_per_prompt, e.temperature, max_tokens, cfg.run.seed)
    finally:
        del engine
        gc.collect()  # one engine at a time: free this one before a baseline's loads
    t1 = time.perf_counter()
    scores = score_responses(make_scorer(cfg, judge_engines), prompts, texts, cfg.judges.concurrency)
    out = {"model": str(model_dir), "prompt_set": "held-out" if held else "task", "prompts": len(prompts),
           "samples_per_prompt": e.samples_per_prompt, "temperature": e.temperature, "generated_tokens": tokens,
           "generate_s": t1 - t0, **summarise_scores(scores, cfg.reward_names)}
    out["examples"] = [{"prompt": p.prompt_id, "response": t[0]} for p, t in zip(prompts[:3], texts[:3])]
    return out


def difference(model: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    def sub(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else a - b

    return {"reward_mean": {n: sub(v, baseline["reward_mean"].get(n)) for n, v in model["reward_mean"].items()},
            **{k: sub(model[k], baseline[k]) for k, _ in ROWS}}


def table(reward_names: list[str], model: dict[str, Any], baseline: dict[str, Any] | None = None) -> str:
    def f(v: float | None, signed: bool = False) -> str:
        return "-" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")

    cols = ["model"] + (["baseline", "difference"] if baseline else [])
    lines = [f"{'':32}" + "".join(f"{c:>12}" for c in cols)]
    diff = difference(model, baseline) if baseline else None
    for label, get in [(n, lambda d, n=n: d["reward_mean"].get(n)) for n in reward_names] + \
                      [(text, lambda d, k=k: d[k]) for k, text in ROWS]:
        cells = [f(get(model))] + ([f(get(baseline)), f(get(diff), signed=True)] if baseline else [])
        lines.append(f"{label:32}" + "".join(f"{c:>12}" for c in cells))
    return "\n".join(lines)


def run_eval(cfg: Config, model_dir: str, baseline_dir: str | None, out: str) -> dict[str, Any]:
    judge_engines: dict[str, Any] = {}
    started_ray = False
    if any(s.kind == "llm" for s in cfg.judges.specs):  # the LLM judges' engine runs as a Ray actor
        from actors.judges.worker import create_judge_engines
        from rvpo_async.pipeline import init_ray, resolve_model

        started_ray = init_ray(cfg)
        judge_engines = create_judge_engines(cfg, resolve_model(cfg))
    try:
        result: dict[str, Any] = {"model": evaluate_model(cfg, model_dir, judge_engines)}
        if baseline_dir:
            result["baseline"] = evaluate_model(cfg, baseline_dir, judge_engines)
            result["difference"] = difference(result["model"], result["baseline"])
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    m = result["model"]
    print(f"{m['prompts']} {m['prompt_set']} prompts x {m['samples_per_prompt']} responses, temperature "
          f"{m['temperature']:g}; model {model_dir}" + (f", baseline {baseline_dir}" if baseline_dir else ""))
    print(table(cfg.reward_names, m, result.get("baseline")))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {out}")
    return result
