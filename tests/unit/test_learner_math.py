"""The learner's pure helpers, without DeepSpeed or Ray: the learning-rate schedule, token log-probs, the
attention mask of right-padded rows, stats merged over micro-batches and ranks, and a batch cut into whole
groups for the ranks. Math is checked against float64 NumPy references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from learner.actor import merge_rank_stats, split_by_groups
from learner.engine import combine_stats, derive_attention_mask, lr_factor, make_scheduler
from learner.logprobs import token_logprobs
from rvpo_async.config import LearnerConfig

# ---------------------------------------------------------------- learning-rate schedule


def _reference_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """The schedule written out in float64: linear warmup over `warmup` steps, then the decay over the
    remaining `total - warmup` steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    p = np.clip(np.float64(step - warmup) / (total - warmup), 0.0, 1.0)
    return float(1.0 - p) if schedule == "linear" else float(0.5 * (1.0 + np.cos(np.pi * p)))


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("warmup, total", [(0, 20), (5, 20), (3, 3), (4, 0)])
def test_lr_factor_matches_the_float64_schedule_at_every_step(schedule, warmup, total):
    for step in range(max(total, warmup) + 5):
        got = lr_factor(step, schedule=schedule, warmup_steps=warmup, total_steps=total)
        assert got == pytest.approx(_reference_factor(step, schedule, warmup, total), abs=1e-12), step


def test_warmup_rises_linearly_to_the_base_rate_at_its_last_step():
    f = [lr_factor(s, schedule="cosine", warmup_steps=4, total_steps=100) for s in range(5)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0] and f[4] == 1.0
    assert all(0 < a < b for a, b in zip(f[:3], f[1:4]))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_decay_falls_monotonically_to_zero_at_total_steps_and_stays_there(schedule):
    f = [lr_factor(s, schedule=schedule, warmup_steps=2, total_steps=12) for s in range(2, 20)]
    assert f[0] == 1.0 and all(a >= b for a, b in zip(f, f[1:]))
    assert f[10] == pytest.approx(0.0, abs=1e-15) and all(x == pytest.approx(0.0, abs=1e-15) for x in f[10:])


def test_cosine_is_half_the_base_rate_halfway_through_the_decay():
    assert lr_factor(15, schedule="cosine", warmup_steps=5, total_steps=25) == pytest.approx(0.5, abs=1e-12)
    assert lr_factor(15, schedule="linear", warmup_steps=5, total_steps=25) == pytest.approx(0.5, abs=1e-12)


def test_unknown_schedule_is_refused_naming_the_key():
    with pytest.raises(ValueError, match="learner.lr_schedule"):
        lr_factor(3, schedule="exponential", warmup_steps=0, total_steps=10)


def test_scheduler_sets_the_optimizer_rate_to_base_times_the_factor_after_each_step():
    cfg = LearnerConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=3)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=cfg.lr)
    sched = make_scheduler(opt, cfg, total_steps=10)
    for step in range(12):
        want = cfg.lr * _reference_factor(step, "cosine", 3, 10)
        assert opt.param_groups[0]["lr"] == pytest.approx(want, rel=1e-12, abs=1e-18), step
        opt.step()
        sched.step()


# ---------------------------------------------------------------- token log-probs


def _reference_logprobs(logits: np.ndarray, ids: np.ndarray, temperature: float) -> np.ndarray:
    """float64: position t holds log softmax(logits[t-1] / T)[ids[t]]; 0 at t = 0."""
    z = logits.astype(np.float64) / temperature
    out = np.zeros(ids.shape, dtype=np.float64)
    for n in range(ids.shape[0]):
        for t in range(1, ids.shape[1]):
            row = z[n, t - 1]
            out[n, t] = row[ids[n, t]] - (row.max() + np.log(np.exp(row - row.max()).sum()))
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.5])
def test_token_logprobs_match_a_float64_log_softmax_of_the_previous_position(temperature):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g) * 4
    ids = torch.randint(0, 11, (3, 6), generator=g)
    got = token_logprobs(logits, ids, temperature)
    assert got.shape == ids.shape and got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), _reference_logprobs(logits.numpy(), ids.numpy(), temperature),
                               rtol=0, atol=2e-5)
    assert torch.all(got[:, 0] == 0) and torch.all(got[:, 1:] < 0)


