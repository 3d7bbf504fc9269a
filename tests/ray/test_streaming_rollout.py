"""The streaming rollout engine (actors/rollout/streaming.py) on the real vLLM and the tiny model, with its engine
core in a process of its own (AsyncLLM, `rollout.engine_core: process`) and stepped in the actor's process
(actors/rollout/inproc.py, `inproc`)."""

from __future__ import annotations

import glob
import math
import time

import pytest
import ray
import torch

from rvpo_async.types import Prompt

pytestmark = pytest.mark.slow

G = 4


def _prompts(n: int, length: int = 12, cap: int | None = None) -> list[Prompt]:
    meta = {} if cap is None else {"max_new_tokens": cap}  # a prompt's own response budget
    return [Prompt(f"p{i}", f"prompt {i}", tuple(range(20 + i, 20 + i + length)), meta) for i in range(n)]


def _state(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(glob.glob(f"{model_dir}/*.safetensors")[0])


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in state.items()}


def _token_logprobs(model_dir: str, state: dict[str, torch.Tensor], prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(response[t] | prompt + response[:t]) under `state`, by a transformers fp32 forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    model.eval()
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None])[:, 0]


@pytest.fixture(scope="module")
def engine_factory(tiny_model_dir, ray_module):
    """One engine per weight-update mode and engine core for the module (each takes ~10 s to start)."""
    from actors.rollout.streaming import StreamingRolloutActor

    made: dict[tuple[str, str], object] = {}

    def make(weight_update: str, engine_core: str = "process"):
        key = (weight_update, engine_core)
        if key not in made:
            h = StreamingRolloutActor.options(num_cpus=0.5).remote(
                f"{weight_update}-{engine_core}", tiny_model_dir, group_size=G, max_new_tokens=160, seed=0,
                weight_update=weight_update, engine_core=engine_core)
            ray.get(h.ready.remote())
            made[key] = h
        return made[key]

    yield make
    for h in made.values():
        ray.kill(h)


def _update_mid_generation(engine, prompts, blob, version: int, drain: bool = False):
    """Update the weights while `prompts` are being generated. An interrupting engine streams each token, so
    the update comes after 40 tokens a prompt; a draining one takes each sample whole at its end, so it comes
    once a sample has ended while others are still generating."""
    before = ray.get(engine.stats.remote())["tokens_streamed"]  # the engine may have served other tests
    ref = engine.generate.remote(prompts, list(range(len(prompts))), [100 + i for i in range(len(prompts))])
    deadline = time.monotonic() + 60
    while True:
        s = ray.get(engine.stats.remote())
        done = s["tokens_streamed"] - before
        if (done > 0 and s["in_flight_requests"] > 0) if drain else done >= 40 * len(prompts):
            break
        assert time.monotonic() < deadline, "the engine generated nothing"
        time.sleep(0.02)
    assert ray.get(engine.update_weights.remote(version, blob)) == version
    return ray.get(ref)


@pytest.mark.parametrize("core", ["process", "inproc"])
def test_same_seeds_give_the_same_groups(engine_factory, core):
    eng = engine_factory("drain", core)
    prompts = _prompts(4, cap=24)
    a = ray.get(eng.generate.remote(prompts, [0, 1, 2, 3], [7, 8, 9, 10]))
    b = ray.get(eng.generate.remote(prompts, [0, 1, 2, 3], [7, 8, 9, 10]))
    assert [g.samples for g in a] == [g.samples for g in b]
    assert all(len(g.samples) == G and all(len(s.token_ids) <= 24 for s in g.samples) for g in a)
    assert len({s.token_ids for s in a[0].samples}) > 1  # sample j draws with seed + j, not one stream


def test_the_in_process_engine_core_samples_what_the_process_one_does(engine_factory):
    prompts = _prompts(4, cap=24)
    a, b = (ray.get(engine_factory("drain", core).generate.remote(prompts, [0, 1, 2, 3], [7, 8, 9, 10]))
            for core in ("process", "inproc"))
    for ga, gb in zip(a, b):
        assert [s.token_ids for s in ga.samples] == [s.token_ids for s in gb.samples]
        for sa, sb in zip(ga.samples, gb.samples):
            assert sa.logprobs == pytest.approx(sb.logprobs, abs=1e-5)


