"""Held-out evaluation: the prompt split, scoring responses with the run's judges, and the summary row.

During training (`eval.every` > 0) an `Evaluator` asks the rollout engines for responses to the held-out
prompts with the current weights (`eval.temperature`, 0 = greedy; `eval.samples_per_prompt`), scores them
with the run's judges in a driver thread, and hands back one `"kind": "eval"` row. The engines run the
evaluation between two generate calls of training, so training waits for the evaluation's generation
only; the scoring overlaps the next steps.

The same summary serves `rvpo-async eval` (rvpo_async.eval_cli), which scores a saved model directory.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Sequence

import torch

from rvpo_async.algo import reward_diagnostics
from rvpo_async.config import Config
from rvpo_async.types import JudgeResult, Prompt

log = logging.getLogger("rvpo_async")


# ------------------------------------------------------------------ the held-out split

def split_prompts(prompts: Sequence[Prompt], fraction: float, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """(train, eval): a seeded share of the distinct prompt TEXTS is held out, so a text repeated in the
    task (the built-in task repeats 15 topics) is never on both sides. At least one text on each side."""
    if not 0 < fraction < 1:
        raise ValueError(f"task.eval_fraction must be in (0, 1) to split, got {fraction}")
    texts = sorted({p.text for p in prompts})
    if len(texts) < 2:
        raise ValueError(f"task.eval_fraction={fraction}: the task has {len(texts)} distinct prompt(s); "
                         f"a held-out split needs two or more")
    random.Random(f"eval-split-{seed}").shuffle(texts)
    n_eval = min(len(texts) - 1, max(1, round(fraction * len(texts))))
    held = set(texts[:n_eval])
    return [p for p in prompts if p.text not in held], [p for p in prompts if p.text in held]


def without_texts(train: Sequence[Prompt], held_out: Sequence[Prompt]) -> list[Prompt]:
    held = {p.text for p in held_out}
    return [p for p in train if p.text not in held]


def long_tailed(prompts: list[Prompt], short: int, share: float) -> list[Prompt]:
    """task.short_max_new_tokens: every prompt's responses capped at `short` (Prompt.meta["max_new_tokens"]),
    except a `share` of prompts, picked by a hash of the prompt id (the same in every run), left uncapped."""
    if short <= 0:
        return prompts
    import zlib

    def long(p: Prompt) -> bool:
        return zlib.crc32(p.prompt_id.encode()) % 10_000 < share * 10_000

    return [p if long(p) else dataclasses.replace(p, meta={**p.meta, "max_new_tokens": short}) for p in prompts]


def load_split(cfg: Config, tokenizer: Any) -> tuple[list[Prompt], list[Prompt]]:
    """The task's training prompts and its held-out evaluation prompts (empty without a split)."""
    from rvpo_async.task import load_prompts

    prompts = long_tailed(load_prompts(cfg, tokenizer), cfg.task.short_max_new_tokens, cfg.task.long_tail_share)
    if cfg.task.eval_file:
        eval_cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="file",
                                                                     prompts_file=cfg.task.eval_file))
        held = load_prompts(eval_cfg, tokenizer)
        train = without_texts(prompts, held)
        if len(train) < len(prompts):
            log.info("task.eval_file: %d training prompt(s) with an evaluation prompt's text left out",
                     len(prompts) - len(train))
        if not train:
            raise ValueError(f"task.eval_file {cfg.task.eval_file}: every training prompt is also an evaluation "
                             f"prompt; nothing is left to train on")
        return train, held
    if cfg.task.eval_fraction > 0:
        return split_prompts(prompts, cfg.task.eval_fraction, cfg.run.seed)
    return prompts, []


# ------------------------------------------------------------------ scoring and the summary