def test_token_logprobs_upcast_half_precision_logits_before_the_softmax():
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(2, 5, 7, generator=g) * 3).bfloat16()
    ids = torch.randint(0, 7, (2, 5), generator=g)
    got = token_logprobs(logits, ids, 1.0)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.double().numpy(), _reference_logprobs(logits.float().numpy(), ids.numpy(), 1.0),
                               rtol=0, atol=2e-5)


def test_token_logprobs_of_every_next_token_sum_to_one_in_probability():
    logits = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(2))
    total = sum(token_logprobs(logits, torch.full((1, 4), v), 0.9)[0, 1:].double().exp() for v in range(5))
    np.testing.assert_allclose(total.numpy(), np.ones(3), rtol=0, atol=1e-6)


def test_token_logprobs_carry_the_gradient_to_the_logits():
    logits = torch.randn(1, 3, 4, requires_grad=True)
    token_logprobs(logits, torch.tensor([[0, 1, 2]]), 1.0).sum().backward()
    assert logits.grad is not None and torch.count_nonzero(logits.grad[0, :2]) > 0
    assert torch.all(logits.grad[0, 2] == 0)  # the last position predicts nothing in the row


# ---------------------------------------------------------------- attention mask


def test_attention_mask_covers_each_row_up_to_its_last_response_token():
    batch = {"input_ids": torch.zeros(3, 6, dtype=torch.long),
             "response_mask": torch.tensor([[0, 0, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]])}
    assert derive_attention_mask(batch).tolist() == [[1, 1, 1, 1, 0, 0], [1] * 6, [0] * 6]


def test_a_given_attention_mask_is_used_as_it_is():
    mask = torch.tensor([[True, False, True]])
    got = derive_attention_mask({"input_ids": torch.zeros(1, 3), "response_mask": torch.ones(1, 3),
                                 "attention_mask": mask})
    assert got.dtype == torch.long and got.tolist() == [[1, 0, 1]]


# ---------------------------------------------------------------- stats over micro-batches and ranks


def test_combine_stats_weights_means_by_tokens_and_keeps_extremes():
    parts = [({"loss": 0.5, "ratio_max": 1.2, "ratio_min": 0.9}, 10.0),
             ({"loss": -1.0, "ratio_max": 3.0, "ratio_min": 0.95}, 30.0),
             ({"loss": 2.0, "ratio_max": 1.0, "ratio_min": 0.4}, 5.0)]
    out = combine_stats(parts)
    want = np.average(np.array([0.5, -1.0, 2.0], dtype=np.float64), weights=np.array([10.0, 30.0, 5.0]))
    assert out["loss"] == pytest.approx(float(want), rel=1e-12)
    assert out["ratio_max"] == 3.0 and out["ratio_min"] == 0.4


def test_combine_stats_of_parts_without_tokens_is_the_plain_mean():
    out = combine_stats([({"loss": 1.0, "x_max": 2.0}, 0.0), ({"loss": 4.0, "x_max": 1.0}, 0.0)])
    assert out == {"loss": 2.5, "x_max": 2.0}


def test_combine_stats_of_one_part_is_that_part():
    assert combine_stats([({"loss": 0.25, "kl_max": 0.5}, 7.0)]) == {"loss": 0.25, "kl_max": 0.5}


def _rank(loss, tokens, seqs, stale, grad_norm, lr, seconds, clip_max):
    return {"loss": loss, "tokens_trained": tokens, "sequences": seqs, "staleness_mean": stale,
            "grad_norm": grad_norm, "lr": lr, "step_seconds": seconds, "ratio_max": clip_max}


