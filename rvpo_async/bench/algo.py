"""`rvpo-async bench algo`: RVPO advantages in torch against the per-group float64 loop of rvpo_async.reference,
same process."""

from __future__ import annotations

import argparse
from typing import Sequence

import numpy as np

from rvpo_async.bench import best_of


def bench_algo(argv: Sequence[str]) -> int:
    import torch

    from rvpo_async import reference
    from rvpo_async.algo import advantages

    p = argparse.ArgumentParser(prog="rvpo-async bench algo")
    p.add_argument("--groups", type=int, default=1024)
    p.add_argument("--group-size", type=int, default=16)
    p.add_argument("--rewards", type=int, default=17)
    p.add_argument("--k-risk", type=float, default=1.0)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    r64 = rng.normal(size=(a.groups, a.group_size, a.rewards))
    w = np.ones(a.rewards)
    rt = torch.from_numpy(r64.astype(np.float32))

    def torch_fn() -> torch.Tensor:
        return advantages(rt, "rvpo", k_risk=a.k_risk)

    def loop_fn() -> np.ndarray:  # the float64 reference the unit tests check the math against
        return reference.advantages(r64, "rvpo", k_risk=a.k_risk, weights=w)

    ref = loop_fn()
    got = torch_fn().double().numpy()
    err = float(np.abs(ref - got).max())
    torch_fn()  # warm-up
    t_torch = best_of(torch_fn, a.repeat)
    t_loop = best_of(loop_fn, max(1, a.repeat // 2))
    print(f"RVPO advantages, B={a.groups} groups x G={a.group_size} x K={a.rewards} rewards, CPU, 1 thread")
    print(f"  torch (rvpo_async.algo.advantages): {t_torch * 1e3:9.2f} ms")
    print(f"  per-group Python/NumPy loop:        {t_loop * 1e3:9.2f} ms")
    print(f"  speed-up: {t_loop / t_torch:.1f}x   max |difference| vs float64 loop: {err:.2e}")
    return 0
