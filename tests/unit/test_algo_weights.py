"""Per-prompt and per-response reward weights in rvpo_async.algo (rubric workloads: each prompt has its own
criteria in K_max slots, the rest masked) against the float64 NumPy reference (rvpo_async/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rvpo_async import algo

try:
    from . import reference as ref
    from .algo_cases import DTYPES, _rng, close, draw_mask, draw_rewards, draw_weights, t
except ImportError:
    import reference as ref
    from algo_cases import DTYPES, _rng, close, draw_mask, draw_rewards, draw_weights, t

K_MAX = 17
G = 16


def _rubric_batch(seed: str, counts: tuple[int, ...] = (3, 17)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rewards [B, G, K_MAX], mask (each prompt's own criteria, plus a few judge timeouts) and points [B, K_MAX]
    (some negative: pitfalls; NaN in the slots a prompt does not have)."""
    rng = _rng("rubric", seed, counts)
    b = len(counts)
    r = draw_rewards(rng, (b, G, K_MAX))
    present = np.arange(K_MAX)[None, :] < np.asarray(counts)[:, None]  # [B, K]
    mask = present[:, None, :] & draw_mask(rng, (b, G, K_MAX))
    points = rng.integers(1, 10, size=(b, K_MAX)).astype(float) * np.where(rng.random((b, K_MAX)) < 0.2, -1, 1)
    points[~present] = np.nan
    r[~mask] = np.nan  # a masked slot may hold anything
    return r, mask, points


@pytest.mark.parametrize("mode", ["uniform", "points"])
@pytest.mark.parametrize("group_mask", [False, True])
def test_rubric_weights_match_reference_and_sum_to_one_over_present_criteria(mode, group_mask):
    _, mask, points = _rubric_batch("rw", (3, 17, 5, 0))
    present = mask.any(1)
    got = algo.rubric_weights(torch.from_numpy(points), torch.from_numpy(mask if group_mask else present), mode)
    want = ref.rubric_weights(points, present, mode)
    close(got, want, torch.float64)
    np.testing.assert_allclose(got.sum(-1).numpy(), [1.0, 1.0, 1.0, 0.0], rtol=1e-12)
    assert (got.numpy()[~present] == 0).all()
    if mode == "uniform":
        np.testing.assert_allclose(got[0, :3].numpy(), [1 / 3] * 3, rtol=1e-15)


def test_rubric_weights_errors_name_the_row_and_slot():
    points = torch.tensor([[1.0, 2.0, 0.0], [3.0, float("nan"), 1.0], [0.0, 0.0, 5.0]])
    present = torch.tensor([[True, True, False], [True, True, True], [True, True, False]])
    with pytest.raises(ValueError, match=r"row 1, criterion slot 1"):
        algo.rubric_weights(points, present, "points")
    with pytest.raises(ValueError, match=r"row 2 are all zero"):
        algo.rubric_weights(torch.nan_to_num(points), present, "points")
    with pytest.raises(ValueError, match="'uniform' or 'points'"):
        algo.rubric_weights(points, present, "sum")  # type: ignore[arg-type]
    assert algo.rubric_weights(points, present, "uniform")[1].tolist() == pytest.approx([1 / 3] * 3)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
