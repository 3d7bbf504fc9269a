"""Per-prompt weights of rubric criteria for rvpo_async.algo.advantages. Pure torch.

A rubric task gives each prompt its own M <= K_max criteria in K_max reward slots; the slots a prompt lacks are
masked. The RVPO paper weighs a prompt's criteria uniformly (1/M); HealthBench scores by points, a negative
value marking a pitfall whose magnitude is its importance.
"""

from __future__ import annotations

from typing import Literal

import torch


def rubric_weights(points: torch.Tensor, mask: torch.Tensor,
                   mode: Literal["uniform", "points"] = "uniform") -> torch.Tensor:
    """[B, K] per-prompt criterion weights summing to 1 over each prompt's present criteria.

    `points`: [B, K] points or weights of each prompt's criteria (a negative value marks a pitfall; its
    magnitude is its importance). `mask`: [B, K] (or [B, G, K], reduced to the slots any response of the
    group has) True where the prompt has a criterion. `uniform` gives 1/M to each of the M present
    criteria (the RVPO paper's formula); `points` gives |points| / sum |points| (HealthBench scoring).
    Absent slots get 0, and a prompt without present criteria a row of zeros.
    """
    if mode not in ("uniform", "points"):
        raise ValueError(f"rubric weight mode must be 'uniform' or 'points', got {mode!r}")
    m = mask.to(torch.bool)
    if m.dim() == 3:
        m = m.any(1)  # [B, K]
    if points.dim() != 2 or m.shape != points.shape:
        raise ValueError(f"points must be [B, K] and mask [B, K] or [B, G, K] over the same slots, got "
                         f"{tuple(points.shape)} and {tuple(mask.shape)}")
    dtype = points.dtype if points.is_floating_point() else torch.float64
    if mode == "uniform":
        mag = m.to(dtype)
    else:
        p = points.to(dtype)
        bad = m & ~torch.isfinite(p)
        if bool(bad.any()):
            b, j = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"points of prompt row {b}, criterion slot {j} is {float(p[b, j])}: not a finite number")
        mag = torch.where(m, p.abs(), torch.zeros_like(p))
        dead = m.any(-1) & (mag.sum(-1) <= 0)
        if bool(dead.any()):
            b = int(dead.nonzero()[0])
            raise ValueError(f"points of prompt row {b} are all zero over its present criteria: no weight to give")
    total = mag.sum(-1, keepdim=True)
    return torch.where(total > 0, mag / total.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(mag))
