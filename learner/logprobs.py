"""Token log-probs of the learner's rows: the plain forward, and each distinct prompt run once (`learner.shared_prefix`).

Log-prob convention: position t holds log p(input_ids[t] | input_ids[<t]) from the logits at t-1 divided by
the temperature, 0 at position 0; the rollout engine's behaviour log-probs use the same one.

A GRPO step trains G responses to every prompt: a plain forward runs each prompt G times. Under causal
attention a prompt's hidden states do not depend on what follows it, so they can be computed once per distinct
prompt and its keys and values handed to the G response rows. The log-probs of the response tokens, and the
gradients that flow back into the prompt's positions (summed over its G rows by autograd), are those of the
plain forward to float rounding (tests/unit/test_learner_logprobs.py in float64,
tests/ray/test_learner_shared_prefix.py through a DeepSpeed step).

The layout it reads is the learner's: right-padded rows, `response_mask` marking the tokens the loss trains.
A row's prompt is everything before its first response token; what follows (responses, and any unmasked
tokens among them in multi-turn rows) is run after it with the prompt's KV cache. The result has the plain
path's [N, L] layout, with 0 at the prompt's positions (the loss masks them).

Two forwards per micro-batch:
1. the U distinct prompts, left-padded to the longest, `use_cache=True`, logits of the last position only
   (they score each response's first token);
2. the N suffixes, right-padded, attending to their prompt's cache rows (selected by index, so autograd
   routes each row's gradient back to its prompt).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def upcast(t: torch.Tensor) -> torch.Tensor:
    """Half precision to fp32 for the log-softmax; fp32 and fp64 as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, L, V] logits, [N, L] ids -> [N, L] log p(id_t | ids_<t) at `temperature`; 0 at t = 0."""
    scaled = upcast(logits[:, :-1]) / temperature  # [N, L-1, V]
    picked = scaled.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [N, L-1]
    lp = picked - torch.logsumexp(scaled, dim=-1)
    return torch.nn.functional.pad(lp, (1, 0))  # [N, L]


@dataclass(frozen=True)
class PrefixPlan:
    """How the rows of a micro-batch share prompts: row r's prompt is distinct prompt `row_to_prompt[r]`."""

    split: torch.Tensor  # [N] first response position of each row (= its prompt's length)
    row_to_prompt: torch.Tensor  # [N] index into the distinct prompts
    prompt_rows: torch.Tensor  # [U] a row holding each distinct prompt

    @property
    def num_prompts(self) -> int:
        return int(self.prompt_rows.numel())


def plan_prefix(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor) -> PrefixPlan | None:
    """The distinct prompts of a right-padded micro-batch, or None where sharing does not apply: no two rows
    share a prompt (the plain forward is as cheap), a row trains no token, or a prompt holds padding."""
    n, length = input_ids.shape
    pos = torch.arange(length, device=input_ids.device).unsqueeze(0)
    split = torch.where(response_mask > 0, pos, length).amin(dim=1)  # [N]
    if bool((split >= length).any()) or bool((split < 1).any()):
        return None
    if bool(((attention_mask == 0) & (pos < split.unsqueeze(1))).any()):
        return None  # left padding or holes in a prompt: not the layout this path assumes
    ids, cuts = input_ids.tolist(), split.tolist()
    index: dict[tuple[int, ...], int] = {}
    row_to_prompt = [index.setdefault(tuple(row[:cut]), len(index)) for row, cut in zip(ids, cuts)]
    if len(index) == n:
        return None
    first: dict[int, int] = {}
    for r, u in enumerate(row_to_prompt):
        first.setdefault(u, r)
    dev = input_ids.device
    return PrefixPlan(split=split, row_to_prompt=torch.tensor(row_to_prompt, device=dev),
                      prompt_rows=torch.tensor([first[u] for u in range(len(index))], device=dev))


def shared_prefix_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: PrefixPlan,
                           temperature: float, pad_id: int = 0) -> torch.Tensor:
    """[N, L] log p(input_ids[t] | input_ids[<t]) at `temperature` for every t from the row's first response
    token on, 0 before it; each distinct prompt runs through `model` (a HF causal LM) once."""
    n, length = input_ids.shape
    dev = input_ids.device
    split, rows, to_prompt = plan.split, plan.prompt_rows, plan.row_to_prompt

    # 1. distinct prompts, left-padded: position j of prompt u holds token j - (P - len_u) of its row
    plen = split[rows]  # [U]
    p_max = int(plen.max())
    src = torch.arange(p_max, device=dev).unsqueeze(0) - (p_max - plen).unsqueeze(1)  # [U, P]; < 0: padding
    p_mask = (src >= 0).long()
    p_ids = torch.where(p_mask > 0, input_ids[rows].gather(1, src.clamp(min=0)), pad_id)
    out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=src.clamp(min=0), use_cache=True,
                logits_to_keep=1)
    first_logits = out.logits[:, -1]  # [U, V]: scores each row's first response token
    cache = out.past_key_values
    cache.reorder_cache(to_prompt)  # [U, ...] -> [N, ...], differentiable (index_select)

    # 2. each row's suffix (from its first response token), right-padded, after its prompt's cache
    r_max = int((length - split).max())
    at = split.unsqueeze(1) + torch.arange(r_max, device=dev).unsqueeze(0)  # [N, R] positions in the row
    inside = at < length
    at_c = at.clamp(max=length - 1)
    r_ids = torch.where(inside, input_ids.gather(1, at_c), pad_id)
    r_mask = (inside & (attention_mask.gather(1, at_c) > 0)).long()
    out = model(input_ids=r_ids, attention_mask=torch.cat([p_mask[to_prompt], r_mask], dim=1), position_ids=at,
                past_key_values=cache, use_cache=True)
    logits = upcast(torch.cat([first_logits[to_prompt].unsqueeze(1), out.logits[:, :-1]], dim=1)) / temperature
    picked = logits.gather(-1, r_ids.unsqueeze(-1)).squeeze(-1)
    lp = picked - torch.logsumexp(logits, dim=-1)  # [N, R]: log p(r_ids[:, k])

    # back to the rows' layout
    back = torch.arange(length, device=dev).unsqueeze(0) - split.unsqueeze(1)  # [N, L]
    return torch.where(back >= 0, lp.gather(1, back.clamp(0, r_max - 1)), torch.zeros((), device=dev))