@pytest.mark.parametrize("mode", ["uniform", "points"])
def test_advantages_of_a_3_and_a_17_criterion_prompt_match_reference(dtype, method, mode):
    r, mask, points = _rubric_batch("mix")
    w = ref.rubric_weights(points, mask.any(1), mode)
    w_t = algo.rubric_weights(torch.from_numpy(points), torch.from_numpy(mask), mode).to(dtype)
    for batch_norm in (False, True):
        got = algo.advantages(t(r, dtype), method, k_risk=1.7, weights=w_t, beta=0.6, batch_norm=batch_norm,
                              mask=torch.from_numpy(mask))
        want = ref.advantages(r, method, k_risk=1.7, weights=w, beta=0.6, batch_norm=batch_norm, mask=mask)
        close(got, want, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
def test_response_with_every_criterion_masked_matches_reference(dtype, method):
    r, mask, points = _rubric_batch("allmasked")
    mask[0, 5, :] = False  # response 5 of the 3-criterion prompt: every judge call failed
    mask[1, 0, :] = False
    w = ref.rubric_weights(points, mask.any(1), "points")
    got = algo.advantages(t(r, dtype), method, k_risk=2.0, weights=torch.from_numpy(w), batch_norm=False,
                          mask=torch.from_numpy(mask))
    close(got, ref.advantages(r, method, k_risk=2.0, weights=w, batch_norm=False, mask=mask), dtype)
    assert torch.isfinite(got).all()
    if method != "mean":  # no score for it: a neutral advantage, before batch normalisation
        assert got[0, 5] == 0 and got[1, 0] == 0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
def test_per_response_weights_match_reference(dtype, method):
    rng = _rng("per-response", method)
    shape = (4, 8, 6)
    r, mask = draw_rewards(rng, shape), draw_mask(rng, shape)
    w = rng.uniform(0.0, 2.0, size=shape)
    got = algo.advantages(t(r, dtype), method, k_risk=0.8, weights=t(w, dtype), mask=torch.from_numpy(mask))
    close(got, ref.advantages(r, method, k_risk=0.8, weights=w, mask=mask), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
@pytest.mark.parametrize("masked", [False, True])
def test_k_weights_give_the_same_numbers_as_the_same_weights_per_prompt_and_per_response(dtype, method, masked):
    rng = _rng("expand", method, masked)
    shape = (5, 8, 6)
    r = t(draw_rewards(rng, shape), dtype)
    mask = torch.from_numpy(draw_mask(rng, shape)) if masked else None
    w = draw_weights(rng, shape[-1])
    base = algo.advantages(r, method, k_risk=1.3, weights=w, mask=mask)
    per_prompt = torch.from_numpy(np.tile(w, (shape[0], 1)))
    per_response = torch.from_numpy(np.broadcast_to(w, shape).copy())
    assert torch.equal(algo.advantages(r, method, k_risk=1.3, weights=per_prompt, mask=mask), base)
    assert torch.equal(algo.advantages(r, method, k_risk=1.3, weights=per_response, mask=mask), base)
    assert torch.equal(algo.advantages(r, method, k_risk=1.3, weights=per_prompt.tolist(), mask=mask), base)


@pytest.mark.parametrize("method", algo.AGGREGATOR_NAMES)
def test_slots_a_prompt_lacks_are_absent_not_zero(method):
    # a 3-criterion prompt in 17 slots (14 masked) gets the advantages it gets alone with K = 3
    r, mask, points = _rubric_batch("absent", (3,))
    mask[:, :, :3] = True
    r[:, :, :3] = draw_rewards(_rng("absent-r"), (1, G, 3))
    w17 = algo.rubric_weights(torch.from_numpy(points), torch.from_numpy(mask), "points")
    w3 = algo.rubric_weights(torch.from_numpy(points[:, :3]), torch.ones(1, 3, dtype=torch.bool), "points")
    padded = algo.advantages(torch.from_numpy(r), method, k_risk=2.0, weights=w17, mask=torch.from_numpy(mask),
                             batch_norm=False)
    alone = algo.advantages(torch.from_numpy(r[:, :, :3]), method, k_risk=2.0, weights=w3, batch_norm=False)
    torch.testing.assert_close(padded, alone, rtol=1e-12, atol=1e-12)


def test_weights_of_a_wrong_shape_or_value_are_rejected_with_the_accepted_shapes():
    z = torch.zeros(2, 4, 3)
    with pytest.raises(ValueError, match=r"\(3,\), \(2, 3\) \(per prompt\) or \(2, 4, 3\) \(per response\)"):
        algo.aggregate(z, "rvpo", weights=torch.ones(4, 3))
    with pytest.raises(ValueError, match="non-negative"):
        algo.advantages(z, "gdpo", weights=[[1.0, -1.0, 1.0], [1.0, 1.0, 1.0]])
    with pytest.raises(ValueError, match="finite"):
        algo.advantages(z, "mean", weights=torch.full((2, 4, 3), float("nan")))
