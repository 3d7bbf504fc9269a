"""Weight sync from a real DeepSpeed learner (ZeRO-3, two ranks: the export is a collective gather) to the
streaming rollout engine the pipeline runs (vLLM AsyncLLM), by both transports: after a sync the engine
scores tokens exactly as a transformers forward pass with the learner's exported weights does, and a sync
that lands while responses are being generated interrupts them and they finish on the new weights."""

from __future__ import annotations

from typing import Any

import pytest
import torch

PROMPT = [5, 17, 42, 9, 101, 7]
RESPONSE = [33, 8, 250, 64, 12, 77, 3]
TRANSPORTS = ["object_store", "collective"]


def test_blob_and_buckets_round_trip_every_tensor_bit_for_bit() -> None:
    from safetensors.torch import load, save

    from rvpo_async.weight_format import flatten_bucket, plan_buckets, read_safetensors, safetensors_array, unflatten

    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(3, 5, generator=g), "b.bias": torch.randn(7, generator=g).to(torch.bfloat16),
             "c.idx": torch.arange(4), "d.scale": torch.randn((), generator=g)}
    blob = safetensors_array(state)
    for decoded in (dict(read_safetensors(blob)), load(bytes(blob))):  # ours and the reference reader
        assert set(decoded) == set(state)
        for k, v in state.items():
            assert decoded[k].dtype == v.dtype and torch.equal(decoded[k], v)
    assert dict(read_safetensors(save(state))).keys() == state.keys()  # and ours reads the reference's
    meta = plan_buckets([(k, v.dtype, list(v.shape)) for k, v in state.items()], bucket_bytes=32)
    assert sum(len(b["tensors"]) for b in meta) == len(state) and len(meta) > 3  # split by dtype and size
    got = {n: t for b in meta for n, t in unflatten(flatten_bucket(state, b), b["tensors"])}
    assert all(torch.equal(got[k], v) for k, v in state.items())


@pytest.mark.ray
def test_wait_landing_returns_when_a_newer_update_has_loaded_and_times_out_otherwise(ray_local) -> None:
    """The rollout loop's wait (object-store transport): a fake learner and an engine whose load takes 0.5 s
    stand in, since the property is the waiting logic; test_train runs it with the real parts."""
    import threading
    import time

    from learner.weight_sync import ObjectStoreSync

    ray = ray_local

    @ray.remote(num_cpus=0)
    class SlowEngine:
        def update_weights(self, version: int, blob: Any) -> int:
            time.sleep(0.5)
            return version

    class Learner:
        def export_blob(self) -> Any:
            return ray.put(b"weights")

    sync, engine = ObjectStoreSync(), SlowEngine.remote()
    t0 = time.monotonic()
    sync.wait_landing(-1, 0.2)  # nothing sent: waits its whole timeout
    assert time.monotonic() - t0 >= 0.2 and sync.landed() == -1
    threading.Timer(0.2, sync.sync, (Learner(), [engine], 1), {"wait": False}).start()
    t0 = time.monotonic()
    sync.wait_landing(-1, 30.0)  # woken by the send, then waits for the engine's load
    assert 0.6 <= time.monotonic() - t0 < 10.0 and sync.landed() == 1
    t0 = time.monotonic()
    sync.wait_landing(1, 0.2)  # version 1 has landed already; nothing newer comes
    assert time.monotonic() - t0 >= 0.2 and sync.landed() == 1
    ray.kill(engine)


@pytest.fixture(scope="module")
def setup(tiny_model_dir: str):
    import ray

    from actors.rollout.streaming import StreamingRolloutActor
    from learner.actor import LearnerGroup
    from learner.weight_sync import CollectiveSync, ObjectStoreSync
    from rvpo_async.config import Config

    if not ray.is_initialized():  # the same local instance conftest's ray_local starts
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                                           "TOKENIZERS_PARALLELISM": "false"}})
    cfg = Config().override("learner.num_ranks=2", "learner.zero_stage=3", "learner.master_port=21210",
                            "learner.num_cpus=0.5", "rollout.group_size=2")
    learner = LearnerGroup(cfg, tiny_model_dir)
    engine = StreamingRolloutActor.options(num_cpus=0.5, max_restarts=4).remote(
        "e0", tiny_model_dir, group_size=2, max_new_tokens=160, weight_update="interrupt",
        ignore_eos=True, engine_core="process")  # AsyncLLM here; the pipeline's default (inproc) in test_train
    syncs = {"object_store": ObjectStoreSync(), "collective": CollectiveSync(port=21220, addr="127.0.0.1")}
    yield learner, engine, syncs
    learner.shutdown()
    ray.kill(engine)


def learner_state(learner: Any) -> dict[str, torch.Tensor]:
    import ray
    from safetensors.torch import load

    return load(bytes(ray.get(learner.export_blob())))  # also proves the blob is standard safetensors


_FIRST_WEIGHTS: dict[int, dict[str, torch.Tensor]] = {}  # learner -> its weights before the first perturbation


