"""`rvpo-async bench rollout`: generated tokens/s of rollout engines on the tiny model.

`--workload uniform` (the default): one or more call-at-a-time engines (actors/rollout/call.py), every response
up to max_new_tokens; baseline, in the same process: transformers' `generate` sampling the same prompts
with the same number of samples and new tokens. The engines run as Ray actors, as in training.

`--workload long_tail`: the streaming engine (actors/rollout/streaming.py) against the call-at-a-time engine on the
same model and prompts, most groups short and a few near max_new_tokens (per-prompt caps, ignore_eos), the
same number of groups outstanding on both: generated tokens/s, groups/s, and group latency from submission
to delivery. Repeats alternate which engine goes first, so a change of load on the machine hits both.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from typing import Any, Sequence

from actors.vllm_engine import MAX_NEW_TOKENS_META


def bench_rollout(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rvpo-async bench rollout")
    p.add_argument("--model", default=None, help="model dir (default: build the tiny model in a temp dir)")
    p.add_argument("--engines", type=int, default=1)
    p.add_argument("--prompts", type=int, default=16, help="uniform: prompts per engine call")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 64 (uniform), 128 (long_tail)")
    p.add_argument("--rounds", type=int, default=3, help="uniform: timed rounds")
    p.add_argument("--workload", choices=["uniform", "long_tail"], default="uniform")
    lt = p.add_argument_group("long_tail")
    lt.add_argument("--groups-per-step", type=int, default=8,
                    help="a call-at-a-time call holds groups_per_step / engines groups; as many stay outstanding")
    lt.add_argument("--groups", type=int, default=64, help="groups per engine kind and repeat")
    lt.add_argument("--repeats", type=int, default=3)
    lt.add_argument("--seed", type=int, default=0, help="workload seed of the first repeat (+1 per repeat)")
    lt.add_argument("--short-share", type=float, default=0.85)
    lt.add_argument("--short-div", type=int, default=16, help="short groups are capped at max_new_tokens / this")
    a = p.parse_args(argv)
    if a.workload == "long_tail":
        return _long_tail_main(a)
    a.max_new_tokens = a.max_new_tokens or 64

    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.rollout.call import RolloutActor
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


def _long_tail_main(a: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from rvpo_async.config import load_config
    from rvpo_async.task import load_prompts
    from rvpo_async.tiny_model import make_tiny_model

    model = a.model or str(make_tiny_model(tempfile.mkdtemp(prefix="rvpo-bench-"), seed=0))
    prompts = load_prompts(load_config(None, ["task.num_prompts=256"]), AutoTokenizer.from_pretrained(model))
    res = run_long_tail(model, prompts, engines=a.engines, groups_per_step=a.groups_per_step,
                        group_size=a.group_size, max_new_tokens=a.max_new_tokens or 128, groups=a.groups,
                        repeats=a.repeats, seed=a.seed, short_share=a.short_share, short_div=a.short_div)
    print_long_tail(res)
    return 0


# ---------------------------------------------------------------------------------------------- long tail
def long_tail_workload(prompts: Sequence[Any], n_groups: int, max_new_tokens: int, seed: int,
                       short_share: float = 0.85, short_div: int = 16) -> list[Any]:
    """`n_groups` prompts, each carrying its own response cap (meta["max_new_tokens"]): round(short_share * n)
    of them max_new_tokens // short_div, the others 7/8..1 of max_new_tokens, at seeded places."""
    import dataclasses

    rng = random.Random(seed)
    short = max(1, max_new_tokens // short_div)
    long_at = set(rng.sample(range(n_groups), n_groups - round(short_share * n_groups)))
    out = []
    for k in range(n_groups):
        base = prompts[(seed * 101 + k) % len(prompts)]
        cap = rng.randint(max(short + 1, max_new_tokens * 7 // 8), max_new_tokens) if k in long_at else short
        out.append(dataclasses.replace(base, prompt_id=f"{base.prompt_id}-lt{k}",
                                       meta={**base.meta, MAX_NEW_TOKENS_META: cap}))
    return out


class _Sink:
    """Stands in for the buffer and the judge pool of the streaming engine (an async actor): records when each
    group arrives, and wakes the driver waiting in `take`."""

    def __init__(self) -> None:
        import asyncio

        self.got: list[tuple[int, float, list[int]]] = []
        self.arrived = asyncio.Event()

    async def put_group(self, group: Any, timeout_s: float | None = None, judges: Any = None) -> None:
        """The buffer's signature; the judges' hand-off it stands for is a no-op here."""
        self.got.append((group.group_id, time.time(), [len(s.token_ids) for s in group.samples]))
        self.arrived.set()

    async def submit(self, group: Any) -> None:
        pass

    async def take(self, timeout_s: float) -> list[tuple[int, float, list[int]]]:
        """What arrived since the last call, waiting up to `timeout_s` for something to arrive."""
        import asyncio

        if not self.got:
            try:
                await asyncio.wait_for(self.arrived.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        self.arrived.clear()
        got, self.got = self.got, []
        return got


def _drive_calls(engines: list, work: list, seeds: list[int], per_call: int) -> tuple[float, dict]:
    """The call-at-a-time driver: each engine gets `per_call` groups, and its next call as soon as one returns."""
    import ray

    todo = list(range(len(work)))
    inflight: dict[Any, tuple[int, list[int], float]] = {}
    got: dict[int, tuple[float, float, list[int]]] = {}  # gid -> (submitted, delivered, lengths)

    def launch(i: int) -> None:
        if todo:
            take, todo[:] = todo[:per_call], todo[per_call:]
            inflight[engines[i].generate.remote([work[k] for k in take], take, [seeds[k] for k in take])] = \
                (i, take, time.time())

    t0 = time.time()
    for i in range(len(engines)):
        launch(i)
    while inflight:
        done, _ = ray.wait(list(inflight), num_returns=1)
        now = time.time()
        for ref in done:
            i, take, t_sub = inflight.pop(ref)
            for g in ray.get(ref):
                got[g.group_id] = (t_sub, now, [len(s.token_ids) for s in g.samples])
            launch(i)
    return t0, got


def _drive_stream(engines: list, sink: Any, work: list, seeds: list[int], per_call: int) -> tuple[float, dict]:
    """The streaming driver: `per_call` groups in flight on each engine, a new one submitted as each is delivered."""
    import ray

    todo = list(range(len(work)))
    submitted: dict[int, float] = {}
    owner: dict[int, int] = {}
    got: dict[int, tuple[float, float, list[int]]] = {}

    def submit(i: int, n: int) -> None:
        take, todo[:] = todo[:n], todo[n:]
        if take:
            now = time.time()
            for k in take:
                submitted[k], owner[k] = now, i
            ray.get(engines[i].submit.remote([work[k] for k in take], take, [seeds[k] for k in take]))

    t0 = time.time()
    for i in range(len(engines)):
        submit(i, per_call)
    while len(got) < len(work):
        arrived = ray.get(sink.take.remote(1.0))
        for gid, t, lengths in arrived:
            got[gid] = (submitted[gid], t, lengths)
            submit(owner[gid], 1)
        if not arrived:  # a group that fails never arrives: the engine says so in poll()
            failed = [f for p in ray.get([e.poll.remote() for e in engines]) for f in p["failed"]]
            if failed:
                raise RuntimeError(f"streaming engine failed: {failed}")
    ray.get([e.poll.remote() for e in engines])  # drop the engines' delivery notices
    return t0, got


def _figures(kind: str, repeat: int, seed: int, work: list, t0: float, got: dict) -> dict[str, Any]:
    import numpy as np

    caps = [w.meta[MAX_NEW_TOKENS_META] for w in work]
    lat = np.array([d - s for s, d, _ in got.values()])
    wall = max(d for _, d, _ in got.values()) - t0
    tokens = sum(sum(ls) for _, _, ls in got.values())
    lengths = [(caps[g], got[g][2]) for g in sorted(got)]
    return {"engine": kind, "repeat": repeat, "seed": seed, "groups": len(got), "tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall, "groups_per_s": len(got) / wall,
            "latency_p50_s": float(np.percentile(lat, 50)), "latency_p95_s": float(np.percentile(lat, 95)),
            "responses": sum(len(ls) for _, ls in lengths),
            "at_cap": sum(x == c for c, ls in lengths for x in ls),
            "over_cap": sum(x > c for c, ls in lengths for x in ls), "lengths": lengths}


FIGURES = ("tokens_per_s", "groups_per_s", "latency_p50_s", "latency_p95_s")


def run_long_tail(model: str, prompts: Sequence[Any], *, engines: int = 1, groups_per_step: int = 8,
                  group_size: int = 8, max_new_tokens: int = 128, groups: int = 64, repeats: int = 3,
                  seed: int = 0, short_share: float = 0.85, short_div: int = 16) -> dict[str, Any]:
    """The streaming engine against the call-at-a-time engine on a long-tailed workload, on the same model,
    alternating which goes first in each repeat; each repeat uses workload seed `seed + repeat`, the same
    prompts, caps and sampling seeds for both. Starts Ray when it is not running (and then stops it)."""
    import ray

    from actors.rollout.call import RolloutActor
    from actors.rollout.streaming import StreamingRolloutActor

    per_call = -(-groups_per_step // engines)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=max(4, 2 * engines + 2), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    actors: list = []
    try:
        kw = dict(group_size=group_size, max_new_tokens=max_new_tokens, ignore_eos=True)
        calls = [RolloutActor.options(num_cpus=1).remote(f"call-{i}", model, seed=i, **kw) for i in range(engines)]
        streams = [StreamingRolloutActor.options(num_cpus=1).remote(f"stream-{i}", model, seed=i, **kw)
                   for i in range(engines)]
        sink = ray.remote(_Sink).options(num_cpus=0).remote()
        actors = calls + streams + [sink]
        ray.get([e.ready.remote() for e in calls + streams])
        ray.get([e.connect.remote(sink, sink) for e in streams])
        warm = long_tail_workload(prompts, per_call, max_new_tokens, seed=10_000, short_share=0.0)
        ray.get([e.generate.remote(warm, list(range(per_call)), list(range(per_call))) for e in calls + streams])

        runs = []
        for r in range(repeats):
            s = seed + r
            work = long_tail_workload(prompts, groups, max_new_tokens, s, short_share, short_div)
            seeds = [s * 1_000_000 + k * group_size for k in range(groups)]
            order = ("call", "stream") if r % 2 == 0 else ("stream", "call")
            for kind in order:
                t0, got = (_drive_calls(calls, work, seeds, per_call) if kind == "call"
                           else _drive_stream(streams, sink, work, seeds, per_call))
                runs.append(_figures(kind, r, s, work, t0, got))
    finally:
        for a in actors[engines:2 * engines]:
            try:
                ray.get(a.shutdown.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - it is killed next anyway
                pass
        for a in actors:
            ray.kill(a)
        if started:
            ray.shutdown()

    import numpy as np

    summary = {k: {f: float(np.median([x[f] for x in runs if x["engine"] == k])) for f in FIGURES}
               for k in ("stream", "call")}
    summary["ratio"] = {f: summary["stream"][f] / summary["call"][f] for f in FIGURES}
    return {"settings": {"engines": engines, "groups_per_step": groups_per_step, "per_call": per_call,
                         "outstanding": per_call * engines, "group_size": group_size,
                         "max_new_tokens": max_new_tokens, "groups": groups, "repeats": repeats, "seed": seed,
                         "short_share": short_share, "short_cap": max(1, max_new_tokens // short_div)},
            "runs": runs, "summary": summary}


def print_long_tail(res: dict[str, Any]) -> None:
    st = res["settings"]
    print(f"rollout, long tail: {st['engines']} engine(s) of each kind, {st['groups']} groups x G={st['group_size']} "
          f"per repeat, {st['outstanding']} groups outstanding, max {st['max_new_tokens']} new tokens; "
          f"{st['short_share']:.0%} of groups capped at {st['short_cap']}, the rest at 7/8..1 of the max "
          f"(meta['max_new_tokens'], ignore_eos); tiny Qwen2")
    print(f"  call-at-a-time: calls of {st['per_call']} groups (groups_per_step {st['groups_per_step']} / "
          f"{st['engines']} engine(s)), next call as one returns; streaming: a new group as each is delivered")
    print(f"  {st['repeats']} repeats, workload seeds {[st['seed'] + r for r in range(st['repeats'])]}, "
          f"alternating which engine goes first")
    print(f"  {'repeat':>6} {'seed':>5} {'engine':<15} {'tokens/s':>9} {'groups/s':>9} {'p50 lat s':>9} "
          f"{'p95 lat s':>9} {'at cap':>7}")
    names = {"stream": "streaming", "call": "call-at-a-time"}
    for x in res["runs"]:
        print(f"  {x['repeat']:>6} {x['seed']:>5} {names[x['engine']]:<15} {x['tokens_per_s']:9.0f} "
              f"{x['groups_per_s']:9.2f} {x['latency_p50_s']:9.3f} {x['latency_p95_s']:9.3f} "
              f"{x['at_cap'] / x['responses']:7.0%}")
    sm = res["summary"]
    print("  median over repeats:")
    for k in ("stream", "call"):
        f = sm[k]
        print(f"    {names[k]:<15} {f['tokens_per_s']:9.0f} tokens/s {f['groups_per_s']:7.2f} groups/s  "
              f"latency p50 {f['latency_p50_s']:.3f} s  p95 {f['latency_p95_s']:.3f} s")
    r = sm["ratio"]
    print(f"    streaming / call-at-a-time: tokens/s {r['tokens_per_s']:.2f}x  groups/s {r['groups_per_s']:.2f}x  "
          f"latency p50 {r['latency_p50_s']:.2f}x  p95 {r['latency_p95_s']:.2f}x")
