"""The RVPO risk coefficient per training step (algo.k_risk_schedule). Pure: no torch, no framework.

The RVPO paper raised k linearly from 0.5 to 2.0 over training on rubric tasks: a fixed large k peaked early
and collapsed late, because a hard soft-min from the first step chases whichever criterion is worst before
the policy can meet the easy ones.
"""

from __future__ import annotations

import math

from rvpo_async.config import AlgoConfig


def k_risk_at(step: int, algo: AlgoConfig, run_steps: int | None = None) -> float:
    """k_risk for the optimizer step with index `step` (0 = the run's first step).

    constant: algo.k_risk. linear / cosine: from k_risk_start at step 0 to k_risk_end at step k_risk_steps
    and after (k_risk_steps None: run_steps - 1, the run's last step); cosine eases in and out.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if algo.k_risk_schedule == "constant":
        return float(algo.k_risk)
    span = algo.k_risk_steps
    if span is None:
        if run_steps is None:
            raise ValueError("algo.k_risk_steps is null: k_risk_at needs run_steps to end the schedule on the last step")
        span = run_steps - 1
    progress = 1.0 if span <= 0 else min(1.0, step / span)
    start, end = float(algo.k_risk_start), float(algo.k_risk_end)
    if algo.k_risk_schedule == "linear":
        return start + (end - start) * progress
    if algo.k_risk_schedule == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"algo.k_risk_schedule must be constant, linear or cosine, got {algo.k_risk_schedule!r}")