def summarise_scores(results: Sequence[Sequence[Sequence[JudgeResult]]], names: Sequence[str]) -> dict[str, Any]:
    """[prompt][sample][judge] results -> per-reward means, lowest reward per response, share meeting all.
    Masked entries (status other than ok) take no part, as in training."""
    if not results or not results[0]:
        raise ValueError("no evaluation responses to summarise")
    rewards = torch.tensor([[[r.value if r.status == "ok" else 0.0 for r in smp] for smp in pr] for pr in results],
                           dtype=torch.float64)  # [P, S, K]
    mask = torch.tensor([[[r.status == "ok" for r in smp] for smp in pr] for pr in results])
    d = reward_diagnostics(rewards, mask=mask)
    counts = mask.sum((0, 1))
    return {
        "reward_mean": {n: (float(d["mean"][k]) if int(counts[k]) else None) for k, n in enumerate(names)},
        "worst_reward_mean": float(d["worst_mean"]),
        "all_met_share": float(d["all_met_share"]),
        "masked_share": float(1.0 - mask.double().mean()),
        "responses": int(rewards.shape[0] * rewards.shape[1]),
    }


def score_responses(scorer: Any, prompts: Sequence[Prompt], texts: Sequence[Sequence[str]],
                    threads: int = 8) -> list[list[list[JudgeResult]]]:
    """Every response scored by every judge (`scorer`: actors.judges.worker.SampleScorer), concurrently."""
    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="rvpo-eval-score") as pool:
        futs = [[pool.submit(scorer.score_sample, p, t) for t in ts] for p, ts in zip(prompts, texts)]
        return [[f.result() for f in row] for row in futs]


def make_scorer(cfg: Config, judge_engines: dict[str, Any] | None = None) -> Any:
    from actors.judges.worker import SampleScorer

    return SampleScorer(list(cfg.judges.specs), judge_engines or {}, cfg.judges.concurrency, cfg.judges.timeout_s)


# ------------------------------------------------------------------ during training

class Evaluator:
    """Evaluations started after a training step, finished in the background, collected by the loop."""

    def __init__(self, cfg: Config, engines: list[Any], prompts: Sequence[Prompt],
                 judge_engines: dict[str, Any] | None = None) -> None:
        if not prompts:
            raise ValueError("eval.every is set but the task has no held-out prompts "
                             "(set task.eval_fraction or task.eval_file)")
        self.cfg, self.engines = cfg, engines
        self.prompts = list(prompts)[:cfg.eval.num_prompts]
        self.scorer = make_scorer(cfg, judge_engines)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rvpo-eval")
        self._pending: list[Future] = []

    def due(self, step: int) -> bool:
        return bool(self.cfg.eval.every) and step % self.cfg.eval.every == 0

    def start(self, step: int, min_version: int = 0) -> None:
        """Queue one evaluation on the engines now, generated once they serve `min_version` or later."""
        e, n = self.cfg.eval, len(self.engines)
        per = -(-len(self.prompts) // n)
        chunks = [self.prompts[i * per:(i + 1) * per] for i in range(n)]
        max_tokens = e.max_new_tokens or self.cfg.rollout.max_new_tokens
        t0 = time.perf_counter()
        refs = [(c, eng.sample_texts.remote(c, e.samples_per_prompt, e.temperature, max_tokens,
                                            self.cfg.run.seed + step, min_version=min_version))
                for eng, c in zip(self.engines, chunks) if c]
        self._pending.append(self._pool.submit(self._finish, step, refs, t0))

    def _finish(self, step: int, refs: list[tuple[list[Prompt], Any]], t0: float) -> dict[str, Any]:
        import ray

        prompts, texts, versions, tokens = [], [], [], 0
        for chunk, ref in refs:
            t, v, n = ray.get(ref)
            prompts += chunk
            texts += t
            versions.append(v)
            tokens += n
        t1 = time.perf_counter()
        scores = score_responses(self.scorer, prompts, texts, self.cfg.judges.concurrency)
        row = {"kind": "eval", "step": step, "policy_version": min(versions), "time": time.time(),
               "eval": summarise_scores(scores, self.cfg.reward_names)}
        row["eval"].update(generate_s=t1 - t0, score_s=time.perf_counter() - t1, generated_tokens=tokens)
        return row

    def collect(self, wait: bool = False) -> list[dict[str, Any]]:
        """Finished evaluation rows, oldest first (all of them, waiting, with `wait`)."""
        out = []
        while self._pending and (wait or self._pending[0].done()):
            out.append(self._pending.pop(0).result())
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
