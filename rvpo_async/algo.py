"""RVPO math core: per-reward group normalisation, reward aggregation and the decoupled-PPO loss.

Pure torch. This module imports neither ray, vllm, deepspeed nor transformers and makes no
torch.distributed call (tests/unit/test_algo_purity.py proves it in a fresh interpreter).

How the advantage of response i in a group of G is built from its K rewards r_k(i):

1. Per-reward group normalisation (GDPO): Z_k(i) = (r_k(i) - mean_G r_k) / (std_G r_k + eps).
   std is the unbiased sample std (torch.std, as TRL's GRPO). A reward constant in a group gives 0.
   Masked entries (a judge that timed out or failed) are left out of the group statistics and get Z = 0.
2. Aggregation across rewards, one function per operator (AGGREGATORS):
   - gdpo:           sum_k w_k Z_k
   - rvpo:           -(1/k_risk) log sum_k w_k exp(-k_risk Z_k), w normalised to sum 1 (a LogSumExp
                     soft-min; = mean_w Z - (k_risk/2) var_w Z + O(k_risk^2))
   - rvpo_explicit:  mean_w Z - beta var_w Z
   - min:            min_k Z_k
   - gdpo_focus:     sum_k w_k f_k Z_k, policy-level risk sensitivity: f = K' softmax_k(-k_risk rbar_k)
                     over the K' rewards with a valid entry, rbar_k the batch mean of the RAW reward k
                     (detached). A reward the whole batch fails gets the largest weight; k_risk -> 0 gives gdpo
   - rvpo_focus:     rvpo with weights w_k f_k (the per-response soft-min on top of the policy-level focus)
   `mean` (GRPO) is not an aggregator of Z: it group-normalises the weighted sum of raw rewards.
   Weights w are [K] (one per reward), [B, K] (per prompt: a rubric task's own criteria, see
   algo_weights.rubric_weights) or [B, G, K]; a prompt's absent criteria are masked slots, never zeros.
3. Optional batch normalisation: A <- (A - mean_batch A) / (std_batch A + eps).

The policy loss is AReaL's decoupled PPO objective with a behaviour importance weight
w_t = pi_prox / mu, controlled by truncation (TIS), masking (IcePop/MIS) or nothing, and an optional
per-sample staleness decay lambda^s (this project's own option; off by default).
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch

from rvpo_async.algo_weights import rubric_weights  # noqa: F401  (re-exported: weights for advantages())

Aggregator = Literal["mean", "gdpo", "rvpo", "rvpo_explicit", "min", "gdpo_focus", "rvpo_focus"]
ISMode = Literal["truncate", "mask", "none"]
AGGREGATOR_NAMES: tuple[str, ...] = ("mean", "gdpo", "rvpo", "rvpo_explicit", "min", "gdpo_focus", "rvpo_focus")

DEFAULT_EPS = 1e-4


class RewardError(ValueError):
    """A reward tensor holds values that cannot be trained on (NaN, inf, wrong shape)."""


def check_rewards(rewards: torch.Tensor, names: Sequence[str] | None = None,
                  mask: torch.Tensor | None = None) -> None:
    """Raise RewardError naming every reward column that holds NaN or infinite values (unmasked)."""
    if rewards.dim() != 3:
        raise RewardError(f"rewards must have shape [B, G, K], got {tuple(rewards.shape)}")
    bad = ~torch.isfinite(rewards)
    if mask is not None:
        bad = bad & mask.to(torch.bool)
    if not bool(bad.any()):
        return
    per_col = bad.reshape(-1, rewards.shape[-1]).sum(0)  # [K]
    parts = []
    for k, n in enumerate(per_col.tolist()):
        if n:
            name = names[k] if names is not None else f"column {k}"
            parts.append(f"reward '{name}' (column {k}): {n} non-finite value(s)")
    raise RewardError("non-finite rewards: " + "; ".join(parts))


def _valid(rewards: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask.to(torch.bool)


def group_normalize(rewards: torch.Tensor, eps: float = DEFAULT_EPS,
                    mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, G, K] rewards -> [B, G, K] per-reward group z-scores; masked entries give 0."""
    check_rewards(rewards, mask=mask)
    valid = _valid(rewards, mask)
    vf = valid.to(rewards.dtype)
    r = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = vf.sum(dim=1, keepdim=True)  # [B, 1, K]
    mean = r.sum(dim=1, keepdim=True) / n.clamp_min(1)
    sq = ((r - mean) ** 2) * vf
    var = sq.sum(dim=1, keepdim=True) / (n - 1).clamp_min(1)  # unbiased, as torch.std
    z = (r - mean) / (var.sqrt() + eps)
    # a constant reward gives exactly 0: in float32 the rounded mean differs from the constant, and
    # (r - mean) / (tiny std + eps) is then far from 0 for large constants
    rmax = torch.where(valid, rewards, torch.full_like(rewards, -math.inf)).amax(dim=1, keepdim=True)
    rmin = torch.where(valid, rewards, torch.full_like(rewards, math.inf)).amin(dim=1, keepdim=True)
    # fewer than two valid members: no signal for this reward in this group
    z = torch.where((n >= 2) & (rmax > rmin) & valid, z, torch.zeros_like(z))
    return z


