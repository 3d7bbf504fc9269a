"""The DeepSpeed learner as Ray actors on CPU: real ZeRO-2/3 ranks training the tiny model.

One short run per ZeRO stage is shared by the tests of this module (each DeepSpeed start costs seconds);
every test asserts one property of it. Those runs keep the KL anchor to the initial model on (algo.kl_coef);
the resume test runs without it.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.ray, pytest.mark.slow]

GROUP_SIZE = 4
STEPS = 4
KL_COEF = 0.1
NICE = {2: 3}  # learner.nice of the ZeRO-2 run; the ZeRO-3 run leaves it unset (Ray's)


def make_batch(model_dir: str, n_groups: int = 4, prompt_len: int = 6, max_resp: int = 10, seed: int = 0,
               version: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded groups of random token ids with behaviour log-probs near the untrained model's."""
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    g = torch.Generator().manual_seed(seed)
    n, length = n_groups * GROUP_SIZE, prompt_len + max_resp
    ids = torch.randint(3, vocab, (n, length), generator=g)
    resp_len = torch.randint(3, max_resp + 1, (n,), generator=g)
    resp = torch.zeros(n, length)
    for i in range(n):
        resp[i, prompt_len:prompt_len + resp_len[i]] = 1
        ids[i, prompt_len + resp_len[i]:] = 0
    behaviour = (-torch.rand(n, length, generator=g) * 2 - 5.5) * resp
    return dict(input_ids=ids, response_mask=resp, behaviour_logprobs=behaviour,
                advantages=torch.randn(n, generator=g), policy_version=torch.full((n,), version, dtype=torch.long))


def learner_config(zero_stage: int, port: int, ranks: int = 2, *extra: str) -> Any:
    from rvpo_async.config import Config

    return Config().override(f"learner.num_ranks={ranks}", f"learner.zero_stage={zero_stage}",
                             f"learner.master_port={port}", "learner.micro_batch_size=4", "learner.lr=1e-3",
                             "learner.num_cpus=0.5", f"rollout.group_size={GROUP_SIZE}", *extra)


def ensure_ray() -> None:
    import ray

    if not ray.is_initialized():  # the same local instance conftest's ray_local starts
        ray.init(num_cpus=8, include_dashboard=False, object_store_memory=512 * 1024 * 1024,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
                                           "TOKENIZERS_PARALLELISM": "false"}})


def run(model_dir: str, zero_stage: int, port: int) -> dict[str, Any]:
    import ray

    from learner.actor import LearnerGroup
    from rvpo_async.loss import make_loss_fn

    ensure_ray()
    nice = [f"learner.nice={NICE[zero_stage]}"] if zero_stage in NICE else []
    cfg = learner_config(zero_stage, port, 2, f"algo.kl_coef={KL_COEF}", *nice)
    group = LearnerGroup(cfg, model_dir)
    try:
        before = group.state_digests()
        batch = make_batch(model_dir)
        stats = [group.train_step(batch, make_loss_fn(cfg.algo, 1.0)) for _ in range(STEPS)]
        return {"before": before, "after": group.state_digests(), "stats": stats, "version": group.version,
                "niceness": ray.get([a.niceness.remote() for a in group.actors])}
    finally:
        group.shutdown()


@pytest.fixture(scope="module")
def zero2_run(tiny_model_dir: str) -> dict[str, Any]:
    return run(tiny_model_dir, 2, 21200)


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dir: str) -> dict[str, Any]:
    return run(tiny_model_dir, 3, 21201)


def test_each_rank_trains_at_the_configured_niceness(zero2_run: dict[str, Any], zero3_run: dict[str, Any]) -> None:
    """learner.nice sets the niceness of the thread that runs a rank's steps (here below Ray's 15: this needs
    CAP_SYS_NICE, which root has); unset, a rank keeps what Ray gives every actor."""
    import os

    import ray

    if os.geteuid() != 0:
        pytest.skip("lowering a niceness needs CAP_SYS_NICE")
    ray_default = ray.get(ray.remote(lambda: os.getpriority(os.PRIO_PROCESS, 0)).remote())
    assert zero2_run["niceness"] == [NICE[2]] * 2 and NICE[2] != ray_default
    assert zero3_run["niceness"] == [ray_default] * 2


