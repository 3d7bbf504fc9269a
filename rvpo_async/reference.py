"""Plain float64 NumPy/SciPy references for the math of rvpo_async.algo (ALGORITHM.md sections 1-4): what the
unit tests check rvpo_async.algo against (tests/unit/reference.py re-exports it) and the baseline of
`rvpo-async bench algo`. NumPy only at import; SciPy (the `test` extra) is imported where logsumexp is used.

Weights are [K] (every response), [B, K] (per prompt) or [B, G, K] (per response).

Written for clarity, not speed: explicit loops over groups, rewards and responses. Masks are boolean
arrays of the rewards' shape; True marks an entry that counts.

Masked entries: left out of every statistic and given Z = 0; aggregators use the valid rewards of each
response only (weights renormalised over them), and `min`/`rvpo` also skip rewards of weight 0.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-4


def _as_mask(rewards: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return np.ones(rewards.shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


def _weights(k: int, weights) -> np.ndarray:
    return np.ones(k) if weights is None else np.asarray(weights, dtype=np.float64)


def _response_weights(shape: tuple[int, ...], weights) -> np.ndarray:
    """Weights of every response, [..., K] of `shape`: [K] for all, [B, K] per prompt, or one row per response."""
    w = _weights(shape[-1], weights)
    if w.ndim > 1 and w.shape != shape:  # [B, K] per prompt: each member of group b takes row b
        w = w[..., None, :]
    return np.broadcast_to(w, shape)


def rubric_weights(points: np.ndarray, present: np.ndarray, mode: str) -> np.ndarray:
    """[B, K]: per prompt, 1/M (uniform) or |points| / sum |points| over its M present criteria; 0 elsewhere."""
    points = np.asarray(points, dtype=np.float64)
    present = np.asarray(present, dtype=bool)
    if present.ndim == 3:
        present = present.any(axis=1)
    out = np.zeros(points.shape)
    for b in range(points.shape[0]):
        idx = [j for j in range(points.shape[1]) if present[b, j]]
        if not idx:
            continue
        mags = [1.0 if mode == "uniform" else abs(points[b, j]) for j in idx]
        for j, m in zip(idx, mags):
            out[b, j] = m / sum(mags)
    return out


def group_normalize(rewards: np.ndarray, eps: float = EPS, mask: np.ndarray | None = None) -> np.ndarray:
    """[B, G, K] -> [B, G, K]: (r - mean) / (unbiased std + eps) over each group's valid members."""
    r = np.asarray(rewards, dtype=np.float64)
    valid = _as_mask(r, mask)
    b, g, k = r.shape
    z = np.zeros((b, g, k))
    for i in range(b):
        for j in range(k):
            idx = [n for n in range(g) if valid[i, n, j]]
            if len(idx) < 2:
                continue
            col = r[i, idx, j]
            if np.all(col == col[0]):  # a constant reward carries no signal
                continue
            z[i, idx, j] = (col - col.mean()) / (col.std(ddof=1) + eps)
    return z


def agg_gdpo(z: np.ndarray, w: np.ndarray, valid: np.ndarray) -> float:
    return float(sum(w[j] * z[j] for j in range(len(z)) if valid[j]))


def agg_rvpo(z: np.ndarray, w: np.ndarray, valid: np.ndarray, k_risk: float) -> float:
    from scipy.special import logsumexp

    live = [j for j in range(len(z)) if valid[j] and w[j] > 0]
    if not live:
        return 0.0
    wn = w[live] / w[live].sum()
    return float(-logsumexp(-k_risk * z[live], b=wn) / k_risk)


def agg_rvpo_explicit(z: np.ndarray, w: np.ndarray, valid: np.ndarray, beta: float) -> float:
    idx = [j for j in range(len(z)) if valid[j]]
    if not idx or w[idx].sum() <= 0:
        return 0.0
    wn = w[idx] / w[idx].sum()
    mean = float(np.dot(wn, z[idx]))
    var = float(np.dot(wn, (z[idx] - mean) ** 2))
    return mean - beta * var


def agg_min(z: np.ndarray, w: np.ndarray, valid: np.ndarray) -> float:
    live = [j for j in range(len(z)) if valid[j] and w[j] > 0]
    return float(min(z[j] for j in live)) if live else 0.0


