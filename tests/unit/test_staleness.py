"""Staleness rules: AReaL's admission bound, the too-stale test and the staleness histogram."""

from __future__ import annotations

import collections
from collections import deque

import numpy as np
import pytest

from rvpo_async.staleness import admission_capacity, is_too_stale, staleness, staleness_histogram


@pytest.mark.parametrize("version", [0, 1, 5])
@pytest.mark.parametrize("groups_per_step", [1, 4, 8])
@pytest.mark.parametrize("eta", [0, 1, 3])
def test_admission_capacity_is_bound_minus_submitted_clamped_at_zero(version, groups_per_step, eta):
    bound = (eta + version + 1) * groups_per_step
    for submitted in range(0, bound + 2 * groups_per_step + 1):
        assert admission_capacity(version, submitted, groups_per_step, eta) == max(0, bound - submitted)


def test_admission_capacity_examples():
    assert admission_capacity(0, 0, 8, 0) == 8
    assert admission_capacity(0, 0, 8, 2) == 24
    assert admission_capacity(3, 30, 8, 2) == 18
    assert admission_capacity(3, 48, 8, 2) == 0
    assert admission_capacity(3, 60, 8, 2) == 0  # over-submitted: never negative


@pytest.mark.parametrize("groups_per_step", [1, 3, 8])
def test_zero_staleness_admits_exactly_one_step_of_groups_per_version(groups_per_step):
    submitted = 0
    for version in range(6):
        cap = admission_capacity(version, submitted, groups_per_step, 0)
        assert cap == groups_per_step
        submitted += cap
        assert admission_capacity(version, submitted, groups_per_step, 0) == 0


@pytest.mark.parametrize("eta", [0, 1, 2, 4])
@pytest.mark.parametrize("seed", range(3))
def test_admission_rule_keeps_trained_staleness_within_bound(eta, seed):
    # rollout and learner interleave at random; the learner trains the oldest groups first
    rng = np.random.default_rng(seed)
    gps, version, submitted = 4, 0, 0
    ready: deque[int] = deque()  # behaviour version of each group, in submission order
    trained = []
    while version < 40:
        if rng.random() < 0.5:
            n = int(rng.integers(0, admission_capacity(version, submitted, gps, eta) + 1))
            ready.extend([version] * n)
            submitted += n
        elif len(ready) >= gps:
            batch = [ready.popleft() for _ in range(gps)]
            trained += [staleness(version, v) for v in batch]
            assert not any(is_too_stale(version, v, eta) for v in batch)
            version += 1
    assert max(trained) <= eta
    if eta > 0:
        assert max(trained) > 0  # the run did go asynchronous


@pytest.mark.parametrize("bad", [dict(groups_per_step=0), dict(groups_per_step=-1), dict(max_staleness=-1)])
def test_admission_capacity_rejects_bad_arguments(bad):
    args = dict(learner_version=0, submitted_groups=0, groups_per_step=4, max_staleness=1) | bad
    with pytest.raises(ValueError):
        admission_capacity(**args)


def test_staleness_is_versions_behind():
    assert staleness(7, 7) == 0
    assert staleness(7, 4) == 3


@pytest.mark.parametrize("eta", [0, 1, 3])
def test_is_too_stale_exactly_beyond_bound(eta):
    learner = 10
    for behaviour in range(0, learner + 1):
        assert is_too_stale(learner, behaviour, eta) == (learner - behaviour > eta)


@pytest.mark.parametrize("eta", [0, 2, 5])
def test_staleness_histogram_counts_each_staleness(eta):
    rng = np.random.default_rng(eta)
    values = rng.integers(0, eta + 1, size=200).tolist()
    hist = staleness_histogram(values, eta)
    counts = collections.Counter(values)
    assert hist == [counts[s] for s in range(eta + 1)]


def test_staleness_histogram_puts_values_beyond_bound_in_last_bucket():
    assert staleness_histogram([0, 1, 2, 3, 7, 2], 2) == [1, 1, 4]
    assert staleness_histogram([], 3) == [0, 0, 0, 0]
