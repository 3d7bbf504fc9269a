"""rvpo_async.algo.policy_loss (decoupled PPO with behaviour importance weights) against the float64
NumPy reference (rvpo_async/reference.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rvpo_async import algo

try:
    from . import reference as ref
    from .algo_cases import DTYPES, TOL, _rng, close, t
except ImportError:
    import reference as ref
    from algo_cases import DTYPES, TOL, _rng, close, t


# ---------------------------------------------------------------- policy loss

def _loss_inputs(rng: np.random.Generator, n: int = 6, length: int = 9, spread: float = 0.6):
    logp = -rng.exponential(1.0, size=(n, length))
    prox = logp + rng.normal(scale=0.2, size=(n, length))
    beh = prox + rng.normal(scale=spread, size=(n, length))
    adv = rng.normal(size=n)
    lengths = rng.integers(1, length + 1, size=n)
    mask = (np.arange(length)[None, :] < lengths[:, None]).astype(float)
    return logp, prox, beh, adv, mask


def _run_loss(logp, prox, beh, adv, mask, dtype=torch.float64, **kw):
    lp = t(logp, dtype).requires_grad_(True)
    loss, stats = algo.policy_loss(lp, t(prox, dtype), t(beh, dtype), t(adv, dtype), t(mask, dtype), **kw)
    loss.backward()
    return loss, lp.grad, stats


LOSS_CASES = [
    dict(is_mode="truncate"),
    dict(is_mode="truncate", is_cap=1.2, clip=False),
    dict(is_mode="mask", is_level="token", is_low=0.7, is_high=1.5),
    dict(is_mode="mask", is_level="sequence", is_low=0.5, is_high=2.0),
    dict(is_mode="none"),
    dict(is_mode="truncate", staleness_decay=0.8),
    dict(is_mode="mask", clip_eps_low=0.1, clip_eps_high=0.1, staleness_decay=0.5),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", range(len(LOSS_CASES)))
def test_policy_loss_matches_reference(dtype, case):
    kw = LOSS_CASES[case]
    rng = _rng("loss", case)
    logp, prox, beh, adv, mask = _loss_inputs(rng)
    stale = rng.integers(0, 4, size=logp.shape[0])
    loss, grad, stats = _run_loss(logp, prox, beh, adv, mask, dtype, staleness=t(stale, dtype), **kw)
    want, want_grad, want_stats = ref.policy_loss(logp, prox, beh, adv, mask, staleness=stale, **kw)
    tol = TOL[dtype]
    assert float(loss.detach()) == pytest.approx(want, rel=tol["rtol"], abs=tol["atol"])
    close(grad, want_grad, dtype)
    for key, value in want_stats.items():
        if key.endswith("_frac"):  # token fractions, logged at float32 precision; 1 token is >= 1/54
            assert stats[key] == pytest.approx(value, abs=1e-6), key
        else:
            assert stats[key] == pytest.approx(value, rel=tol["rtol"], abs=tol["atol"]), key


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clip", [False, True])
def test_policy_loss_on_policy_equals_plain_policy_gradient(dtype, clip):
    logp, _, _, adv, mask = _loss_inputs(_rng("onpolicy"))
    lp = t(logp, dtype).requires_grad_(True)
    loss, stats = algo.policy_loss(lp, lp.detach(), lp.detach(), t(adv, dtype), t(mask, dtype), clip=clip)
    loss.backward()
    pg_lp = t(logp, dtype).requires_grad_(True)
    m, a = t(mask, dtype), t(adv, dtype)[:, None]
    pg = -(a * pg_lp * m).sum() / m.sum()
    pg.backward()
    torch.testing.assert_close(lp.grad, pg_lp.grad, **TOL[dtype])
    # every ratio and weight is 1, so the value is -mean_tokens(A)
    torch.testing.assert_close(loss.detach(), -(a * m).sum() / m.sum(), **TOL[dtype])
    assert stats["is_truncated_frac"] == 0 and stats["clip_frac"] == 0


def test_policy_loss_truncation_caps_weight_and_reports_fraction():
    rng = _rng("trunc")
    logp, _, beh, adv, mask = _loss_inputs(rng, spread=1.0)
    prox = logp.copy()  # ratio u = 1: the token gradient is -w * A / n_tokens
    cap = 1.5
    _, grad, stats = _run_loss(logp, prox, beh, adv, mask, is_mode="truncate", is_cap=cap, clip=False)
    w_raw = np.exp(prox - beh)
    want = -np.minimum(w_raw, cap) * adv[:, None] * mask / mask.sum()
    np.testing.assert_allclose(grad.numpy(), want, rtol=1e-12, atol=1e-15)
    n_over = int(((w_raw > cap) & (mask > 0)).sum())
    assert 0 < n_over < mask.sum()
    assert stats["is_truncated_frac"] == pytest.approx(n_over / mask.sum())
    assert stats["is_masked_frac"] == 0


def test_policy_loss_token_masking_zeroes_tokens_outside_bounds():
    rng = _rng("mask-token")
    logp, _, beh, adv, mask = _loss_inputs(rng, spread=1.0)
    prox = logp.copy()
    lo, hi = 0.6, 1.8
    _, grad, stats = _run_loss(logp, prox, beh, adv, mask, is_mode="mask", is_low=lo, is_high=hi, clip=False)
    w_raw = np.exp(prox - beh)
    out = ((w_raw < lo) | (w_raw > hi)) & (mask > 0)
    inside = ~((w_raw < lo) | (w_raw > hi)) & (mask > 0)
    assert out.any() and inside.any()
    assert np.all(grad.numpy()[out] == 0)
    np.testing.assert_allclose(grad.numpy()[inside], (-w_raw * adv[:, None] / mask.sum())[inside], rtol=1e-12)
    assert stats["is_masked_frac"] == pytest.approx(out.sum() / mask.sum())
    assert stats["is_truncated_frac"] == 0


def test_policy_loss_sequence_masking_drops_whole_sequences():
    logp = np.full((3, 4), -1.0)
    prox = logp.copy()
    beh = prox.copy()
    beh[0, 2] = prox[0, 2] + 3.0  # w = e^-3 < lo: sequence 0 is dropped
    beh[2, 3] = prox[2, 3] - 3.0  # w = e^3 > hi, but on padding: sequence 2 stays
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 1, 0]], dtype=float)
    adv = np.array([1.0, -2.0, 0.5])
    _, grad, stats = _run_loss(logp, prox, beh, adv, mask, is_mode="mask", is_level="sequence",
                               is_low=0.5, is_high=5.0, clip=False)
    g = grad.numpy()
    assert np.all(g[0] == 0)
    assert np.all(g[1, :3] != 0) and np.all(g[2, :3] != 0)
    assert stats["is_masked_frac"] == pytest.approx(4 / 10)


def test_policy_loss_staleness_decay_scales_each_sequence_by_lambda_to_the_s():
    rng = _rng("decay")
    logp, prox, beh, adv, mask = _loss_inputs(rng)
    stale = np.array([0, 1, 2, 3, 0, 5])
    lam = 0.7
    _, g_plain, _ = _run_loss(logp, prox, beh, adv, mask, staleness=t(stale, torch.float64))
    _, g_decay, _ = _run_loss(logp, prox, beh, adv, mask, staleness=t(stale, torch.float64), staleness_decay=lam)
    np.testing.assert_allclose(g_decay.numpy(), g_plain.numpy() * lam ** stale[:, None], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("fill", [7.5, -1e4, math.nan, -math.inf])
def test_policy_loss_ignores_padding(fill):
    rng = _rng("pad")
    logp, prox, beh, adv, mask = _loss_inputs(rng)
    pad = mask == 0
    assert pad.any()
    base_loss, base_grad, base_stats = _run_loss(logp, prox, beh, adv, mask)
    junk = [x.copy() for x in (logp, prox, beh)]
    for x in junk:
        x[pad] = fill
    loss, grad, stats = _run_loss(*junk, adv, mask)
    assert float(loss.detach()) == float(base_loss.detach())
    assert torch.equal(grad, base_grad)
    assert np.all(grad.numpy()[pad] == 0)
    assert stats == base_stats
    assert stats["tokens"] == mask.sum()


def test_policy_loss_clip_frac_counts_clipped_tokens():
    el, eh = 0.2, 0.28
    # (ratio, advantage) per token: the PPO min takes the clipped branch exactly when
    # A > 0 and u > 1 + eh, or A < 0 and u < 1 - el
    tokens = [(1.5, 1.0, True), (0.5, -1.0, True), (1.5, -1.0, False), (0.5, 1.0, False),
              (1.1, 1.0, False), (0.9, -1.0, False), (2.0, 2.0, True), (1.0, 0.0, False)]
    n = len(tokens)
    ratio = np.array([r for r, _, _ in tokens])
    adv = np.array([a for _, a, _ in tokens])
    prox = np.full((n, 1), -1.0)
    logp = prox + np.log(ratio)[:, None]
    mask = np.ones((n, 1))
    _, grad, stats = _run_loss(logp, prox, prox.copy(), adv, mask, clip_eps_low=el, clip_eps_high=eh)
    expected = sum(c for _, _, c in tokens)
    assert stats["clip_frac"] == pytest.approx(expected / n)
    clipped = np.array([c for _, _, c in tokens])
    assert np.all(grad.numpy()[clipped, 0] == 0)


def test_policy_loss_rejects_bad_options():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="is_mode"):
        algo.policy_loss(x, x, x, torch.zeros(2), torch.ones(2, 3), is_mode="clip")
    with pytest.raises(ValueError, match="staleness_decay"):
        algo.policy_loss(x, x, x, torch.zeros(2), torch.ones(2, 3), staleness_decay=0.0)




# ---------------------------------------------------------------- KL anchor to the reference policy

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kl_coef", [0.05, 1.0])
@pytest.mark.parametrize("case", [0, 3, 6])
def test_kl_anchor_loss_gradient_and_kl_ref_match_reference(dtype, kl_coef, case):
    kw = LOSS_CASES[case]
    rng = _rng("kl", case, kl_coef)
    logp, prox, beh, adv, mask = _loss_inputs(rng)
    ref_lp = logp + rng.normal(scale=0.5, size=logp.shape)
    ref_lp[mask == 0] = math.nan  # the reference's padding is never read
    stale = rng.integers(0, 4, size=logp.shape[0])
    loss, grad, stats = _run_loss(logp, prox, beh, adv, mask, dtype, staleness=t(stale, dtype),
                                  ref_logprobs=t(ref_lp, dtype), kl_coef=kl_coef, **kw)
    want, want_grad, want_stats = ref.policy_loss(logp, prox, beh, adv, mask, staleness=stale, ref_logprobs=ref_lp,
                                                  kl_coef=kl_coef, **kw)
    tol = TOL[dtype]
    assert float(loss.detach()) == pytest.approx(want, rel=tol["rtol"], abs=tol["atol"])
    close(grad, want_grad, dtype)
    assert stats["kl_ref"] == pytest.approx(want_stats["kl_ref"], rel=tol["rtol"], abs=tol["atol"])
    assert stats["kl_ref"] > 0
    assert np.all(grad.numpy()[mask == 0] == 0)


def test_kl_coef_zero_gives_exactly_the_loss_without_the_anchor():
    rng = _rng("kl0")
    for case in LOSS_CASES:
        logp, prox, beh, adv, mask = _loss_inputs(rng)
        base_loss, base_grad, base_stats = _run_loss(logp, prox, beh, adv, mask, **case)
        loss, grad, stats = _run_loss(logp, prox, beh, adv, mask, ref_logprobs=t(logp + 3.0, torch.float64),
                                      kl_coef=0.0, **case)
        assert torch.equal(loss, base_loss) and torch.equal(grad, base_grad)
        assert stats == base_stats and "kl_ref" not in stats


@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_term_and_its_gradient_vanish_when_the_policy_is_the_reference(dtype):
    logp, prox, beh, adv, mask = _loss_inputs(_rng("kl-same"))
    base_loss, base_grad, _ = _run_loss(logp, prox, beh, adv, mask, dtype)
    loss, grad, stats = _run_loss(logp, prox, beh, adv, mask, dtype, ref_logprobs=t(logp, dtype), kl_coef=0.5)
    assert stats["kl_ref"] == 0.0
    assert torch.equal(loss, base_loss) and torch.equal(grad, base_grad)


def test_kl_anchor_needs_reference_logprobs_and_a_non_negative_coefficient():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logprobs"):
        algo.policy_loss(x, x, x, torch.zeros(2), torch.ones(2, 3), kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_coef"):
        algo.policy_loss(x, x, x, torch.zeros(2), torch.ones(2, 3), ref_logprobs=x, kl_coef=-0.1)
