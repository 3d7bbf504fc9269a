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
   routes each row's gradient back to its prompt). A suffix ends at its last scored token, and with
   `learner.length_buckets` > 1 rows of similar lengths run together, each bucket padded to its own longest
   (responses of a step differ in length: at one budget for all, a quarter of the tokens can be padding).

The vocabulary projection (the output layer) and the log-softmax run only at the positions whose log-probs
are wanted (`need`: the learner passes the response mask), not at padding or untrained tokens: on a model with a
large vocabulary (SmolLM2's 49,152 words) they are a large share of a step. `masked_token_logprobs` does the
same for the plain forward.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

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


def picked_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """[..., V] logits, [...] ids -> [...] log-softmax of each row at `temperature`, at its id."""
    scaled = upcast(logits)
    if temperature != 1.0:
        scaled = scaled / temperature
    return scaled.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(scaled, dim=-1)


@contextmanager
def head_at(model: Any, positions: torch.Tensor) -> Iterator[None]:
    """While inside: the output layer (`get_output_embeddings()`, the vocabulary projection) of `model` (a HF
    causal LM, or a DeepSpeed engine around one) runs only at the [N, T] boolean `positions` of its input, and
    the model's logits come back as [1, M, V] for the M selected positions in row-major order. The rest of the
    forward is unchanged; under ZeRO-3 the layer's own parameter hooks still run around it."""
    head = getattr(model, "module", model).get_output_embeddings()

    def select(_module: Any, args: tuple) -> tuple:
        hidden = args[0]
        if hidden.shape[:2] != positions.shape:
            raise RuntimeError(f"output layer input {tuple(hidden.shape)} does not match the positions "
                               f"{tuple(positions.shape)} it was told to keep")
        return (hidden[positions].unsqueeze(0), *args[1:])

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def masked_token_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, need: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """The plain forward, the vocabulary projection and log-softmax run only where a log-prob is wanted:
    [N, L] log p(input_ids[t] | input_ids[<t]) at the positions `need` marks (t >= 1), 0 elsewhere."""
    want = need[:, 1:] > 0  # [N, L-1]: token t+1's log-prob comes from the logits at t
    at = torch.nn.functional.pad(want, (0, 1))  # [N, L]: the positions whose logits are needed
    with head_at(model, at):
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[0]  # [M, V]
    lp = picked_logprobs(logits, input_ids[:, 1:][want], temperature)
    rest = torch.zeros(want.shape, dtype=lp.dtype, device=lp.device).masked_scatter(want, lp)
    return torch.nn.functional.pad(rest, (1, 0))


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


BUCKET_OVERHEAD_TOKENS = 64  # one more suffix forward must save at least this many padded tokens


def length_buckets(lengths: list[int], max_buckets: int, overhead_tokens: int = BUCKET_OVERHEAD_TOKENS
                   ) -> list[list[int]]:
    """Row indices in at most `max_buckets` groups of similar `lengths` (each sorted by length), minimising
    the padded tokens (rows x longest, summed over the groups) plus `overhead_tokens` per group beyond the first.
    Exact (dynamic programming over the sorted distinct lengths)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if max_buckets <= 1 or len(order) < 2:
        return [order]
    srt = [lengths[i] for i in order]
    # a group ends where the length changes (or at the last row): cut points are the indices after each run
    cuts = [j for j in range(1, len(srt)) if srt[j] != srt[j - 1]] + [len(srt)]
    inf = float("inf")
    # best[k][c]: cost of rows [0, cuts[c]) in k + 1 groups; back[k][c]: where its last group starts
    best = [[inf] * len(cuts) for _ in range(max_buckets)]
    back = [[0] * len(cuts) for _ in range(max_buckets)]
    for c, end in enumerate(cuts):
        best[0][c] = end * srt[end - 1]
    for k in range(1, max_buckets):
        for c, end in enumerate(cuts):
            for p in range(c):
                start = cuts[p]
                cost = best[k - 1][p] + (end - start) * srt[end - 1] + overhead_tokens
                if cost < best[k][c]:
                    best[k][c], back[k][c] = cost, p
    last = len(cuts) - 1
    k = min(range(max_buckets), key=lambda kk: (best[kk][last], kk))
    groups, c = [], last
    while k > 0:
        p = back[k][c]
        groups.append(order[cuts[p]:cuts[c]])
        c, k = p, k - 1
    groups.append(order[:cuts[c]])
    return groups[::-1]


def _cache_rows(cache: Any, index: torch.Tensor, in_place: bool) -> Any:
    """The prompt cache's rows `index` (autograd-tracked index_select) as a cache of their own; `in_place`
    reorders `cache` itself (its last use)."""
    if not in_place:
        layers = getattr(cache, "layers", None)
        if layers is None:
            raise RuntimeError("splitting a micro-batch into length buckets needs a transformers cache with "
                               "`.layers` (transformers >= 4.56); set learner.length_buckets=1")
        cache = copy.copy(cache)
        cache.layers = [copy.copy(layer) for layer in layers]
    cache.reorder_cache(index)
    return cache


def shared_prefix_logprobs(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, plan: PrefixPlan,
                           temperature: float, pad_id: int = 0, need: torch.Tensor | None = None,
                           max_buckets: int = 1) -> torch.Tensor:
    """[N, L] log p(input_ids[t] | input_ids[<t]) at `temperature` for every t from the row's first response
    token on, 0 before it; each distinct prompt runs through `model` (a HF causal LM) once. With `need` ([N, L],
    e.g. the response mask), only the positions it marks get log-probs (0 elsewhere), and the vocabulary
    projection runs only where they are scored. With `max_buckets` > 1 the suffixes run in up to that many
    forwards of rows of similar lengths (`length_buckets`), each padded to its own longest."""
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

    # 2. each row's suffix (from its first response token), right-padded, after its prompt's cache
    r_max = int((length - split).max())
    at = split.unsqueeze(1) + torch.arange(r_max, device=dev).unsqueeze(0)  # [N, R] positions in the row
    inside = at < length
    at_c = at.clamp(max=length - 1)
    r_ids = torch.where(inside, input_ids.gather(1, at_c), pad_id)
    r_mask = (inside & (attention_mask.gather(1, at_c) > 0)).long()
    want = (r_mask > 0) if need is None else (inside & (need.gather(1, at_c) > 0))  # [N, R] tokens scored
    first = picked_logprobs(first_logits[to_prompt], r_ids[:, 0], temperature)  # [N]
    # a row's suffix ends at its last scored token (what follows cannot change it); rows of similar lengths run
    # together, each bucket padded only to its own longest
    ends = torch.where(want, torch.arange(1, r_max + 1, device=dev), 0).amax(dim=1).clamp(min=1)  # [N]
    buckets = length_buckets(ends.tolist(), max_buckets, BUCKET_OVERHEAD_TOKENS)
    pieces: list[torch.Tensor] = []
    for b, idx_list in enumerate(buckets):
        idx = torch.tensor(idx_list, device=dev)
        rb = int(ends[idx].max())
        w = want[idx, :rb]
        # [U, ...] -> this bucket's rows, differentiable (index_select): gradients flow back to each prompt
        rows_cache = _cache_rows(cache, to_prompt[idx], in_place=b == len(buckets) - 1)
        with head_at(model, torch.nn.functional.pad(w[:, 1:], (0, 1))):  # suffix position k scores token k + 1
            out = model(input_ids=r_ids[idx, :rb], attention_mask=torch.cat([p_mask[to_prompt[idx]], r_mask[idx, :rb]],
                                                                             dim=1),
                        position_ids=at[idx, :rb], past_key_values=rows_cache, use_cache=True)
        rest = picked_logprobs(out.logits[0], r_ids[idx, 1:rb][w[:, 1:]], temperature)  # [M_b]
        placed = torch.nn.functional.pad(w[:, 1:], (0, r_max - rb))  # [n_b, R-1]
        pieces.append(torch.zeros(placed.shape, dtype=rest.dtype, device=dev).masked_scatter(placed, rest))
    order = torch.tensor([i for idx_list in buckets for i in idx_list], device=dev)
    rest_all = torch.cat(pieces)[torch.argsort(order)]  # back to the rows' order
    lp = torch.cat([torch.where(want[:, 0], first, 0.0).unsqueeze(1), rest_all], dim=1)  # [N, R]

    # back to the rows' layout
    back = torch.arange(length, device=dev).unsqueeze(0) - split.unsqueeze(1)  # [N, L]
    return torch.where(back >= 0, lp.gather(1, back.clamp(0, r_max - 1)), torch.zeros((), device=dev))
