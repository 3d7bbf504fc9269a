"""rvpo_async.algo against the float64 NumPy reference (rvpo_async/reference.py) on random inputs."""

from __future__ import annotations

import functools
import math
import re

import numpy as np
import pytest
import torch

from rvpo_async import algo
from rvpo_async.algo import RewardError

try:
    from . import reference as ref
except ImportError:
    import reference as ref

try:
    from .algo_cases import DTYPES, METHODS, SHAPES, TOL, _rng, close, draw_mask, draw_rewards, draw_weights, t
except ImportError:
    from algo_cases import DTYPES, METHODS, SHAPES, TOL, _rng, close, draw_mask, draw_rewards, draw_weights, t

# ---------------------------------------------------------------- group normalisation

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_group_normalize_matches_reference(dtype, shape, masked):
    rng = _rng("gn", shape, masked)
    r = draw_rewards(rng, shape)
    mask = draw_mask(rng, shape) if masked else None
    got = algo.group_normalize(t(r, dtype), mask=None if mask is None else torch.from_numpy(mask))
    close(got, ref.group_normalize(r, mask=mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("g", [2, 3, 7, 16])
@pytest.mark.parametrize("value", [0.0, 0.1, 1 / 3, -2.7, 7.3, 1e6 + 0.3])
def test_group_normalize_constant_reward_gives_zero(dtype, g, value):
    rng = _rng("const", g, value)
    r = rng.normal(size=(3, g, 2))
    r[1, :, 0] = value  # one group of one reward is constant
    z = algo.group_normalize(t(r, dtype))
    assert torch.equal(z[1, :, 0], torch.zeros(g, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_normalize_constant_among_valid_members_gives_zero(dtype):
    r = np.array([[[5.0], [5.0], [-3.0], [5.0]]])
    mask = torch.tensor([[[True], [True], [False], [True]]])
    assert torch.equal(algo.group_normalize(t(r, dtype), mask=mask), torch.zeros(1, 4, 1, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_group_normalize_fewer_than_two_valid_members_gives_zero(dtype):
    r = np.array([[[1.0, 4.0], [2.0, 5.0], [3.0, 9.0]]])
    mask = torch.tensor([[[True, False], [False, False], [False, True]]])
    assert torch.equal(algo.group_normalize(t(r, dtype), mask=mask), torch.zeros(1, 3, 2, dtype=dtype))


# ---------------------------------------------------------------- aggregators and advantages

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_aggregate_matches_reference(dtype, method, weighted, masked):
    rng = _rng("agg", method, weighted, masked)
    shape = (5, 8, 6)
    z = ref.group_normalize(draw_rewards(rng, shape))
    w = draw_weights(rng, shape[-1]) if weighted else None
    mask = draw_mask(rng, shape) if masked else None
    k_risk, beta = float(rng.uniform(0.3, 4.0)), float(rng.uniform(0.1, 1.0))
    got = algo.aggregate(t(z, dtype), method, k_risk=k_risk, weights=w, beta=beta,
                         mask=None if mask is None else torch.from_numpy(mask))
    want = ref.aggregate(z, method, k_risk=k_risk, weights=w, beta=beta, mask=mask)
    close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("batch_norm", [False, True])
def test_advantages_match_reference(dtype, method, weighted, masked, batch_norm):
    rng = _rng("adv", method, weighted, masked, batch_norm)
    for shape in SHAPES:
        r = draw_rewards(rng, shape)
        w = draw_weights(rng, shape[-1]) if weighted else None
        mask = draw_mask(rng, shape) if masked else None
        k_risk = float(rng.uniform(0.3, 4.0))
        got = algo.advantages(t(r, dtype), method, k_risk=k_risk, weights=w, beta=0.7, batch_norm=batch_norm,
                              mask=None if mask is None else torch.from_numpy(mask))
        want = ref.advantages(r, method, k_risk=k_risk, weights=w, beta=0.7, batch_norm=batch_norm, mask=mask)
        assert got.shape == shape[:2]
        close(got, want, dtype)


@functools.lru_cache(maxsize=1)
def _paper_scale_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = _rng("large")
    r = draw_rewards(rng, (1024, 16, 17))
    w = draw_weights(rng, 17)
    return r, w, ref.advantages(r, "rvpo", k_risk=2.0, weights=w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rvpo_advantages_match_reference_at_paper_scale(dtype):
    r, w, want = _paper_scale_case()
    close(algo.advantages(t(r, dtype), "rvpo", k_risk=2.0, weights=w), want, dtype)


def test_benchmark_baseline_is_the_reference(capsys):
    """`rvpo-async bench algo` times the float64 reference itself, and prints how far torch is from it."""
    from rvpo_async.bench.algo import bench_algo

    threads = torch.get_num_threads()  # the bench runs torch on one thread
    try:
        assert bench_algo(["--groups", "3", "--group-size", "4", "--rewards", "5", "--repeat", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    err = float(re.search(r"max \|difference\| vs float64 loop: (\S+)", capsys.readouterr().out).group(1))
    assert err < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_normalize_matches_reference(dtype):
    a = _rng("bn").normal(loc=3.0, scale=2.0, size=(7, 9))
    close(algo.batch_normalize(t(a, dtype)), ref.batch_normalize(a), dtype)


# ---------------------------------------------------------------- RVPO limits and expansion

def _z(seed: str, shape=(64, 17)) -> np.ndarray:
    return ref.group_normalize(draw_rewards(_rng(seed), (shape[0] // 8, 8, shape[1]))).reshape(shape)


@pytest.mark.parametrize("weighted", [False, True])
def test_rvpo_tends_to_weighted_mean_as_k_risk_tends_to_zero(weighted):
    z = _z("k0")
    w = _rng("k0w").uniform(0.1, 3.0, size=z.shape[-1]) if weighted else None
    mean_w, var_w, _ = ref.weighted_moments(z, w)
    errors = []
    for k in [1e-2, 1e-3, 1e-4, 1e-5]:
        a = algo.aggregate(t(z, torch.float64), "rvpo", k_risk=k, weights=w).numpy()
        err = np.abs(a - mean_w)
        # first-order term is (k/2) var_w; allow the O(k^2) rest
        assert np.all(err <= k * var_w / 2 * 1.1 + 1e-12), k
        errors.append(err.max())
    assert errors[-1] < 1e-4
    # the gap is first order in k: it shrinks ~1000x over three decades of k
    assert errors[-1] < 2e-3 * errors[0]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_rvpo_tends_to_min_as_k_risk_tends_to_infinity(dtype, weighted):
    z = _z("kinf")
    k_dim = z.shape[-1]
    w = _rng("kinfw").uniform(0.1, 3.0, size=k_dim) if weighted else np.ones(k_dim)
    wn = w / w.sum()
    zmin = z.min(-1)
    for k in [1e2, 1e3, 1e4]:
        a = algo.aggregate(t(z, dtype), "rvpo", k_risk=k, weights=w if weighted else None).double().numpy()
        # min_k z <= A <= min_k z + log(1 / w_argmin) / k  (log(K) / k for uniform weights)
        slack = np.log(1.0 / wn[z.argmin(-1)]) / k
        fp = 1e-12 if dtype == torch.float64 else 4e-6 * (1 + np.abs(zmin))
        assert np.all(a >= zmin - fp), k
        assert np.all(a <= zmin + slack + fp), k


@pytest.mark.parametrize("weighted", [False, True])
def test_rvpo_second_order_expansion_error_is_order_k_squared(weighted):
    z = _z("expansion")
    w = _rng("expw").uniform(0.1, 3.0, size=z.shape[-1]) if weighted else None
    mean_w, var_w, skew_w = ref.weighted_moments(z, w)

    def err(k: float) -> np.ndarray:
        a = algo.aggregate(t(z, torch.float64), "rvpo", k_risk=k, weights=w).numpy()
        return a - (mean_w - k / 2 * var_w)

    e = {k: err(k) for k in [0.04, 0.02, 0.01, 1e-3]}
    # halving k divides the worst error by ~4
    for k in [0.04, 0.02]:
        ratio = np.abs(e[k]).max() / np.abs(e[k / 2]).max()
        assert 3.5 < ratio < 4.5, (k, ratio)
    # and error / k^2 -> third weighted central moment / 6, response by response
    np.testing.assert_allclose(e[1e-3] / 1e-6, skew_w / 6, rtol=0.02, atol=2e-3)


# ---------------------------------------------------------------- invariances

@pytest.mark.parametrize("method", METHODS)
def test_aggregate_invariant_to_permuting_rewards_with_their_weights(method):
    rng = _rng("perm", method)
    z = ref.group_normalize(draw_rewards(rng, (4, 8, 7))).reshape(32, 7)
    w = draw_weights(rng, 7)
    mask = draw_mask(rng, z.shape)
    perm = rng.permutation(7)
    for m in [None, mask]:
        base = algo.aggregate(t(z, torch.float64), method, k_risk=1.7, weights=w,
                              mask=None if m is None else torch.from_numpy(m))
        permuted = algo.aggregate(t(z[:, perm], torch.float64), method, k_risk=1.7, weights=w[perm],
                                  mask=None if m is None else torch.from_numpy(m[:, perm]))
        np.testing.assert_allclose(permuted.numpy(), base.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
def test_advantages_invariant_to_permuting_rewards_with_their_weights(method):
    rng = _rng("perm-adv", method)
    r = draw_rewards(rng, (5, 8, 6))
    w = draw_weights(rng, 6)
    perm = rng.permutation(6)
    base = algo.advantages(t(r, torch.float64), method, weights=w)
    permuted = algo.advantages(t(r[..., perm], torch.float64), method, weights=w[perm])
    np.testing.assert_allclose(permuted.numpy(), base.numpy(), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_risk", [0.1, 1.0, 8.0])
def test_single_reward_rvpo_equals_grpo_mean(dtype, k_risk):
    r = draw_rewards(_rng("k1", k_risk), (6, 8, 1))
    got = algo.advantages(t(r, dtype), "rvpo", k_risk=k_risk, batch_norm=False)
    want = algo.advantages(t(r, dtype), "mean")
    torch.testing.assert_close(got, want, **TOL[dtype])


# ---------------------------------------------------------------- numerical stability

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k_risk", [1.0, 1e2, 1e4])
def test_rvpo_output_and_gradient_finite_for_large_k_risk_times_z(dtype, k_risk):
    rng = _rng("grad", k_risk)
    # |k_risk * z| spans up to 1e4
    z = torch.from_numpy(rng.uniform(-1.0, 1.0, size=(32, 17)) * (1e4 / k_risk)).to(dtype).requires_grad_(True)
    out = algo.aggregate(z, "rvpo", k_risk=k_risk)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(z.grad).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_rvpo_gradient_is_a_probability_vector_over_rewards(dtype):
    # A(z + c) = A(z) + c and A is increasing in each z_k: dA/dz is a probability vector
    rng = _rng("gradsum")
    z = torch.from_numpy(rng.normal(size=(16, 5)) * 30).to(dtype).requires_grad_(True)
    algo.aggregate(z, "rvpo", k_risk=50.0, weights=[1.0, 2.0, 0.5, 0.0, 1.0]).sum().backward()
    assert (z.grad >= 0).all()
    torch.testing.assert_close(z.grad.sum(-1), torch.ones(16, dtype=dtype), **TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rvpo_response_without_a_positive_weight_valid_reward_gives_zero_and_finite_gradient(dtype):
    z = torch.tensor([[0.5, -1.0], [2.0, 0.3], [-0.7, 1.1]], dtype=dtype, requires_grad=True)
    mask = torch.tensor([[True, False], [False, True], [False, False]])
    out = algo.aggregate(z, "rvpo", k_risk=3.0, weights=[1.0, 0.0], mask=mask)
    out.sum().backward()
    assert out[1] == 0 and out[2] == 0
    assert torch.isfinite(z.grad).all()


# ---------------------------------------------------------------- reward checks

def _bad_rewards() -> torch.Tensor:
    r = torch.zeros(2, 4, 3, dtype=torch.float64)
    r[0, 1, 2] = math.nan
    r[1, 3, 2] = math.nan
    r[1, 0, 0] = -math.inf
    r[0, 2, 0] = math.inf
    r[1, 2, 0] = math.nan
    return r


def _part_for(msg: str, column: int) -> str:
    parts = [p for p in msg.split(";") if f"column {column}" in p]
    assert len(parts) == 1, msg
    return parts[0].replace(f"column {column}", "")


def test_check_rewards_names_each_bad_column_and_its_count():
    with pytest.raises(RewardError) as e:
        algo.check_rewards(_bad_rewards())
    msg = str(e.value)
    assert re.search(r"\b2\b", _part_for(msg, 2))
    assert re.search(r"\b3\b", _part_for(msg, 0))
    assert "column 1" not in msg


def test_check_rewards_uses_reward_names():
    with pytest.raises(RewardError) as e:
        algo.check_rewards(_bad_rewards(), names=["format", "length", "json_schema"])
    msg = str(e.value)
    assert "json_schema" in msg and "format" in msg and "length" not in msg


@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
def test_advantages_raise_reward_error_naming_column_and_count(method):
    with pytest.raises(RewardError) as e:
        algo.advantages(_bad_rewards(), method)
    assert re.search(r"\b2\b", _part_for(str(e.value), 2))


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.float32])
def test_non_finite_rewards_under_the_mask_are_accepted(mask_dtype):
    r = _bad_rewards()
    mask = torch.isfinite(r).to(mask_dtype)
    algo.check_rewards(r, mask=mask)
    a = algo.advantages(r, "rvpo", mask=mask)
    assert torch.isfinite(a).all()


def test_aggregate_rejects_bad_arguments():
    z = torch.zeros(4, 3)
    with pytest.raises(ValueError, match="unknown aggregator"):
        algo.aggregate(z, "median")
    with pytest.raises(ValueError, match="one entry per reward"):
        algo.aggregate(z, "gdpo", weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="non-negative"):
        algo.aggregate(z, "gdpo", weights=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="k_risk"):
        algo.aggregate(z, "rvpo", k_risk=0.0)


# ---------------------------------------------------------------- diagnostics

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("masked", [False, True])
def test_reward_diagnostics_match_reference(dtype, masked):
    rng = _rng("diag", masked)
    shape = (6, 8, 5)
    r = rng.normal(loc=rng.normal(size=5), scale=rng.uniform(0.5, 2.0, size=5), size=shape)
    mask = draw_mask(rng, shape) if masked else None
    if masked:
        mask[0, 3, :] = False  # a response with no valid reward
    got = algo.reward_diagnostics(t(r, dtype), mask=None if mask is None else torch.from_numpy(mask))
    want = ref.reward_diagnostics(r, mask=mask)
    for key in ["mean", "std", "inter_variance", "worst_mean", "all_met_share"]:
        close(got[key], np.asarray(want[key]), dtype)
    np.testing.assert_allclose(got["bottleneck_share"].double().numpy(), want["bottleneck_share"], atol=1e-12)
    assert float(got["bottleneck_share"].sum()) == pytest.approx(1.0)


def test_worst_mean_is_one_only_when_every_response_meets_every_reward():
    met = torch.ones(2, 4, 3, dtype=torch.float64)
    assert float(algo.reward_diagnostics(met)["worst_mean"]) == 1.0
    one_miss = met.clone()
    one_miss[1, 2, 0] = 0.0  # one response of eight fails one reward: the per-reward means barely move
    d = algo.reward_diagnostics(one_miss)
    assert float(d["worst_mean"]) == pytest.approx(7 / 8)
    assert float(d["mean"].min()) == pytest.approx(7 / 8) and float(d["mean"].mean()) == pytest.approx(23 / 24)
    # a masked entry does not count as a failure
    assert float(algo.reward_diagnostics(one_miss, mask=one_miss > 0)["worst_mean"]) == 1.0


@pytest.mark.parametrize("masked", [False, True])
def test_all_met_share_matches_reference_on_rule_like_rewards(masked):
    rng = _rng("allmet", masked)
    shape = (5, 8, 4)
    r = rng.choice([0.0, 0.25, 0.5, 0.75, 1.0], size=shape)  # exactly 0.5 counts as met
    mask = draw_mask(rng, shape) if masked else None
    if masked:
        mask[1, 2, :] = False  # a response with no valid reward is left out, not counted as met
    got = algo.reward_diagnostics(torch.from_numpy(r), mask=None if mask is None else torch.from_numpy(mask))
    want = ref.reward_diagnostics(r, mask=mask)
    assert float(got["all_met_share"]) == pytest.approx(want["all_met_share"], abs=1e-12)
    one_miss = torch.ones(2, 4, 3, dtype=torch.float64)
    one_miss[1, 2, 0] = 0.0
    assert float(algo.reward_diagnostics(one_miss)["all_met_share"]) == pytest.approx(7 / 8)
    assert float(algo.reward_diagnostics(one_miss, mask=one_miss > 0)["all_met_share"]) == 1.0


def test_bottleneck_share_splits_ties_equally_so_constant_groups_favour_no_reward():
    rewards = torch.ones(3, 4, 5, dtype=torch.float64)  # every reward constant in every group
    share = algo.reward_diagnostics(rewards)["bottleneck_share"]
    assert torch.allclose(share, torch.full((5,), 0.2, dtype=torch.float64))
