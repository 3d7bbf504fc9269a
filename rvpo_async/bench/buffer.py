"""`rvpo-async bench buffer`: the Arrow GroupBuffer against a plain list-of-dicts store, same process.

Both stores ingest the same synthetic groups (add_group, then one set_reward call per entry), are
pulled 64 groups at a time, and build the same learner tensors; the bench checks that the tensors agree
before it prints any figure.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Any, Sequence

import numpy as np

from rvpo_async.buffer import GroupBuffer, to_torch
from rvpo_async.types import STATUS_CODES, JudgeResult, Prompt, RolloutGroup, Sample


class DictStore:
    """The obvious store: one dict per sample, Python lists for rewards, tensors built row by row."""

    def __init__(self, k: int, max_staleness: int) -> None:
        self.k, self.max_staleness = k, max_staleness
        self.pending: dict[int, dict[str, Any]] = {}
        self.ready: list[dict[str, Any]] = []

    def add_group(self, g: RolloutGroup) -> None:
        rows = [{"group_id": g.group_id, "prompt_tokens": list(g.prompt.token_ids),
                 "response_tokens": list(s.token_ids), "logprobs": list(s.logprobs),
                 "rewards": [math.nan] * self.k, "status": [0] * self.k, "policy_version": g.policy_version}
                for s in g.samples]
        self.pending[g.group_id] = {"rows": rows, "remaining": len(rows) * self.k, "version": g.policy_version}

    def set_reward(self, gid: int, i: int, k: int, r: JudgeResult) -> None:
        entry = self.pending[gid]
        row = entry["rows"][i]
        if row["status"][k]:
            return
        ok = r.status == "ok" and math.isfinite(r.value)
        row["status"][k] = STATUS_CODES["ok" if ok else ("invalid" if r.status == "ok" else r.status)]
        if ok:
            row["rewards"][k] = r.value
        entry["remaining"] -= 1
        if entry["remaining"] == 0:
            self.ready.append(self.pending.pop(gid))

    def pull(self, n: int, version: int) -> list[dict[str, Any]]:
        self.ready = [e for e in self.ready if version - e["version"] <= self.max_staleness]
        taken, self.ready = self.ready[:n], self.ready[n:]
        return taken

    @staticmethod
    def to_torch(groups: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        import torch

        rows = [r for e in groups for r in e["rows"]]
        width = max(len(r["prompt_tokens"]) + len(r["response_tokens"]) for r in rows)
        ids, mask, lps = [], [], []
        for r in rows:
            p, t = r["prompt_tokens"], r["response_tokens"]
            pad = width - len(p) - len(t)
            ids.append(p + t + [pad_id] * pad)
            mask.append([False] * len(p) + [True] * len(t) + [False] * pad)
            lps.append([0.0] * len(p) + r["logprobs"] + [0.0] * pad)
        b, g = len(groups), len(groups[0]["rows"])
        return {"input_ids": torch.tensor(ids), "response_mask": torch.tensor(mask),
                "behaviour_logprobs": torch.tensor(lps, dtype=torch.float32),
                "rewards": torch.tensor([r["rewards"] for r in rows], dtype=torch.float32).reshape(b, g, -1),
                "reward_mask": torch.tensor([[s == STATUS_CODES["ok"] for s in r["status"]] for r in rows]
                                            ).reshape(b, g, -1),
                "policy_version": torch.tensor([r["policy_version"] for r in rows])}


def synthetic(n_groups: int, g: int, k: int, resp_len: int, seed: int) -> tuple[list[RolloutGroup], list[JudgeResult]]:
    """Groups with ~resp_len-token responses, and a pool of judge results (2% timeouts) reused cyclically."""
    rng = np.random.default_rng(seed)
    groups = []
    for gid in range(n_groups):
        prompt = Prompt(f"p{gid}", "x" * 80, tuple(rng.integers(0, 32000, 32).tolist()))
        samples = []
        for _ in range(g):
            n = int(rng.integers(resp_len // 2, resp_len * 3 // 2 + 1))
            samples.append(Sample(tuple(rng.integers(0, 32000, n).tolist()),
                                  tuple(rng.normal(-1.0, 0.5, n).tolist()), "stop", "y" * (4 * n)))
        groups.append(RolloutGroup(gid, prompt, tuple(samples), 0, "engine-0", time.time()))
    results = [JudgeResult(float(v), "ok", 0.01) for v in rng.random(4096)]
    results[::50] = [JudgeResult(math.nan, "timeout", 2.0)] * len(results[::50])
    return groups, results


def _ingest(store: Any, groups: list[RolloutGroup], results: list[JudgeResult], k: int) -> float:
    t0 = time.perf_counter()
    j, n_res = 0, len(results)
    for grp in groups:
        store.add_group(grp)
        gid = grp.group_id
        for i in range(len(grp.samples)):
            for kk in range(k):
                store.set_reward(gid, i, kk, results[j % n_res])
                j += 1
    return time.perf_counter() - t0


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs) * 1e3, q))


def bench_buffer(argv: Sequence[str]) -> int:
    import torch

    p = argparse.ArgumentParser(prog="rvpo-async bench buffer")
    p.add_argument("--rows", type=int, default=10_000)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--rewards", type=int, default=17)
    p.add_argument("--response-len", type=int, default=64)
    p.add_argument("--pull-groups", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4, help="ingest rounds; every round is pulled empty")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    g, k, n_groups = a.group_size, a.rewards, math.ceil(a.rows / a.group_size)
    names = [f"judge_{i}" for i in range(k)]
    groups, results = synthetic(n_groups, g, k, a.response_len, seed=0)
    fig: dict[str, list[float]] = {key: [] for key in ("ing_a", "ing_d", "pull_a", "pull_d", "tt_a", "tt_d")}
    for _ in range(a.rounds):
        arrow, plain = GroupBuffer(names, g, n_groups, 2), DictStore(k, 2)
        fig["ing_a"].append(_ingest(arrow, groups, results, k))
        fig["ing_d"].append(_ingest(plain, groups, results, k))
        for _ in range(n_groups // a.pull_groups):
            t0 = time.perf_counter()
            table = arrow.pull(a.pull_groups, 0)
            t1 = time.perf_counter()
            ta = to_torch(table, pad_id=0)
            t2 = time.perf_counter()
            rows = plain.pull(a.pull_groups, 0)
            t3 = time.perf_counter()
            td = DictStore.to_torch(rows, pad_id=0)
            t4 = time.perf_counter()
            for key, ref in td.items():
                if not torch.equal(ta[key].nan_to_num(-9.0), ref.nan_to_num(-9.0).to(ta[key].dtype)):
                    raise AssertionError(f"Arrow and list-of-dicts tensors differ in {key!r}")
            for key, dt in zip(("pull_a", "tt_a", "pull_d", "tt_d"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                fig[key].append(dt)
    rows_total = n_groups * g
    ing_a = rows_total / statistics.median(fig["ing_a"])
    ing_d = rows_total / statistics.median(fig["ing_d"])
    print(f"group buffer: {n_groups} groups x G={g} = {rows_total} rows, K={k} rewards, ~{a.response_len}-token "
          f"responses, {a.rounds} rounds, CPU, 1 thread")
    print(f"  ingest (add_group + {g * k} set_reward calls per group), median round:")
    print(f"    Arrow GroupBuffer:     {ing_a:10,.0f} rows/s  ({ing_a * k:,.0f} reward entries/s)")
    print(f"    list-of-dicts store:   {ing_d:10,.0f} rows/s")
    print(f"    ratio Arrow/dicts:     {ing_a / ing_d:.2f}x")
    n = len(fig["pull_a"])
    print(f"  {a.pull_groups}-group pulls ({a.pull_groups * g} rows), {n} pulls, ms median / p95:")
    for label, pk, tk in (("Arrow GroupBuffer", "pull_a", "tt_a"), ("list-of-dicts store", "pull_d", "tt_d")):
        both = [x + y for x, y in zip(fig[pk], fig[tk])]
        print(f"    {label:21s}  pull {_pct(fig[pk], 50):7.3f} / {_pct(fig[pk], 95):7.3f}   "
              f"to_torch {_pct(fig[tk], 50):7.3f} / {_pct(fig[tk], 95):7.3f}   "
              f"together {_pct(both, 50):7.3f} / {_pct(both, 95):7.3f}")
    sum_a = statistics.median(x + y for x, y in zip(fig["pull_a"], fig["tt_a"]))
    sum_d = statistics.median(x + y for x, y in zip(fig["pull_d"], fig["tt_d"]))
    print(f"    speed-up of pull + to_torch, dicts/Arrow: {sum_d / sum_a:.1f}x   (tensors checked equal)")
    return 0