@pytest.mark.parametrize("core", ["process", "inproc"])
def test_interrupted_samples_keep_the_logprobs_of_the_weights_that_sampled_each_token(engine_factory, tiny_model_dir,
                                                                                      core):
    """A weight update lands mid-response; token by token, the behaviour log-prob is that of the weights
    that sampled the token: version 0 up to the interruption, version 1 after it (fp32, 1e-4)."""
    from rvpo_async.weight_format import safetensors_array

    eng = engine_factory("interrupt", core)
    v0 = _state(tiny_model_dir)
    v1 = _perturbed(v0, 1)
    prompts = _prompts(2)
    groups = _update_mid_generation(eng, prompts, safetensors_array(v1), 1)
    stats = ray.get(eng.stats.remote())
    assert stats["interrupted_samples"] > 0 and stats["reprefilled_tokens"] > 0
    mixed = 0
    for g in groups:
        assert g.policy_version == min(s.first_version for s in g.samples)  # staleness from the oldest token
        for s in g.samples:
            got = torch.tensor(s.logprobs, dtype=torch.float64)
            under0 = _token_logprobs(tiny_model_dir, v0, list(g.prompt.token_ids), list(s.token_ids))
            under1 = _token_logprobs(tiny_model_dir, v1, list(g.prompt.token_ids), list(s.token_ids))
            match0 = (got - under0).abs() < 1e-4
            match1 = (got - under1).abs() < 1e-4
            # the switch point: the first token version 0 did not sample
            cut = int((~match0).nonzero()[0]) if not bool(match0.all()) else len(s.token_ids)
            assert bool(match0[:cut].all()) and bool(match1[cut:].all()), (s.first_version, s.last_version, cut)
            assert (s.first_version, s.last_version) == (0 if cut > 0 else 1, 1 if cut < len(s.token_ids) else 0)
            mixed += 0 < cut < len(s.token_ids)
    assert mixed > 0, "no sample was interrupted mid-response"


@pytest.mark.parametrize("core", ["process", "inproc"])
def test_drain_never_mixes_two_versions_in_one_response(engine_factory, tiny_model_dir, core):
    from rvpo_async.weight_format import safetensors_array

    eng = engine_factory("drain", core)
    groups = _update_mid_generation(eng, _prompts(2, cap=96), safetensors_array(_perturbed(_state(tiny_model_dir), 2)), 1,
                                    drain=True)
    assert all(s.first_version == s.last_version == 0 for g in groups for s in g.samples)
    stats = ray.get(eng.stats.remote())
    assert stats["interrupted_samples"] == 0 and stats["version"] == 1
    # a weight update arriving while a submit is entering its requests neither deadlocks nor mixes versions
    blob = safetensors_array(_state(tiny_model_dir))
    for v in range(2, 6):
        gen = eng.generate.remote(_prompts(3, cap=32), [0, 1, 2], [v, v + 1, v + 2])
        upd = eng.update_weights.remote(v, blob)
        groups, got = ray.get([gen, upd], timeout=120)
        assert got == v
        assert all(s.first_version == s.last_version == g.policy_version for g in groups for s in g.samples)


@pytest.mark.parametrize("core", ["process", "inproc"])
def test_in_flight_updates_go_on_with_every_sample_and_tag_each_token_with_the_weights_that_sampled_it(
        engine_factory, tiny_model_dir, core):
    """rollout.weight_update=in_flight: the update lands between two engine steps while samples are being
    generated; none is aborted, re-prefilled or waited for, and each token's version names the weights that
    sampled it. The new weights zero the final norm, so each token they sample has log-prob -log(vocab)
    exactly (zero logits); the tokens before the switch are those of an fp32 forward of the old weights (1e-4)."""
    from transformers import AutoConfig

    from rvpo_async.weight_format import safetensors_array

    eng = engine_factory("in_flight", core)
    v0 = _state(tiny_model_dir)
    flat = {**v0, "model.norm.weight": torch.zeros_like(v0["model.norm.weight"])}
    uniform = -math.log(AutoConfig.from_pretrained(tiny_model_dir).vocab_size)
    prompts = _prompts(2)
    before = ray.get(eng.stats.remote())
    ref = eng.generate.remote(prompts, [0, 1], [200, 201])
    deadline = time.monotonic() + 60
    while True:  # samples come whole at their end: update once one has ended and others still generate
        s = ray.get(eng.stats.remote())
        if s["tokens_streamed"] > before["tokens_streamed"] and s["in_flight_requests"] > 0:
            break
        assert time.monotonic() < deadline, "the engine generated nothing"
        time.sleep(0.02)
    assert ray.get(eng.update_weights.remote(1, safetensors_array(flat))) == 1
    assert ray.get(eng.stats.remote())["in_flight_requests"] > 0  # the update did not wait for them to end
    groups = ray.get(ref)
    after = ray.get(eng.stats.remote())
    for key in ("interrupted_samples", "reprefilled_tokens", "interruptions"):
        assert after[key] == before[key], key
    mixed = 0
    for g in groups:
        assert g.policy_version == min(s.first_version for s in g.samples)  # staleness from the oldest token
        for s in g.samples:
            got = torch.tensor(s.logprobs, dtype=torch.float64)
            new = (got - uniform).abs() < 1e-5
            cut = int(new.nonzero()[0]) if bool(new.any()) else len(s.token_ids)
            assert bool(new[cut:].all()), "a token after the switch was not sampled by the new weights"
            if cut:
                under0 = _token_logprobs(tiny_model_dir, v0, list(g.prompt.token_ids), list(s.token_ids[:cut]))
                assert torch.allclose(got[:cut], under0, atol=1e-4)
            assert (s.first_version, s.last_version) == (0 if cut > 0 else 1, 1 if cut < len(s.token_ids) else 0)
            mixed += 0 < cut < len(s.token_ids)
    assert mixed > 0, "no sample went on across the update"


