"""The policy-level focus aggregators (gdpo_focus, rvpo_focus) against the float64 NumPy reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rvpo_async import algo

try:
    from . import reference as ref
    from .algo_cases import DTYPES, TOL, _rng, close, draw_mask, draw_rewards, draw_weights, t
except ImportError:
    import reference as ref
    from algo_cases import DTYPES, TOL, _rng, close, draw_mask, draw_rewards, draw_weights, t

FOCUS = ["gdpo_focus", "rvpo_focus"]


def _mask(m: np.ndarray | None) -> torch.Tensor | None:
    return None if m is None else torch.from_numpy(m)


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("k_risk", [0.0, 0.5, 3.0])
def test_focus_weights_match_reference(masked, k_risk):
    rng = _rng("fw", masked, k_risk)
    r = draw_rewards(rng, (4, 8, 5))
    mask = draw_mask(rng, r.shape) if masked else np.ones(r.shape, dtype=bool)
    got = algo.focus_weights(t(r, torch.float64), torch.from_numpy(mask), k_risk)
    np.testing.assert_allclose(got.numpy(), ref.focus_weights(r, mask, k_risk), rtol=1e-12, atol=1e-12)
    assert got.sum().item() == pytest.approx(5.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FOCUS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_focus_aggregate_matches_reference(dtype, method, weighted, masked):
    rng = _rng("focus-agg", method, weighted, masked)
    r = draw_rewards(rng, (5, 8, 6))
    z = ref.group_normalize(r)
    w = draw_weights(rng, 6) if weighted else None
    mask = draw_mask(rng, r.shape) if masked else None
    k_risk = float(rng.uniform(0.3, 4.0))
    got = algo.aggregate(t(z, dtype), method, k_risk=k_risk, weights=w, mask=_mask(mask), rewards=t(r, dtype))
    close(got, ref.aggregate(z, method, k_risk=k_risk, weights=w, mask=mask, rewards=r), dtype)


def test_focus_weights_favour_the_reward_the_batch_fails():
    # reward 0 met by nearly every response, reward 1 by one response in the batch (a rare success)
    r = np.zeros((2, 8, 2))
    r[..., 0] = 1.0
    r[0, 0, 1] = 1.0
    f = algo.focus_weights(t(r, torch.float64), torch.ones(r.shape, dtype=torch.bool), 2.0).numpy()
    assert f[1] > f[0]
    np.testing.assert_allclose(f, 2 * np.exp([-2.0, -2.0 / 16]) / np.exp([-2.0, -2.0 / 16]).sum(), rtol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gdpo_focus_at_k_zero_is_gdpo(dtype):
    rng = _rng("focus-k0")
    r = draw_rewards(rng, (6, 8, 5))
    w = draw_weights(rng, 5)
    mask = _mask(draw_mask(rng, r.shape))
    want = algo.advantages(t(r, dtype), "gdpo", weights=w, mask=mask)
    assert torch.equal(algo.advantages(t(r, dtype), "gdpo_focus", k_risk=0.0, weights=w, mask=mask), want)
    close(algo.advantages(t(r, dtype), "gdpo_focus", k_risk=1e-11, weights=w, mask=mask), want.double().numpy(), dtype)


def test_rvpo_focus_as_k_goes_to_zero_is_gdpo():
    # rvpo normalises the weights per response, so the limit is gdpo over weights summing to 1
    rng = _rng("focus-rvpo-k0")
    r = draw_rewards(rng, (6, 8, 5))
    z, w = t(ref.group_normalize(r), torch.float64), draw_weights(rng, 5)
    want = algo.aggregate(z, "gdpo", weights=w / w.sum()).numpy()
    for k in (1e-3, 1e-5):
        got = algo.aggregate(z, "rvpo_focus", k_risk=k, weights=w, rewards=t(r, torch.float64)).numpy()
        np.testing.assert_allclose(got, want, atol=20 * k)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", FOCUS)
@pytest.mark.parametrize("k_risk", [0.1, 1.0, 8.0])
def test_single_reward_focus_equals_grpo(dtype, method, k_risk):
    r = draw_rewards(_rng("focus-k1", method, k_risk), (6, 8, 1))
    got = algo.advantages(t(r, dtype), method, k_risk=k_risk, batch_norm=False)
    want = algo.advantages(t(r, dtype), "mean")
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("method", FOCUS)
def test_focus_invariant_to_permuting_rewards_with_their_weights_and_masks(method):
    rng = _rng("focus-perm", method)
    r = draw_rewards(rng, (4, 8, 7))
    w = draw_weights(rng, 7)
    mask = draw_mask(rng, r.shape)
    perm = rng.permutation(7)
    base = algo.advantages(t(r, torch.float64), method, k_risk=1.3, weights=w, mask=_mask(mask))
    permuted = algo.advantages(t(r[..., perm], torch.float64), method, k_risk=1.3, weights=w[perm],
                               mask=_mask(mask[..., perm]))
    np.testing.assert_allclose(permuted.numpy(), base.numpy(), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("method", FOCUS)
def test_masked_rewards_do_not_move_the_focus(method):
    rng = _rng("focus-mask", method)
    r = draw_rewards(rng, (4, 8, 4))
    mask = draw_mask(rng, r.shape)
    mask[..., 3] = False  # a judge that never answered: no weight, and the others share K' = 3
    noisy = np.where(mask, r, 1e6)
    a = algo.advantages(t(r, torch.float64), method, k_risk=2.0, mask=_mask(mask))
    b = algo.advantages(t(noisy, torch.float64), method, k_risk=2.0, mask=_mask(mask))
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-12, atol=1e-12)
    f = algo.focus_weights(t(r, torch.float64), torch.from_numpy(mask), 2.0)
    assert f[3].item() == 0.0 and f.sum().item() == pytest.approx(3.0)


def test_focus_weights_carry_no_gradient():
    r = torch.tensor(draw_rewards(_rng("focus-grad"), (3, 4, 3)), requires_grad=True)
    z = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    out = algo.aggregate(z, "gdpo_focus", k_risk=1.0, rewards=r).sum()
    out.backward()
    assert r.grad is None and z.grad is not None
    # d/dz of sum_k f_k Z_k is f_k itself: the weights are constants of the step
    f = algo.focus_weights(r, torch.ones(r.shape, dtype=torch.bool), 1.0)
    torch.testing.assert_close(z.grad, f.expand_as(z))


def test_focus_aggregators_need_the_raw_rewards():
    z = torch.zeros(2, 3, 2)
    for method in FOCUS:
        with pytest.raises(ValueError, match="needs the raw rewards"):
            algo.aggregate(z, method)
    with pytest.raises(ValueError, match="k_risk must be >= 0"):
        algo.aggregate(z, "gdpo_focus", k_risk=-1.0, rewards=z)