def test_merge_rank_stats_sums_counts_weights_means_and_takes_shared_values_from_rank_0():
    ranks = [_rank(0.3, 120.0, 4.0, 1.0, 2.0, 1e-4, 1.5, 1.1), _rank(-0.6, 40.0, 2.0, 4.0, 2.0, 1e-4, 2.5, 1.7),
             _rank(0.1, 80.0, 6.0, 0.0, 2.0, 1e-4, 0.5, 1.3)]
    out = merge_rank_stats(ranks, version=7)
    tokens = np.array([120.0, 40.0, 80.0])
    seqs = np.array([4.0, 2.0, 6.0])
    assert out["tokens_trained"] == 240.0 and out["sequences"] == 12.0
    assert out["loss"] == pytest.approx(float(np.average([0.3, -0.6, 0.1], weights=tokens)), rel=1e-12)
    assert out["staleness_mean"] == pytest.approx(float(np.average([1.0, 4.0, 0.0], weights=seqs)), rel=1e-12)
    assert (out["grad_norm"], out["lr"]) == (2.0, 1e-4)
    assert out["step_seconds"] == 2.5 and out["ratio_max"] == 1.7
    assert out["version"] == 7.0 and type(out["version"]) is float


def test_merge_rank_stats_of_ranks_without_sequences_does_not_divide_by_zero():
    out = merge_rank_stats([_rank(0.0, 0.0, 0.0, 0.0, 0.0, 1e-3, 0.1, 1.0)] * 2, version=1)
    assert out["staleness_mean"] == 0.0 and out["sequences"] == 0.0 and math.isfinite(out["loss"])


# ---------------------------------------------------------------- batch split over ranks


def _batch(groups: int, group_size: int) -> dict[str, torch.Tensor]:
    n = groups * group_size
    return {"input_ids": torch.arange(n * 3).reshape(n, 3), "advantages": torch.arange(n, dtype=torch.float32),
            "policy_version": torch.arange(n) // group_size}


@pytest.mark.parametrize("groups, parts", [(4, 2), (5, 2), (7, 3), (3, 3), (8, 1)])
def test_split_gives_every_rank_whole_contiguous_groups_as_evenly_as_possible(groups, parts):
    g = 4
    batch = _batch(groups, g)
    shards = split_by_groups(batch, parts, g)
    assert len(shards) == parts
    sizes = [s["input_ids"].shape[0] for s in shards]
    assert all(n > 0 and n % g == 0 for n in sizes) and max(sizes) - min(sizes) <= g
    for key, full in batch.items():
        assert torch.equal(torch.cat([s[key] for s in shards]), full), key
    for s in shards:  # no group is cut between two ranks
        ids = s["policy_version"].tolist()
        assert all(ids.count(x) == g for x in set(ids))


def test_split_refuses_a_batch_that_is_not_whole_groups():
    with pytest.raises(ValueError, match="rollout.group_size=4"):
        split_by_groups({"input_ids": torch.zeros(10, 2)}, 2, 4)


def test_split_refuses_fewer_groups_than_ranks():
    with pytest.raises(ValueError, match="learner.num_ranks=3"):
        split_by_groups(_batch(2, 4), 3, 4)


def test_combine_stats_weights_a_key_over_the_parts_that_carry_it():
    # 'kl' only from the second and third parts (tokens 30 and 10); 'late_max' first seen in the third
    parts = [({"loss": 1.0}, 60.0), ({"loss": 2.0, "kl": 0.2}, 30.0), ({"loss": 4.0, "kl": 0.6, "late_max": 3.0}, 10.0)]
    out = combine_stats(parts)
    assert out["loss"] == pytest.approx((60 + 60 + 40) / 100)
    assert out["kl"] == pytest.approx((0.2 * 30 + 0.6 * 10) / 40)  # not diluted by the first part's 60 tokens
    assert out["late_max"] == 3.0 and list(out) == ["loss", "kl", "late_max"]