def focus_weights(rewards: np.ndarray, valid: np.ndarray, k_risk: float) -> np.ndarray:
    """f_k = K' exp(-k rbar_k) / sum_j exp(-k rbar_j) over the K' rewards with a valid entry anywhere in the
    batch (rbar_k: the mean of reward k's valid raw entries); 0 for a reward with none."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1, rewards.shape[-1])
    v = np.asarray(valid, dtype=bool).reshape(r.shape)
    live = [j for j in range(r.shape[1]) if v[:, j].any()]
    f = np.zeros(r.shape[1])
    if live:
        rbar = np.array([r[v[:, j], j].mean() for j in live])
        e = np.exp(-k_risk * (rbar - rbar.min()))
        f[live] = len(live) * e / e.sum()
    return f


def aggregate(z: np.ndarray, method: str, *, k_risk: float = 1.0, weights=None, beta: float = 0.5,
              mask: np.ndarray | None = None, rewards: np.ndarray | None = None) -> np.ndarray:
    """[..., K] -> [...], one response at a time. The focus methods need the raw `rewards`."""
    z = np.asarray(z, dtype=np.float64)
    valid = _as_mask(z, mask)
    flat_w = _response_weights(z.shape, weights).reshape(-1, z.shape[-1])
    if method in ("gdpo_focus", "rvpo_focus"):
        flat_w = flat_w * focus_weights(rewards, valid, k_risk)
        method = method.removesuffix("_focus")
    flat_z = z.reshape(-1, z.shape[-1])
    flat_v = valid.reshape(-1, z.shape[-1])
    out = np.empty(flat_z.shape[0])
    for n in range(flat_z.shape[0]):
        zn, vn, w = flat_z[n], flat_v[n], flat_w[n]
        if method == "gdpo":
            out[n] = agg_gdpo(zn, w, vn)
        elif method == "rvpo":
            out[n] = agg_rvpo(zn, w, vn, k_risk)
        elif method == "rvpo_explicit":
            out[n] = agg_rvpo_explicit(zn, w, vn, beta)
        elif method == "min":
            out[n] = agg_min(zn, w, vn)
        else:
            raise ValueError(method)
    return out.reshape(z.shape[:-1])


def batch_normalize(a: np.ndarray, eps: float = EPS) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    flat = a.reshape(-1)
    if flat.size < 2:
        return a - flat.mean()
    return (a - flat.mean()) / (flat.std(ddof=1) + eps)


def grpo_mean(rewards: np.ndarray, weights=None, eps: float = EPS, mask: np.ndarray | None = None) -> np.ndarray:
    """GRPO: group-normalise s = sum_k w_k r_k; a masked entry takes its reward's valid group mean."""
    r = np.asarray(rewards, dtype=np.float64)
    valid = _as_mask(r, mask)
    w = _response_weights(r.shape, weights)
    b, g, k = r.shape
    s = np.zeros((b, g, 1))
    for i in range(b):
        filled = np.zeros((g, k))
        for j in range(k):
            idx = [n for n in range(g) if valid[i, n, j]]
            fill = r[i, idx, j].mean() if idx else 0.0
            for n in range(g):
                filled[n, j] = r[i, n, j] if valid[i, n, j] else fill
        for n in range(g):
            s[i, n, 0] = filled[n] @ w[i, n]
    return group_normalize(s, eps=eps)[..., 0]


def advantages(rewards: np.ndarray, method: str, *, k_risk: float = 1.0, weights=None, beta: float = 0.5,
               batch_norm: bool = True, eps: float = EPS, mask: np.ndarray | None = None) -> np.ndarray:
    if method == "mean":
        return grpo_mean(rewards, weights=weights, eps=eps, mask=mask)
    z = group_normalize(rewards, eps=eps, mask=mask)
    a = aggregate(z, method, k_risk=k_risk, weights=weights, beta=beta, mask=mask, rewards=rewards)
    return batch_normalize(a, eps) if batch_norm else a