def set_perturbed_weights(learner: Any, seed: int) -> None:
    """Deterministic known weights: every tensor of the learner's first weights scaled and shifted by seeded noise
    (from the same base each time: perturbing the last perturbation would grow the weights, and with them the
    log-probs and their fp32 rounding, with every test that ran before)."""
    from safetensors.torch import save

    base = _FIRST_WEIGHTS.setdefault(id(learner), learner_state(learner))
    g = torch.Generator().manual_seed(seed)
    state = {k: (v * 1.2 + 0.02 * torch.randn(v.shape, generator=g)).contiguous() for k, v in base.items()}
    learner.load_weights(save(state))


def reference_logprobs(model_dir: str, state: dict[str, torch.Tensor]) -> list[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected  # lm_head is tied to the embedding
    ids = torch.tensor([PROMPT + RESPONSE])
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits.float(), dim=-1)
    return [float(lp[0, t - 1, ids[0, t]]) for t in range(len(PROMPT), ids.shape[1])]


def restart(engine: Any, timeout_s: float = 120.0) -> None:
    """Kill the engine's process and wait until Ray has restarted it: same handle, fresh process."""
    import os
    import time

    import ray

    def pid(actor: Any) -> int:
        return os.getpid()

    old = ray.get(engine.__ray_call__.remote(pid))
    ray.kill(engine, no_restart=False)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if ray.get(engine.__ray_call__.remote(pid)) != old:
                return
        except ray.exceptions.RayActorError:
            time.sleep(0.5)
    raise TimeoutError(f"engine did not restart within {timeout_s}s")


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def max_rel_diff(a: list[float], b: list[float]) -> float:
    """Differences relative to the log-prob's size (at least 1): fp32 sums in another order differ by about
    the float's precision times the magnitude, and perturbed weights give log-probs of -40 and below."""
    return max(abs(x - y) / max(1.0, abs(y)) for x, y in zip(a, b))


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.ray
@pytest.mark.slow
def test_synced_engine_scores_like_transformers_with_the_learners_weights(
        setup: Any, transport: str, tiny_model_dir: str) -> None:
    import ray

    learner, engine, syncs = setup
    before = ray.get(engine.score_tokens.remote(PROMPT, RESPONSE))
    version = ray.get(engine.get_version.remote()) + 1
    set_perturbed_weights(learner, seed=TRANSPORTS.index(transport) + 1)
    seconds = syncs[transport].sync(learner, [engine], version)
    after = ray.get(engine.score_tokens.remote(PROMPT, RESPONSE))
    expected = reference_logprobs(tiny_model_dir, learner_state(learner))
    assert seconds > 0
    assert ray.get(engine.get_version.remote()) == version
    assert max_diff(after, expected) < 1e-4
    assert max_diff(after, before) > 1e-2


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.ray
@pytest.mark.slow
def test_restarted_engine_catches_up_to_the_latest_version(setup: Any, transport: str, tiny_model_dir: str) -> None:
    import ray

    learner, engine, syncs = setup
    sync = syncs[transport]
    version = ray.get(engine.get_version.remote()) + 1
    set_perturbed_weights(learner, seed=10 + TRANSPORTS.index(transport))
    sync.sync(learner, [engine], version)
    assert not sync.catch_up(learner, engine, version)  # up to date: nothing to push

    restart(engine)
    assert ray.get(engine.get_version.remote()) == 0
    assert sync.catch_up(learner, engine, version)
    assert ray.get(engine.get_version.remote()) == version
    after = ray.get(engine.score_tokens.remote(PROMPT, RESPONSE))
    assert max_diff(after, reference_logprobs(tiny_model_dir, learner_state(learner))) < 1e-4

    # and the next regular sync reaches it again
    set_perturbed_weights(learner, seed=20 + TRANSPORTS.index(transport))
    sync.sync(learner, [engine], version + 1)
    after_next = ray.get(engine.score_tokens.remote(PROMPT, RESPONSE))
    assert ray.get(engine.get_version.remote()) == version + 1
    assert max_diff(after_next, reference_logprobs(tiny_model_dir, learner_state(learner))) < 1e-4


