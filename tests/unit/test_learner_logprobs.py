"""learner/logprobs.py: each distinct prompt run once, its responses after its KV cache, against the plain forward.

The tiny Qwen2 in float64 throughout: the shared-prefix log-probs of every response token, and the gradients of a
loss on them, equal the plain forward's (token_logprobs over the whole padded row) to float64 rounding. (HF's
RMSNorm computes in float32 whatever its input; here it keeps float64, or float32 rounding, which depends on the
batch's shape, would hide a real difference at 1e-7.)
"""

from __future__ import annotations

from typing import Iterator

import pytest
import torch

from learner.engine import derive_attention_mask
import learner.logprobs as logprobs_mod
from learner.logprobs import (length_buckets, masked_token_logprobs, plan_prefix, shared_prefix_logprobs,
                              token_logprobs)

TEMPERATURE = 0.9


def grouped_batch(vocab: int, prompt_lens: list[int], group: int, max_resp: int, seed: int = 0
                  ) -> dict[str, torch.Tensor]:
    """Right-padded rows: `group` responses of random length 1..max_resp to each prompt (lengths differ)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for plen in prompt_lens:
        prompt = torch.randint(3, vocab, (plen,), generator=g)
        for _ in range(group):
            rlen = int(torch.randint(1, max_resp + 1, (1,), generator=g))
            rows.append((prompt, torch.randint(3, vocab, (rlen,), generator=g)))
    length = max(len(p) + len(r) for p, r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    resp = torch.zeros(len(rows), length)
    for i, (p, r) in enumerate(rows):
        ids[i, :len(p)], ids[i, len(p):len(p) + len(r)] = p, r
        resp[i, len(p):len(p) + len(r)] = 1
    return {"input_ids": ids, "response_mask": resp}


def rms_norm_float64(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


@pytest.fixture(scope="module")
def model64(tiny_model_dir: str) -> Iterator[torch.nn.Module]:
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    model.config.use_cache = False
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(modeling_qwen2.Qwen2RMSNorm, "forward", rms_norm_float64)
        yield model.train()


def forwards(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, dict]:
    """(log-probs, gradients, rows through the output layer) of a response-masked sum, by the plain forward
    ("plain"), the plain forward with the output layer at the response tokens only ("plain_masked"), the
    shared-prefix one ("shared") and the shared-prefix one with the output layer at the response tokens only
    ("shared_masked")."""
    ids, resp = batch["input_ids"], batch["response_mask"].double()
    attn = derive_attention_mask(batch)
    plan = plan_prefix(ids, attn, resp)
    assert plan is not None
    head_rows: list[int] = []  # one entry per call of the output layer
    hook = model.get_output_embeddings().register_forward_hook(
        lambda _m, args, _out: head_rows.append(args[0].shape[:-1].numel()))
    out = {}
    # a loss that weighs each token differently, so that a misplaced token would show in the gradients
    weights = torch.linspace(0.5, 1.5, ids.numel(), dtype=torch.float64).reshape(ids.shape) * resp
    try:
        for name, fn in (
                ("plain", lambda: token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids, TEMPERATURE)),
                ("plain_masked", lambda: masked_token_logprobs(model, ids, attn, resp, TEMPERATURE)),
                ("shared", lambda: shared_prefix_logprobs(model, ids, attn, plan, TEMPERATURE)),
                ("shared_masked", lambda: shared_prefix_logprobs(model, ids, attn, plan, TEMPERATURE, need=resp)),
                ("shared_buckets", lambda: shared_prefix_logprobs(model, ids, attn, plan, TEMPERATURE, need=resp,
                                                                  max_buckets=3))):
            model.zero_grad()
            head_rows.clear()
            lp = fn()
            (lp * weights).sum().backward()
            out[name] = {"lp": lp.detach() * resp, "raw": lp.detach(), "head_rows": sum(head_rows),
                         "head_calls": len(head_rows),
                         "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    finally:
        hook.remove()
    return out


def plain_and_shared(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    out = forwards(model, batch)
    return out["plain"], out["shared"]


def test_shared_prefix_log_probs_and_gradients_equal_the_plain_forward_in_float64(model64: torch.nn.Module) -> None:
    vocab = model64.config.vocab_size
    # prompts of different lengths (left padding inside the prompt forward), responses of different lengths
    batch = grouped_batch(vocab, prompt_lens=[7, 5, 9, 7], group=4, max_resp=6)
    plain, shared = plain_and_shared(model64, batch)
    assert float(plain["lp"].abs().max()) > 1.0  # real log-probs, not zeros
    torch.testing.assert_close(shared["lp"], plain["lp"], rtol=0, atol=1e-10)
    assert len(plain["grads"]) > 0
    for name, grad in plain["grads"].items():
        assert float(grad.abs().max()) > 0, name  # every parameter, the embeddings included, gets gradient
        torch.testing.assert_close(shared["grads"][name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_shared_prefix_handles_unmasked_tokens_inside_a_response_and_unshared_rows(model64: torch.nn.Module) -> None:
    vocab = model64.config.vocab_size
    batch = grouped_batch(vocab, prompt_lens=[6, 6], group=3, max_resp=8, seed=1)
    # a multi-turn row: tokens the loss does not train (a tool's output) between trained ones
    resp = batch["response_mask"]
    row = int(torch.nonzero(resp.sum(1) >= 5)[0])
    first = int(torch.nonzero(resp[row])[0])
    resp[row, first + 1:first + 3] = 0
    # a row whose prompt no other row shares
    batch["input_ids"][0, :3] = torch.tensor([3, 4, 5])
    plain, shared = plain_and_shared(model64, batch)
    torch.testing.assert_close(shared["lp"], plain["lp"], rtol=0, atol=1e-10)
    for name, grad in plain["grads"].items():
        torch.testing.assert_close(shared["grads"][name], grad, rtol=1e-9, atol=1e-10, msg=name)


def test_the_output_layer_runs_only_at_trained_tokens_and_changes_no_number(model64: torch.nn.Module) -> None:
    """With `need` = the response mask, the vocabulary projection sees one row per trained token (the prompt's
    last position included for the first response token) and nothing at padding or untrained tokens; the
    log-probs of the trained tokens and every gradient equal the plain forward's to float64 rounding, and every
    other position is exactly 0."""
    vocab = model64.config.vocab_size
    batch = grouped_batch(vocab, prompt_lens=[7, 5, 7], group=4, max_resp=9, seed=2)
    resp = batch["response_mask"]
    row = int(torch.nonzero(resp.sum(1) >= 5)[0])
    first = int(torch.nonzero(resp[row])[0])
    resp[row, first + 1:first + 3] = 0  # untrained tokens inside a response
    out = forwards(model64, batch)
    trained = int(resp.sum())
    n, length = batch["input_ids"].shape
    assert out["plain"]["head_rows"] == n * length  # every position of every row
    assert out["plain_masked"]["head_rows"] == trained
    assert out["shared_masked"]["head_rows"] == plan_prefix(
        batch["input_ids"], derive_attention_mask(batch), resp.double()).num_prompts + trained - n
    assert out["shared_masked"]["head_rows"] < out["shared"]["head_rows"]
    for name in ("plain_masked", "shared_masked"):
        torch.testing.assert_close(out[name]["lp"], out["plain"]["lp"], rtol=0, atol=1e-10, msg=name)
        assert bool((out[name]["raw"][resp == 0] == 0).all()), name
        for p, grad in out["plain"]["grads"].items():
            torch.testing.assert_close(out[name]["grads"][p], grad, rtol=1e-9, atol=1e-10, msg=f"{name} {p}")


def test_responses_in_length_buckets_give_the_same_log_probs_and_gradients(model64: torch.nn.Module,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Suffixes split into forwards of similar lengths (each with its own selection of the prompts' cache):
    the same log-probs and gradients as one forward, to float64 rounding."""
    monkeypatch.setattr(logprobs_mod, "BUCKET_OVERHEAD_TOKENS", 0)  # split wherever it saves a padded token
    batch = grouped_batch(model64.config.vocab_size, prompt_lens=[7, 5, 7], group=4, max_resp=9, seed=3)
    out = forwards(model64, batch)
    assert out["shared_buckets"]["head_calls"] == 1 + 3  # the prompts, then three buckets of suffixes
    assert out["shared_masked"]["head_calls"] == 1 + 1
    assert out["shared_buckets"]["head_rows"] == out["shared_masked"]["head_rows"]
    torch.testing.assert_close(out["shared_buckets"]["raw"], out["shared_masked"]["raw"], rtol=0, atol=1e-10)
    torch.testing.assert_close(out["shared_buckets"]["lp"], out["plain"]["lp"], rtol=0, atol=1e-10)
    for p, grad in out["plain"]["grads"].items():
        torch.testing.assert_close(out["shared_buckets"]["grads"][p], grad, rtol=1e-9, atol=1e-10, msg=p)