Weights = Sequence[float] | Sequence[Sequence[float]] | torch.Tensor | None


def _weights(z: torch.Tensor, weights: Weights, like: torch.Tensor) -> torch.Tensor:
    """Weights shaped to broadcast against z ([..., K]): [K] for every response, [B, K] per prompt
    (z [B, G, K]; returned as [B, 1, K]) or z's own shape per response."""
    k = z.shape[-1]
    if weights is None:
        return torch.ones(k, dtype=like.dtype, device=like.device)
    w = torch.as_tensor(weights, dtype=like.dtype, device=like.device)
    per_prompt = tuple(z.shape[:-2]) + (k,) if z.dim() >= 2 else None
    if w.dim() == 1:
        if w.shape != (k,):
            raise ValueError(f"weights must have one entry per reward ({k}), got shape {tuple(w.shape)}")
    elif tuple(w.shape) == per_prompt:
        w = w.unsqueeze(-2)  # [B, 1, K]: one row per prompt, shared by its group
    elif w.shape != z.shape:
        raise ValueError(f"weights must have one entry per reward: shape ({k},), {per_prompt} (per prompt) or "
                         f"{tuple(z.shape)} (per response), got shape {tuple(w.shape)}")
    if bool((w < 0).any()) or not bool(torch.isfinite(w).all()) or float(w.sum()) <= 0:
        shown = w.tolist() if w.numel() <= 32 else f"a {tuple(w.shape)} tensor"
        raise ValueError(f"weights must be finite, non-negative and not all zero, got {shown}")
    return w


