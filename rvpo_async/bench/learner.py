"""`rvpo-async bench learner`: one DeepSpeed learner step, each distinct prompt run once (`learner.shared_prefix`)
against the plain forward over whole rows, side by side in this process.

The batch is a training step of the built-in task: `--groups` prompts of the task rendered with the model's chat
template, `--group-size` responses each of `--response-len` random tokens (every response at the budget, the
longest a step can be). With `--mixed`, each response's length is drawn from a quarter of the budget to all of
it (a real step's spread: padding to the longest is then about a third of the response positions), and a third
mode runs: each prompt once with the responses in one forward (`learner.length_buckets=1`) against the default
length buckets. One learner rank of the same model per mode (world size 1, ZeRO stage and threads from the
options) take alternating optimizer steps on it; the first `--warmup` of each are not timed. Prints the median
and range of each mode's step time and the ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any, Sequence


def step_batch(model_path: str, groups: int, group_size: int, response_len: int, seed: int = 0,
               mixed: bool = False) -> dict[str, Any]:
    """Right-padded rows of the task's prompts (chat template) and random responses of `response_len` tokens
    (`mixed`: of response_len // 4 .. response_len tokens, uniformly)."""
    import torch
    from transformers import AutoTokenizer

    from rvpo_async.task import constraint_prompts

    tok = AutoTokenizer.from_pretrained(model_path)
    rows = constraint_prompts(groups, seed)
    prompts = [tok(tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                           add_generation_prompt=True), add_special_tokens=False)["input_ids"]
               for r in rows]
    g = torch.Generator().manual_seed(seed)
    length = max(len(p) for p in prompts) + response_len
    n = groups * group_size
    ids = torch.full((n, length), int(tok.pad_token_id or 0), dtype=torch.long)
    resp = torch.zeros(n, length)
    for i in range(n):
        p = prompts[i // group_size]
        r = response_len
        if mixed:
            r = int(torch.randint(max(1, response_len // 4), response_len + 1, (1,), generator=g))
        ids[i, :len(p)] = torch.tensor(p)
        ids[i, len(p):len(p) + r] = torch.randint(3, len(tok), (r,), generator=g)
        resp[i, len(p):len(p) + r] = 1
    return {"input_ids": ids, "response_mask": resp, "advantages": torch.randn(n, generator=g),
            "behaviour_logprobs": -torch.rand(n, length, generator=g) * resp - 5.0 * resp,
            "policy_version": torch.zeros(n, dtype=torch.long)}


def bench_learner(argv: Sequence[str]) -> int:
    from rvpo_async.bench.trl import LADDER, ensure_rung_model

    p = argparse.ArgumentParser(prog="rvpo-async bench learner", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=list(LADDER), default="tiny")
    p.add_argument("--groups", type=int, default=8, help="prompts per step (rollout.groups_per_step)")
    p.add_argument("--group-size", type=int, default=8, help="responses per prompt (rollout.group_size)")
    p.add_argument("--response-len", type=int, default=32, help="tokens per response (rollout.max_new_tokens)")
    p.add_argument("--mixed", action="store_true",
                   help="responses of response_len/4 .. response_len tokens; adds the one-forward mode")
    p.add_argument("--micro-batch", type=int, default=64, help="learner.micro_batch_size")
    p.add_argument("--zero-stage", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads (learner.num_threads)")
    p.add_argument("--repeat", type=int, default=5, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--port", type=int, default=21460, help="torch.distributed port of the two ranks")
    a = p.parse_args(list(argv))
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(a.port), "DS_ACCELERATOR": "cpu"}.items():
        os.environ.setdefault(k, v)
    import torch

    from learner.engine import DeepSpeedLearner
    from rvpo_async.config import Config
    from rvpo_async.loss import make_loss_fn

    torch.set_num_threads(a.threads)
    path = ensure_rung_model(a.model, LADDER[a.model])
    batch = step_batch(path, a.groups, a.group_size, a.response_len, mixed=a.mixed)
    n, length = batch["input_ids"].shape
    trained = int(batch["response_mask"].sum())
    prompt_len = int((batch["response_mask"] == 0).sum(1).max())  # the longest prompt
    lens = (f"{max(1, a.response_len // 4)}..{a.response_len} tokens ({trained} in all)" if a.mixed
            else f"{a.response_len} tokens")
    print(f"bench learner: model {a.model} ({path}); {n} rows of {length} tokens ({a.groups} prompts x "
          f"{a.group_size} responses of {lens}), micro-batch {a.micro_batch}, ZeRO {a.zero_stage}, "
          f"{a.threads} thread(s)", flush=True)
    modes = {"plain": ("plain forward (shared_prefix=false)", ["learner.shared_prefix=false"])}
    if a.mixed:
        modes["one"] = ("each prompt once, length_buckets=1", ["learner.length_buckets=1"])
    modes["shared"] = ("each prompt once (shared_prefix=true)", [])
    learners: dict[str, Any] = {}
    for mode, (_label, extra) in modes.items():
        cfg = Config().override(f"learner.zero_stage={a.zero_stage}", f"learner.micro_batch_size={a.micro_batch}",
                                *extra)
        learners[mode] = (DeepSpeedLearner(path, cfg.learner, seed=0), make_loss_fn(cfg.algo, 1.0))
    times: dict[str, list[float]] = {m: [] for m in learners}
    for i in range(a.warmup + a.repeat):
        for mode, (lrn, loss_fn) in learners.items():
            b = dict(batch, policy_version=torch.full((n,), lrn.version, dtype=torch.long))
            t = time.perf_counter()
            lrn.train_batch(b, loss_fn)
            if i >= a.warmup:
                times[mode].append(time.perf_counter() - t)
    for mode, ts in times.items():
        print(f"  {modes[mode][0]:40s} {statistics.median(ts):8.3f} s/step  [{min(ts):.3f} .. {max(ts):.3f}] "
              f"over {len(ts)}")
    med = {m: statistics.median(ts) for m, ts in times.items()}
    print(f"  plain/shared: {med['plain'] / med['shared']:.2f}x (tokens through the model per step: plain "
          f"{n * length}, shared {a.groups * prompt_len + n * a.response_len} at most)")
    if a.mixed:
        print(f"  one forward/length buckets: {med['one'] / med['shared']:.2f}x (response tokens trained {trained}, "
              f"padded to the longest {n * a.response_len})")
    return 0