@pytest.mark.parametrize("stage", [2, 3])
def test_two_ranks_hold_identical_parameters_after_several_steps(stage: int, request: pytest.FixtureRequest) -> None:
    r = request.getfixturevalue(f"zero{stage}_run")
    assert len(r["after"]) == 2
    assert r["after"][0] == r["after"][1]
    assert r["after"][0] != r["before"][0]  # the steps did change the weights
    assert r["version"] == STEPS


def test_loss_on_a_fixed_batch_decreases_over_steps(zero2_run: dict[str, Any]) -> None:
    losses = [s["loss"] for s in zero2_run["stats"]]
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


def test_zero3_follows_the_same_loss_trajectory_as_zero2(zero2_run: dict[str, Any], zero3_run: dict[str, Any]) -> None:
    for a, b in zip(zero2_run["stats"], zero3_run["stats"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("stage", [2, 3])
def test_kl_to_the_initial_model_is_zero_at_the_first_step_and_positive_after_updates(
        stage: int, request: pytest.FixtureRequest) -> None:
    kl = [s["kl_ref"] for s in request.getfixturevalue(f"zero{stage}_run")["stats"]]
    assert kl[0] == pytest.approx(0.0, abs=1e-7)  # the policy is still the reference
    assert all(k > 0 for k in kl[1:]), kl
    assert kl[-1] > kl[1]


def test_step_stats_are_present_and_sane(zero2_run: dict[str, Any], tiny_model_dir: str) -> None:
    batch = make_batch(tiny_model_dir)
    tokens = float(batch["response_mask"].sum())
    for step, s in enumerate(zero2_run["stats"]):
        for key in ("loss", "is_weight_mean", "is_weight_max", "is_truncated_frac", "is_masked_frac", "clip_frac",
                    "kl_behaviour", "grad_norm", "staleness_mean", "staleness_max", "tokens_trained", "step_seconds"):
            assert key in s and math.isfinite(s[key]), (key, s)
        assert s["tokens_trained"] == tokens
        assert s["staleness_mean"] == s["staleness_max"] == step  # the batch was sampled at version 0
        assert 0 < s["is_weight_mean"] <= s["is_weight_max"]
        assert 0 <= s["is_truncated_frac"] <= 1 and s["is_masked_frac"] == 0 and 0 <= s["clip_frac"] <= 1
        assert s["grad_norm"] > 0 and s["step_seconds"] > 0 and s["kl_behaviour"] >= 0
        assert s["version"] == step + 1


def test_resume_reproduces_the_version_and_next_losses_of_an_uninterrupted_run(
        tiny_model_dir: str, tmp_path: Any) -> None:
    from learner.actor import LearnerGroup
    from learner.checkpoint import find_latest
    from rvpo_async.loss import make_loss_fn

    ensure_ray()
    # a warmup schedule makes the resumed LR depend on the restored scheduler state, Adam's moments the weights
    cfg = learner_config(2, 21202, 2, "learner.lr_schedule=linear", "learner.warmup_steps=2", "run.steps=6")
    loss_fn = make_loss_fn(cfg.algo, 1.0)
    batches = [make_batch(tiny_model_dir, seed=s) for s in range(4)]
    group = LearnerGroup(cfg, tiny_model_dir)
    try:
        for b in batches[:2]:
            group.train_step(b, loss_fn)
        saved = group.save_checkpoint(tmp_path, extra={"buffer": {"next_group_id": 17}})
        straight = [group.train_step(b, loss_fn) for b in batches[2:]]
        final_version = group.version
        assert "kl_ref" not in straight[0]  # kl_coef = 0: no reference model, no KL statistic
    finally:
        group.shutdown()
    assert find_latest(tmp_path) == saved

    resumed_group = LearnerGroup(learner_config(2, 21203, 2, "learner.lr_schedule=linear", "learner.warmup_steps=2",
                                                "run.steps=6"), tiny_model_dir)
    try:
        extra = resumed_group.load_checkpoint(tmp_path)
        assert resumed_group.version == 2 and extra == {"buffer": {"next_group_id": 17}}
        resumed = [resumed_group.train_step(b, loss_fn) for b in batches[2:]]
    finally:
        resumed_group.shutdown()
    assert resumed_group.version == final_version
    for a, b in zip(straight, resumed):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-6)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