@pytest.mark.ray
@pytest.mark.slow
def test_collective_sync_mid_generation_interrupts_responses_and_they_finish_on_the_new_weights(
        setup: Any, tiny_model_dir: str) -> None:
    """The gloo broadcast reaches an engine that is generating (rollout.weight_update=interrupt): the sync
    returns, the responses in flight are interrupted and finish on the new version, and the engine then
    scores as transformers does with the learner's weights."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    import ray

    from rvpo_async.types import Prompt

    learner, engine, syncs = setup
    version = ray.get(engine.get_version.remote()) + 1
    set_perturbed_weights(learner, seed=40)
    before = ray.get(engine.stats.remote())
    # not PROMPT itself: a scored prefix found in the prefix cache was computed in another batch shape
    prompts = [Prompt(f"p{i}", "", tuple(PROMPT[i:] + PROMPT[:i])) for i in (1, 2)]
    gen = engine.generate.remote(prompts, [0, 1], [3, 4])
    deadline = time.monotonic() + 60
    while ray.get(engine.stats.remote())["tokens_streamed"] - before["tokens_streamed"] < 40 * len(prompts):
        assert time.monotonic() < deadline, "the engine generated nothing"
        time.sleep(0.02)
    with ThreadPoolExecutor(1) as pool:  # a hung broadcast fails the test instead of stalling the suite
        pool.submit(syncs["collective"].sync, learner, [engine], version).result(timeout=120)
    assert syncs["collective"].landed() == version
    groups = ray.get(gen, timeout=120)
    after = ray.get(engine.stats.remote())
    assert after["version"] == version
    assert after["interrupted_samples"] > before["interrupted_samples"]
    samples = [s for g in groups for s in g.samples]
    assert all(len(s.token_ids) == 160 for s in samples)
    assert any(s.first_version < s.last_version == version for s in samples)  # resumed on the new weights
    scores = ray.get(engine.score_tokens.remote(PROMPT, RESPONSE))
    assert max_diff(scores, reference_logprobs(tiny_model_dir, learner_state(learner))) < 1e-4


def small_engine(name: str, tiny_model_dir: str, **kw: Any) -> Any:
    """A ready streaming engine of the tiny model: 2 samples a group, 4 new tokens."""
    import ray

    from actors.rollout.streaming import StreamingRolloutActor

    engine = StreamingRolloutActor.options(num_cpus=0.5).remote(name, tiny_model_dir, group_size=2, max_new_tokens=4,
                                                                **kw)
    ray.get(engine.ready.remote())
    return engine


@pytest.fixture(scope="module")
def in_place_engine(setup: Any, tiny_model_dir: str):
    import ray

    engine = small_engine("e-in-place", tiny_model_dir, weight_load="in_place")
    yield engine
    ray.kill(engine)


@pytest.fixture(scope="module")
def compiled_engine(setup: Any, tiny_model_dir: str):
    import ray

    engine = small_engine("e-compiled", tiny_model_dir, compile_model=True)
    yield engine
    ray.kill(engine)


def assert_scores_like_transformers_at_start_and_after_each_sync(setup: Any, engine: Any, tiny_model_dir: str,
                                                                first_seed: int) -> None:
    """The engine scores the checkpoint like transformers, then each update by each transport (a relative bound:
    its matmuls may not be the repacked kernels), and generates."""
    from pathlib import Path

    import ray
    from safetensors.torch import load_file

    from rvpo_async.types import Prompt

    learner, _, syncs = setup
    start = ray.get(engine.score_tokens.remote(PROMPT, RESPONSE))
    checkpoint = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    assert max_diff(start, reference_logprobs(tiny_model_dir, checkpoint)) < 1e-4
    previous = start
    for i, transport in enumerate(TRANSPORTS):
        version = ray.get(engine.get_version.remote()) + 1
        set_perturbed_weights(learner, seed=first_seed + i)
        syncs[transport].sync(learner, [engine], version)
        after = ray.get(engine.score_tokens.remote(PROMPT, RESPONSE))
        assert ray.get(engine.get_version.remote()) == version
        assert max_rel_diff(after, reference_logprobs(tiny_model_dir, learner_state(learner))) < 1e-5
        assert max_diff(after, start) > 1e-2 and max_diff(after, previous) > 1e-2
        previous = after
    groups = ray.get(engine.generate.remote([Prompt("p", "", tuple(PROMPT))], [0], [1]))
    assert len(groups[0].samples) == 2 and all(s.token_ids for s in groups[0].samples)


@pytest.mark.ray
@pytest.mark.slow
def test_in_place_engine_scores_like_transformers_at_start_and_after_each_sync(
        setup: Any, in_place_engine: Any, tiny_model_dir: str) -> None:
    """rollout.weight_load=in_place: plain weights filled from the checkpoint at start-up, then every update
    copied in place by the model's weight loaders, by either transport (the tied lm_head included); they run
    torch's own CPU matmuls, not the repacked kernels."""
    assert_scores_like_transformers_at_start_and_after_each_sync(setup, in_place_engine, tiny_model_dir, 30)


@pytest.mark.ray
@pytest.mark.slow
def test_compiled_engine_scores_like_transformers_at_start_and_after_each_sync(
        setup: Any, compiled_engine: Any, tiny_model_dir: str) -> None:
    """rollout.compile (configs/tiny-cpu.yaml): the inductor-compiled model serves every update it loads, by
    either transport, as the eager one does (its graph reads the reloaded weights, nothing is frozen in)."""
    assert_scores_like_transformers_at_start_and_after_each_sync(setup, compiled_engine, tiny_model_dir, 40)


def test_a_compiled_engine_refuses_in_place_weight_loading() -> None:
    from actors.rollout.streaming import StreamingRollout

    with pytest.raises(ValueError, match="rollout.compile needs rollout.weight_load=repack"):
        StreamingRollout("e", "/nonexistent", group_size=2, max_new_tokens=4, compile_model=True,
                         weight_load="in_place")