def _masked_normalised_weights(w: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Per-response weights over valid rewards, summing to 1 ([..., K]); all-masked rows give zeros."""
    wm = w * valid.to(w.dtype)
    s = wm.sum(-1, keepdim=True)
    return torch.where(s > 0, wm / s.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(wm))


def agg_gdpo(z: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, **_: float) -> torch.Tensor:
    return (z * w * valid.to(z.dtype)).sum(-1)


def agg_rvpo(z: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, *, k_risk: float, **_: float) -> torch.Tensor:
    if not k_risk > 0:
        raise ValueError(f"k_risk must be > 0 for rvpo, got {k_risk}")
    wn = _masked_normalised_weights(w, valid)
    live = wn > 0  # [..., K]
    any_live = live.any(-1, keepdim=True)
    # log w = -inf for masked / zero-weight rewards: they drop out of the log-sum-exp. A response with no
    # reward of positive weight left gets 0; its row is given finite log-weights so that neither the
    # output (+inf) nor the gradient (NaN) of the unused log-sum-exp leaks out.
    logw = torch.where(live, wn.clamp_min(torch.finfo(z.dtype).tiny).log(), torch.full_like(wn, -math.inf))
    logw = torch.where(any_live, logw, torch.zeros_like(logw))
    lse = torch.logsumexp(-k_risk * z + logw, dim=-1)
    out = -lse / k_risk
    return torch.where(any_live.squeeze(-1), out, torch.zeros_like(out))


def agg_rvpo_explicit(z: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, *, beta: float, **_: float) -> torch.Tensor:
    wn = _masked_normalised_weights(w, valid)
    mean = (wn * z).sum(-1)
    var = (wn * (z - mean.unsqueeze(-1)) ** 2).sum(-1)
    return mean - beta * var


def agg_min(z: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, **_: float) -> torch.Tensor:
    big = torch.finfo(z.dtype).max
    keep = valid & (w > 0)
    out = torch.where(keep, z, torch.full_like(z, big)).min(-1).values
    return torch.where(keep.any(-1), out, torch.zeros_like(out))


# ---- policy-level focus (the remedy for rare-success constraints). The soft-min looks at each response's
# worst z-score, so a constraint that nearly every response fails (a rare success: many small negative Z,
# one large positive one) gets little credit; these weight each reward by how badly the batch does on it.

def focus_weights(rewards: torch.Tensor, valid: torch.Tensor, k_risk: float) -> torch.Tensor:
    """[..., K] raw rewards -> [K] detached weights K' softmax_k(-k_risk rbar_k) over the K' rewards with a
    valid entry (rbar_k: mean of reward k's valid entries over the batch); 0 for a reward with none."""
    if not k_risk >= 0:
        raise ValueError(f"k_risk must be >= 0 for the focus aggregators, got {k_risk}")
    with torch.no_grad():
        k = rewards.shape[-1]
        r = rewards.detach().reshape(-1, k)
        v = valid.reshape(-1, k)
        n = v.sum(0)  # [K]
        rbar = torch.where(v, r, torch.zeros_like(r)).sum(0) / n.clamp_min(1)
        live = n > 0
        logits = torch.where(live, -k_risk * rbar, torch.full_like(rbar, -math.inf))
        if not bool(live.any()):
            return torch.zeros_like(rbar)
        return torch.softmax(logits, dim=0) * live.sum()


def _needs_rewards(rewards: torch.Tensor | None, name: str) -> torch.Tensor:
    if rewards is None:
        raise ValueError(f"the {name} aggregator needs the raw rewards (aggregate(..., rewards=...))")
    return rewards


def agg_gdpo_focus(z: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, *, k_risk: float,
                   rewards: torch.Tensor | None = None, **_: float) -> torch.Tensor:
    f = focus_weights(_needs_rewards(rewards, "gdpo_focus"), valid, k_risk)  # [K]
    return agg_gdpo(z, w * f, valid)


def agg_rvpo_focus(z: torch.Tensor, w: torch.Tensor, valid: torch.Tensor, *, k_risk: float,
                   rewards: torch.Tensor | None = None, **_: float) -> torch.Tensor:
    f = focus_weights(_needs_rewards(rewards, "rvpo_focus"), valid, k_risk)  # [K]
    return agg_rvpo(z, w * f, valid, k_risk=k_risk)


AGGREGATORS = {
    "gdpo": agg_gdpo,
    "rvpo": agg_rvpo,
    "rvpo_explicit": agg_rvpo_explicit,
    "min": agg_min,
    "gdpo_focus": agg_gdpo_focus,
    "rvpo_focus": agg_rvpo_focus,
}


def aggregate(z: torch.Tensor, method: str, *, k_risk: float = 1.0, weights: Weights = None,
              beta: float = 0.5, mask: torch.Tensor | None = None, rewards: torch.Tensor | None = None
              ) -> torch.Tensor:
    """[..., K] normalised rewards -> [...] per-response score with the named operator.

    `weights`: [K], [B, K] (per prompt, z [B, G, K]) or z's shape (per response). rvpo and rvpo_explicit
    renormalise them over each response's valid rewards; gdpo sums w_k Z_k over them as given (Z = 0 where
    masked); min keeps the valid rewards of positive weight. `rewards` ([..., K], the raw rewards behind z)
    is needed by the focus aggregators only.
    """
    if method not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {method!r}; valid: {sorted(AGGREGATORS)}")
    w = _weights(z, weights, z)
    valid = _valid(z, mask)
    return AGGREGATORS[method](z, w, valid, k_risk=k_risk, beta=beta, rewards=rewards)


def batch_normalize(a: torch.Tensor, eps: float = DEFAULT_EPS) -> torch.Tensor:
    flat = a.reshape(-1)
    if flat.numel() < 2:
        return a - flat.mean()
    return (a - flat.mean()) / (flat.std() + eps)


def advantages(rewards: torch.Tensor, method: str, *, k_risk: float = 1.0, weights: Weights = None,
               beta: float = 0.5,
               batch_norm: bool = True, eps: float = DEFAULT_EPS,
               mask: torch.Tensor | None = None, z: torch.Tensor | None = None) -> torch.Tensor:
    """[B, G, K] rewards -> [B, G] sequence-level advantages. `z`: the rewards' group z-scores
    (`group_normalize(rewards, eps, mask)`) when the caller has them already (a step needs them twice).

    `mean` is GRPO (group-normalised weighted sum, never batch-normalised); the other methods
    group-normalise each reward, aggregate, then batch-normalise when `batch_norm`. `weights`: [K], [B, K]
    (per prompt, e.g. from `rubric_weights`) or [B, G, K], as in `aggregate`.
    """
    check_rewards(rewards, mask=mask)
    if method == "mean":
        w = _weights(rewards, weights, rewards)
        valid = _valid(rewards, mask)
        # a masked entry takes its reward's valid group mean, so it neither helps nor hurts
        vf = valid.to(rewards.dtype)
        r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
        gmean = r0.sum(1, keepdim=True) / vf.sum(1, keepdim=True).clamp_min(1)
        filled = torch.where(valid, rewards, gmean.expand_as(rewards))
        s = (filled * w).sum(-1, keepdim=True)  # [B, G, 1]
        return group_normalize(s, eps=eps).squeeze(-1)  # GRPO: no batch normalisation
    z = group_normalize(rewards, eps=eps, mask=mask) if z is None else z
    a = aggregate(z, method, k_risk=k_risk, weights=weights, beta=beta, mask=mask, rewards=rewards)
    return batch_normalize(a, eps) if batch_norm else a


def reward_diagnostics(rewards: torch.Tensor, eps: float = DEFAULT_EPS,
                       mask: torch.Tensor | None = None, met_at: float = 0.5,
                       z: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-step statistics of ALGORITHM.md section 4 ([B, G, K] in).

    mean/std per reward (over valid entries), inter-reward variance var_k(Z) averaged over responses,
    the bottleneck share: fraction of responses whose lowest Z is reward k (a tie splits the
    response equally among the tied rewards, so a group where every reward is constant favours none),
    and worst_mean: each response's lowest valid raw reward, averaged over responses (the constraint-
    neglect measure: 1 only when every response meets every reward; meaningful when judges share a range),
    and all_met_share: the share of those responses whose every valid raw reward is met (>= `met_at`).
    `z`: the group z-scores when the caller has them already, as in `advantages`.
    """
    valid = _valid(rewards, mask)
    vf = valid.to(rewards.dtype)
    r0 = torch.where(valid, rewards, torch.zeros_like(rewards))
    n = vf.sum((0, 1)).clamp_min(1)
    mean = r0.sum((0, 1)) / n
    std = (((r0 - mean) ** 2 * vf).sum((0, 1)) / n).sqrt()
    z = group_normalize(rewards, eps=eps, mask=mask) if z is None else z
    # inter-reward variance and bottleneck over the valid rewards of each response only: a masked
    # entry's Z = 0 is a placeholder, not a score; responses with no valid reward are left out
    nk = vf.sum(-1)  # [B, G]
    has = nk > 0
    zm = (z * vf).sum(-1) / nk.clamp_min(1)
    var_k = (((z - zm.unsqueeze(-1)) ** 2) * vf).sum(-1) / nk.clamp_min(1)
    inter = var_k[has].mean() if bool(has.any()) else torch.zeros((), dtype=rewards.dtype)
    zv = torch.where(valid, z, torch.full_like(z, math.inf))
    is_min = (zv == zv.min(-1, keepdim=True).values) & valid  # [B, G, K]
    frac = is_min.to(rewards.dtype) / is_min.sum(-1, keepdim=True).clamp_min(1)
    share = frac[has].sum(0) / max(int(has.sum()), 1)
    worst = torch.where(valid, rewards, torch.full_like(rewards, math.inf)).amin(-1)  # [B, G]
    worst_mean = worst[has].mean() if bool(has.any()) else torch.zeros((), dtype=rewards.dtype)
    all_met = (worst[has] >= met_at).to(rewards.dtype).mean() if bool(has.any()) else torch.zeros((), dtype=rewards.dtype)
    return {"mean": mean, "std": std, "inter_variance": inter, "bottleneck_share": share, "worst_mean": worst_mean,
            "all_met_share": all_met}


def policy_loss(
    logprobs: torch.Tensor,
    proximal_logprobs: torch.Tensor,
    behaviour_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.28,
    is_mode: str = "truncate",
    is_cap: float = 2.0,
    is_low: float = 0.5,
    is_high: float = 5.0,
    is_level: Literal["token", "sequence"] = "token",
    staleness: torch.Tensor | None = None,
    staleness_decay: float = 1.0,
    clip: bool = True,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean decoupled-PPO loss.

    Shapes: logprobs, proximal_logprobs, behaviour_logprobs, loss_mask, ref_logprobs: [N, L]; advantages: [N];
    staleness: [N] (policy versions behind the learner), optional.

    loss_t = -w_t * min(u_t A, clip(u_t, 1 - eps_low, 1 + eps_high) A), u_t = pi_theta / pi_prox,
    w_t = pi_prox / mu (detached), controlled by `is_mode`, times staleness_decay ** s.
    With kl_coef > 0 each token adds kl_coef * k3, k3 = exp(ref - logp) - (ref - logp) - 1 (the k3 estimate of
    KL(pi_theta || pi_ref), unbiased under samples of pi_theta and >= 0), in the same token mean; kl_coef = 0
    computes nothing and ignores ref_logprobs.
    """
    if is_mode not in ("truncate", "mask", "none"):
        raise ValueError(f"is_mode must be one of truncate, mask, none; got {is_mode!r}")
    if not 0 < staleness_decay <= 1:
        raise ValueError(f"staleness_decay must be in (0, 1], got {staleness_decay}")
    if not kl_coef >= 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs, the reference model's log-probs of the same tokens")
    m = loss_mask.to(logprobs.dtype)
    mb = m > 0  # [N, L]
    n_tok = m.sum().clamp_min(1)
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(-1)  # [N, 1]
    # padding may hold anything (-inf, NaN); zero it before use so that neither the loss nor the
    # gradient reaching `logprobs` can pick up a NaN from a position the mask excludes
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    logprobs = torch.where(mb, logprobs, zero)
    prox = torch.where(mb, proximal_logprobs.detach(), zero)
    behaviour = torch.where(mb, behaviour_logprobs.detach(), zero)
    log_w = (prox - behaviour).clamp(max=50.0)
    w_raw = log_w.exp()  # [N, L]
    keep = torch.ones_like(m, dtype=torch.bool)
    if is_mode == "truncate":
        w = w_raw.clamp(max=is_cap)
        changed = (w_raw > is_cap) & (m > 0)
    elif is_mode == "mask":
        out = (w_raw < is_low) | (w_raw > is_high)
        if is_level == "sequence":
            out = ((out & (m > 0)).any(-1, keepdim=True)).expand_as(out)
        keep = ~out
        w = torch.where(keep, w_raw, torch.zeros_like(w_raw))
        changed = out & (m > 0)
    else:
        w = w_raw
        changed = torch.zeros_like(keep)
    if staleness is not None and staleness_decay < 1:
        w = w * (staleness_decay ** staleness.to(logprobs.dtype)).unsqueeze(-1)

    ratio = (logprobs - prox).exp()
    surr1 = ratio * adv
    if clip:
        surr2 = ratio.clamp(1 - clip_eps_low, 1 + clip_eps_high) * adv
        surr = torch.minimum(surr1, surr2)
    else:
        surr = surr1
    loss = -(w * surr * m).sum() / n_tok
    kl_ref = None
    if kl_coef > 0:
        assert ref_logprobs is not None
        d = torch.where(mb, ref_logprobs.detach().to(logprobs.dtype), zero) - logprobs  # [N, L], 0 on padding
        kl_ref = ((d.exp() - d - 1) * m).sum() / n_tok
        loss = loss + kl_coef * kl_ref

    with torch.no_grad():
        clipped = (surr2 < surr1) if clip else torch.zeros_like(keep)
        neg_log = behaviour - logprobs.detach()
        kl_k3 = neg_log.exp() - neg_log - 1  # k3 estimate of KL(pi_theta || mu)
        wr = w_raw[mb]
        stats = {
            "loss": float(loss.detach()),
            "is_weight_mean": float(wr.mean()) if wr.numel() else 1.0,
            "is_weight_max": float(wr.max()) if wr.numel() else 1.0,
            "is_truncated_frac": float(changed[mb].float().mean()) if is_mode == "truncate" and wr.numel() else 0.0,
            "is_masked_frac": float(changed[mb].float().mean()) if is_mode == "mask" and wr.numel() else 0.0,
            "clip_frac": float(clipped[mb].float().mean()) if wr.numel() else 0.0,
            "kl_behaviour": float((kl_k3 * m).sum() / n_tok),
            "tokens": float(m.sum()),
        }
        if kl_ref is not None:
            stats["kl_ref"] = float(kl_ref.detach())
    return loss, stats
