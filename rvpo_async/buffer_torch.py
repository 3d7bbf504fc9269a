"""Learner tensors from a table pulled out of the group buffer (rvpo_async.buffer.GroupBuffer.pull).

torch is imported inside `to_torch`, so importing this module (and rvpo_async.buffer) does not load it.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from rvpo_async.buffer_store import GROUP_SIZE_KEY, JUDGE_NAMES_KEY

if TYPE_CHECKING:
    import torch


def _view(arr: pa.Array) -> np.ndarray:
    """Zero-copy, read-only NumPy view of a primitive Arrow array without nulls (raises otherwise)."""
    return arr.to_numpy(zero_copy_only=True)


def to_torch(table: pa.Table, pad_id: int, *, writable: bool = False) -> dict[str, "torch.Tensor"]:
    """Learner tensors from a pulled table (N = B * G rows, group-major).

    input_ids [N, L] int64: prompt then response, right-padded with pad_id. attention_mask [N, L] int64.
    response_mask [N, L] bool: True on response tokens. behaviour_logprobs [N, L] float32: position t
    holds log mu(input_ids[t]) on response tokens, 0 elsewhere. rewards [B, G, K] float32 (NaN where
    masked), reward_mask [B, G, K] bool (True = valid), reward_status [B, G, K] int8, policy_version [N],
    prompt_lens / response_lens [N] int64, group_ids [B] int64.

    Copies: the [N, L] tensors are built by one vectorised scatter (padding needs new memory), and
    reward_mask is unpacked from Arrow's bit-packed booleans. rewards, reward_status and policy_version
    view Arrow's buffers (read-only: from the object store they are shared); pass writable=True to get
    copies that may be modified in place.
    """
    import torch

    meta = table.schema.metadata or {}
    if GROUP_SIZE_KEY not in meta or JUDGE_NAMES_KEY not in meta:
        raise ValueError(f"table lacks the metadata {GROUP_SIZE_KEY!r}, {JUDGE_NAMES_KEY!r} of GroupBuffer.pull")
    g, k, n = int(meta[GROUP_SIZE_KEY]), len(json.loads(meta[JUDGE_NAMES_KEY])), table.num_rows
    if n == 0 or n % g:
        raise ValueError(f"table has {n} rows, not a positive multiple of group_size {g}")
    b = n // g
    t = table.combine_chunks()  # no copy when already a single chunk, as pull returns it
    col = {name: t.column(name).chunk(0) for name in t.column_names}
    gids = _view(col["group_id"]).reshape(b, g)
    if (gids != gids[:, :1]).any() or (_view(col["sample_idx"]).reshape(b, g) != np.arange(g)).any():
        raise ValueError("table rows are not whole groups in sample order; pass a table from GroupBuffer.pull")
    p_off = _view(col["prompt_tokens"].offsets).astype(np.int64)
    r_off = _view(col["response_tokens"].offsets).astype(np.int64)
    plen, rlen = np.diff(p_off), np.diff(r_off)
    width = max(int((plen + rlen).max()), 1)
    rows = np.arange(n)

    def positions(lens: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        r = np.repeat(rows, lens)
        return r, np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens) + np.repeat(shift, lens)

    pr, pc = positions(plen, np.zeros(n, np.int64))
    rr, rc = positions(rlen, plen)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    input_ids[pr, pc] = _view(col["prompt_tokens"].flatten())
    input_ids[rr, rc] = _view(col["response_tokens"].flatten())
    response_mask = np.zeros((n, width), dtype=bool)
    response_mask[rr, rc] = True
    blp = np.zeros((n, width), dtype=np.float32)
    blp[rr, rc] = _view(col["behaviour_logprobs"].flatten())
    attention = (np.arange(width) < (plen + rlen)[:, None]).astype(np.int64)

    def shared(a: np.ndarray) -> torch.Tensor:
        if writable:
            return torch.from_numpy(a.copy())
        with warnings.catch_warnings():  # torch warns on read-only arrays; the docstring says why that is fine
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)

    return {
        "input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
        "response_mask": torch.from_numpy(response_mask), "behaviour_logprobs": torch.from_numpy(blp),
        "rewards": shared(_view(col["rewards"].flatten())).reshape(b, g, k),  # [B, G, K]
        "reward_mask": torch.from_numpy(col["reward_mask"].flatten().to_numpy(zero_copy_only=False)).reshape(b, g, k),
        "reward_status": shared(_view(col["reward_status"].flatten())).reshape(b, g, k),
        "policy_version": shared(_view(col["policy_version"])),
        "prompt_lens": torch.from_numpy(plen), "response_lens": torch.from_numpy(rlen),
        "group_ids": torch.from_numpy(gids[:, 0].copy()),
    }