def weighted_moments(z: np.ndarray, weights=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per response ([..., K] in): weighted mean, variance and third central moment, w normalised."""
    z = np.asarray(z, dtype=np.float64)
    w = _weights(z.shape[-1], weights)
    wn = w / w.sum()
    mean = (z * wn).sum(-1)
    d = z - mean[..., None]
    return mean, (wn * d**2).sum(-1), (wn * d**3).sum(-1)


def reward_diagnostics(rewards: np.ndarray, eps: float = EPS, mask: np.ndarray | None = None,
                       met_at: float = 0.5) -> dict:
    """Per reward: mean and (population) std of the raw valid rewards over the batch; inter-reward
    variance of Z over each response's valid rewards, averaged over responses with one or more; the
    share of those responses whose lowest valid Z is reward k (ties split equally); the mean over those
    responses of their lowest valid raw reward; the share of those responses whose every valid raw
    reward is >= met_at."""
    r = np.asarray(rewards, dtype=np.float64)
    valid = _as_mask(r, mask)
    k = r.shape[-1]
    mean, std = np.zeros(k), np.zeros(k)
    for j in range(k):
        vals = r[..., j][valid[..., j]]
        if vals.size:
            mean[j], std[j] = vals.mean(), vals.std(ddof=0)
    z = group_normalize(r, eps=eps, mask=mask)
    variances, lowest, worst = [], [], []
    for zn, rn, vn in zip(z.reshape(-1, k), r.reshape(-1, k), valid.reshape(-1, k)):
        idx = [j for j in range(k) if vn[j]]
        if not idx:
            continue
        worst.append(min(rn[j] for j in idx))
        variances.append(np.var(zn[idx]))
        zmin = min(zn[j] for j in idx)
        tied = [j for j in idx if zn[j] == zmin]
        lowest.append(tied)
    share = np.zeros(k)
    for tied in lowest:
        for j in tied:
            share[j] += 1.0 / len(tied)
    share /= max(len(lowest), 1)
    inter = float(np.mean(variances)) if variances else 0.0
    worst_mean = float(np.mean(worst)) if worst else 0.0
    met = [all(rn[j] >= met_at for j in range(k) if vn[j])
           for rn, vn in zip(r.reshape(-1, k), valid.reshape(-1, k)) if vn.any()]
    all_met = float(np.mean(met)) if met else 0.0
    return {"mean": mean, "std": std, "inter_variance": inter, "bottleneck_share": share, "worst_mean": worst_mean,
            "all_met_share": all_met}


def policy_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, loss_mask, *,
                clip_eps_low: float = 0.2, clip_eps_high: float = 0.28, is_mode: str = "truncate",
                is_cap: float = 2.0, is_low: float = 0.5, is_high: float = 5.0, is_level: str = "token",
                staleness=None, staleness_decay: float = 1.0, clip: bool = True, ref_logprobs=None,
                kl_coef: float = 0.0) -> tuple[float, np.ndarray, dict]:
    """Token-mean decoupled PPO loss, token by token.

    Returns (loss, d loss / d logprobs, stats). Per valid token t of sequence i:
      u = exp(logp - prox), w = exp(prox - mu) controlled by is_mode, times staleness_decay ** s_i,
      loss_t = -w * min(u A_i, clip(u, 1 - eps_low, 1 + eps_high) A_i)
               + kl_coef * (exp(ref - logp) - (ref - logp) - 1)   (when kl_coef > 0);
    the loss is their mean. d/dlogp of the KL term: kl_coef * (1 - exp(ref - logp)).
    """
    ref_lp = None if ref_logprobs is None else np.asarray(ref_logprobs, dtype=np.float64)
    lp = np.asarray(logprobs, dtype=np.float64)
    prox = np.asarray(proximal_logprobs, dtype=np.float64)
    mu = np.asarray(behaviour_logprobs, dtype=np.float64)
    adv = np.asarray(advantages, dtype=np.float64)
    valid = np.asarray(loss_mask) > 0
    n_seq, length = lp.shape
    n_tok = int(valid.sum())
    denom = max(n_tok, 1)

    w_raw = np.ones_like(lp)
    for i in range(n_seq):
        for t in range(length):
            if valid[i, t]:
                w_raw[i, t] = np.exp(min(prox[i, t] - mu[i, t], 50.0))

    def outside(x: float) -> bool:
        return x < is_low or x > is_high

    seq_out = [any(valid[i, t] and outside(w_raw[i, t]) for t in range(length)) for i in range(n_seq)]
    loss, grad = 0.0, np.zeros_like(lp)
    n_trunc = n_masked = n_clipped = 0
    kl = kl_ref = 0.0
    for i in range(n_seq):
        decay = staleness_decay ** float(staleness[i]) if staleness is not None else 1.0
        for t in range(length):
            if not valid[i, t]:
                continue
            w = w_raw[i, t]
            if is_mode == "truncate":
                if w > is_cap:
                    n_trunc += 1
                    w = is_cap
            elif is_mode == "mask":
                dropped = seq_out[i] if is_level == "sequence" else outside(w)
                if dropped:
                    n_masked += 1
                    w = 0.0
            w *= decay
            u = np.exp(lp[i, t] - prox[i, t])
            a = adv[i]
            unclipped = u * a
            clipped = min(max(u, 1 - clip_eps_low), 1 + clip_eps_high) * a
            if clip and clipped < unclipped:
                n_clipped += 1
                surr, d_surr = clipped, 0.0  # the clipped branch is flat in logp
            else:
                surr, d_surr = unclipped, u * a
            loss += -w * surr
            grad[i, t] = -w * d_surr / denom
            x = mu[i, t] - lp[i, t]
            kl += np.exp(x) - x - 1
            if kl_coef > 0:
                d = ref_lp[i, t] - lp[i, t]
                k3 = np.exp(d) - d - 1
                kl_ref += k3
                loss += kl_coef * k3
                grad[i, t] += kl_coef * (1 - np.exp(d)) / denom
    frac = (lambda c: c / n_tok) if n_tok else (lambda c: 0.0)
    wv = w_raw[valid]
    stats = {
        "loss": loss / denom,
        "is_weight_mean": float(wv.mean()) if n_tok else 1.0,
        "is_weight_max": float(wv.max()) if n_tok else 1.0,
        "is_truncated_frac": frac(n_trunc),
        "is_masked_frac": frac(n_masked),
        "clip_frac": frac(n_clipped),
        "kl_behaviour": kl / denom,
        "tokens": float(n_tok),
    }
    if kl_coef > 0:
        stats["kl_ref"] = kl_ref / denom
    return loss / denom, grad, stats
