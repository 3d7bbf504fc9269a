"""Shared inputs and tolerances for the tests of rvpo_async.algo."""

from __future__ import annotations

import zlib

import numpy as np
import torch


DTYPES = [torch.float64, torch.float32]
# float32 paths: Z-scores are O(1..4) and aggregation adds a few roundings
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=1e-4, atol=2e-4)}
SHAPES = [(1, 2, 1), (3, 5, 4), (6, 16, 3), (4, 7, 17)]
METHODS = ["gdpo", "rvpo", "rvpo_explicit", "min"]


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng([zlib.crc32(repr(k).encode()) for k in key] + [20240917])


def draw_rewards(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """Mixed reward columns: continuous scores, binary pass/fail, and small integer grades."""
    b, g, k = shape
    r = rng.normal(loc=rng.normal(size=k), scale=rng.uniform(0.2, 3.0, size=k), size=(b, g, k))
    for j in range(k):
        kind = j % 3
        if kind == 1:
            r[..., j] = (rng.random((b, g)) < rng.uniform(0.2, 0.8)).astype(float)
        elif kind == 2:
            r[..., j] = rng.integers(0, 5, size=(b, g)).astype(float)
    return r


def draw_mask(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape) > 0.2


def draw_weights(rng: np.random.Generator, k: int) -> np.ndarray:
    w = rng.uniform(0.1, 3.0, size=k)
    if k > 2:
        w[rng.integers(k)] = 0.0  # a zero weight is allowed and must drop its reward out
    return w


def t(x: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(dtype)


def close(got: torch.Tensor, want: np.ndarray, dtype: torch.dtype) -> None:
    np.testing.assert_allclose(got.double().numpy(), want, **TOL[dtype])
