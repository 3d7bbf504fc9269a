"""`rvpo-async bench rollout`: generated tokens/s of one or more rollout engines on the tiny model.

Baseline, in the same process: transformers' `generate` sampling the same prompts with the same number of
samples and new tokens. The engines run as Ray actors, as in training; each engine's figure is printed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import Sequence


def bench_rollout(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rvpo-async bench rollout")
    p.add_argument("--model", default=None, help="model dir (default: build the tiny model in a temp dir)")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--prompts", type=int, default=16, help="prompts per engine call")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args(argv)

    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rollout import RolloutActor
    from rvpo_async.config import load_config
    from rvpo_async.task import load_prompts
    from rvpo_async.tiny_model import make_tiny_model

    model = a.model or str(make_tiny_model(tempfile.mkdtemp(prefix="rvpo-bench-"), seed=0))
    cfg = load_config(None, ["task.num_prompts=256"])
    tok = AutoTokenizer.from_pretrained(model)
    prompts = load_prompts(cfg, tok)
    ray.init(num_cpus=max(4, a.engines + 1), include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        engines = [RolloutActor.options(num_cpus=1).remote(
            f"rollout-{i}", model, group_size=a.group_size, max_new_tokens=a.max_new_tokens, seed=i)
            for i in range(a.engines)]
        ray.get([e.ready.remote() for e in engines])
        batch = prompts[:a.prompts]
        ids = list(range(a.prompts))

        def one_round(seed0: int) -> tuple[float, list[int]]:
            t = time.perf_counter()
            outs = ray.get([e.generate.remote(batch, ids, [seed0 + 1000 * i + j for j in ids])
                            for i, e in enumerate(engines)])
            dt = time.perf_counter() - t
            return dt, [sum(len(s.token_ids) for g in groups for s in g.samples) for groups in outs]

        one_round(0)  # warm-up
        per_engine = [0] * a.engines
        total_t = 0.0
        for r in range(a.rounds):
            dt, toks = one_round(r + 1)
            total_t += dt
            per_engine = [x + y for x, y in zip(per_engine, toks)]
    finally:
        ray.shutdown()

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    texts = [q.token_ids for q in batch]
    width = max(len(t) for t in texts)
    inp = torch.tensor([[tok.pad_token_id] * (width - len(t)) + list(t) for t in texts])
    att = (torch.arange(width)[None, :] >= torch.tensor([width - len(t) for t in texts])[:, None]).long()
    t = time.perf_counter()
    with torch.no_grad():
        out = hf.generate(input_ids=inp, attention_mask=att, do_sample=True, max_new_tokens=a.max_new_tokens,
                          num_return_sequences=a.group_size, pad_token_id=tok.pad_token_id)
    hf_t = time.perf_counter() - t
    gen = out[:, width:]
    hf_tokens = int(((gen != tok.pad_token_id) & (gen != tok.eos_token_id)).sum()) + int((gen == tok.eos_token_id).any(-1).sum())

    print(f"rollout: {a.engines} engine(s), {a.prompts} prompts x G={a.group_size} per call, "
          f"max {a.max_new_tokens} new tokens, {a.rounds} rounds, tiny Qwen2, CPU")
    for i, n in enumerate(per_engine):
        print(f"  engine rollout-{i}: {n / total_t:10.0f} generated tokens/s")
    total = sum(per_engine) / total_t
    print(f"  all engines:      {total:10.0f} generated tokens/s")
    hf_rate = hf_tokens / hf_t
    print(f"  baseline, transformers generate (1 thread, same process): {hf_rate:10.0f} tokens/s")
    print(f"  ratio all engines / baseline: {total / hf_rate:.1f}x")
    return 0