def test_length_buckets_are_the_cheapest_split() -> None:
    """Against every split of the sorted rows into at most k contiguous groups (brute force)."""
    import itertools
    import random

    def cost(groups: list[list[int]], lengths: list[int], overhead: int) -> int:
        return sum(len(g) * max(lengths[i] for i in g) for g in groups) + overhead * (len(groups) - 1)

    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 9))]
        k, overhead = rng.randint(1, 4), rng.choice([0, 3, 10])
        groups = length_buckets(lengths, k, overhead)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
        assert 1 <= len(groups) <= k and all(groups)
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        best = min(cost([order[a:b] for a, b in zip((0, *cut), (*cut, len(order)))], lengths, overhead)
                   for m in range(min(k, len(order)))
                   for cut in itertools.combinations(range(1, len(order)), m))
        assert cost(groups, lengths, overhead) == best, (lengths, k, overhead, groups)


def test_plan_finds_each_distinct_prompt_once() -> None:
    batch = grouped_batch(50, prompt_lens=[4, 6, 4], group=3, max_resp=3, seed=2)
    plan = plan_prefix(batch["input_ids"], derive_attention_mask(batch), batch["response_mask"])
    assert plan is not None and plan.num_prompts == 3
    assert plan.row_to_prompt.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert plan.prompt_rows.tolist() == [0, 3, 6]
    assert plan.split.tolist() == [4, 4, 4, 6, 6, 6, 4, 4, 4]


def test_plan_declines_batches_the_shared_path_does_not_fit() -> None:
    batch = grouped_batch(50, prompt_lens=[4, 5], group=2, max_resp=3, seed=3)
    ids, resp = batch["input_ids"], batch["response_mask"]
    attn = derive_attention_mask(batch)
    # no two rows share a prompt: the plain forward is as cheap
    unique = ids.clone()
    unique[:, 0] = torch.arange(4) + 3
    assert plan_prefix(unique, attn, resp) is None
    # a row that trains no token
    empty = resp.clone()
    empty[1] = 0
    assert plan_prefix(ids, attn, empty) is None
    # padding inside a prompt (a left-padded row)
    holed = attn.clone()
    holed[0, 0] = 0
    assert plan_prefix(ids, holed, resp) is None
    # a response from the first position: no prompt to share
    no_prompt = resp.clone()
    no_prompt[0, 0] = 1
    assert plan_prefix(ids, attn, no_prompt) is None