def test_in_flight_requests_never_read_a_prompt_cached_by_older_weights(engine_factory, tiny_model_dir):
    """in_flight never empties vLLM's prefix cache (requests in flight hold it): a prompt cached under one
    version must not serve a request of a later one. A 140-token prompt (one full 128-token cache block) is
    generated under the model's weights, then again after an update to perturbed weights: its log-probs are
    those of an fp32 forward of the new weights (1e-4), which a reused block of the old keys and values breaks."""
    from rvpo_async.weight_format import safetensors_array

    eng = engine_factory("in_flight", "inproc")
    v0 = _state(tiny_model_dir)
    v = ray.get(eng.get_version.remote())
    long = [Prompt("long", "long", tuple(20 + i for i in range(140)), {"max_new_tokens": 8})]
    ray.get(eng.update_weights.remote(v + 1, safetensors_array(v0)))
    ray.get(eng.generate.remote(long, [0], [1]))  # its first block cached under version v + 1
    v2 = _perturbed(v0, 3)
    ray.get(eng.update_weights.remote(v + 2, safetensors_array(v2)))
    group = ray.get(eng.generate.remote(long, [1], [2]))[0]
    for s in group.samples:
        assert s.first_version == s.last_version == v + 2
        want = _token_logprobs(tiny_model_dir, v2, list(long[0].token_ids), list(s.token_ids))
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), want, atol=1e-4)


@ray.remote
class _Sink:
    """Stands in for the judge pool actor: records what it is sent."""

    def __init__(self) -> None:
        self.got: list[int] = []

    def submit(self, group) -> None:
        self.got.append(group.group_id)

    def ids(self) -> list[int]:
        return self.got


def test_submitted_groups_go_to_the_buffer_and_the_judges_not_back_to_the_caller(engine_factory):
    from actors.buffer import BufferActor

    eng = engine_factory("drain")
    buffer = BufferActor.remote(["r"], G, 16, 2)
    sink = _Sink.remote()
    ray.get(eng.connect.remote(buffer, sink))
    assert ray.get(eng.submit.remote(_prompts(3, cap=16), [5, 6, 7], [1, 2, 3])) == 3
    delivered: list[dict] = []
    deadline = time.monotonic() + 60
    while len(delivered) < 3:
        assert time.monotonic() < deadline
        got = ray.get(eng.poll.remote())
        assert not got["failed"]
        delivered += got["delivered"]
        time.sleep(0.02)
    assert sorted(d["group_id"] for d in delivered) == [5, 6, 7]
    assert all(set(d) == {"group_id", "tokens", "samples", "policy_version"} for d in delivered)
    assert sorted(ray.get(sink.ids.remote())) == [5, 6, 7]
    assert ray.get(buffer.stats.remote())["groups"]["pending"] == 3


def test_min_new_tokens_keeps_every_response_going_to_its_budget(engine_factory, tiny_model_dir):
    """`rollout.min_new_tokens`: with the same seeds, responses that end early without it run to the budget
    with it (vLLM's min_tokens masks the end token until then)."""
    from actors.rollout.streaming import StreamingRolloutActor

    prompts, ids, seeds = _prompts(4, cap=160), [0, 1, 2, 3], [40, 41, 42, 43]
    free = ray.get(engine_factory("drain", "inproc").generate.remote(prompts, ids, seeds))
    short = [len(s.token_ids) for g in free for s in g.samples if len(s.token_ids) < 160]
    assert short, "no response ended early without min_new_tokens: the test would show nothing"
    eng = StreamingRolloutActor.options(num_cpus=0.5).remote("min-tokens", tiny_model_dir, group_size=G,
                                                             max_new_tokens=160, seed=0, min_new_tokens=160)
    try:
        held = ray.get(eng.generate.remote(prompts, ids, seeds), timeout=180)
    finally:
        ray.kill(eng)
    assert all(len(s.token_ids) == 160 and s.finish_reason == "length" for g in held for s in g.samples)
