"""The learner ranks read the pulled table themselves: two DeepSpeed ranks given the ObjectRef of a real
BufferActor's pull (pull_split) train exactly as when the driver read the table, built the batch
(rvpo_async.step_math.prepare_step) and handed it to LearnerGroup.train_step: same stats, same weights,
same step summary."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from ports import free_ports

pytestmark = [pytest.mark.ray, pytest.mark.slow]

G = 4
GROUPS_PER_STEP = 4
SPECS = "judges.specs=[{name: fmt, kind: regex, weight: 2.0, params: {pattern: x}}, {name: len, kind: length}]"


def config(port: int) -> Any:
    from rvpo_async.config import load_config

    return load_config(None, [SPECS, "learner.num_ranks=2", "learner.zero_stage=2", f"learner.master_port={port}",
                              "learner.micro_batch_size=4", "learner.lr=1e-3", "learner.num_cpus=0.5",
                              f"rollout.group_size={G}", "staleness.max_staleness=2", "run.steps=2",
                              "algo.k_risk_schedule=linear"])


def fill_buffer(buffer: Any, model_dir: str, n_groups: int) -> list[Any]:
    """n_groups groups of random tokens at policy version 0, each with one timed-out reward entry."""
    import ray
    from transformers import AutoConfig

    from rvpo_async.types import JudgeResult, Prompt, RolloutGroup, Sample

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    rng = np.random.default_rng(0)
    prompts, groups = [], []
    for gid in range(n_groups):
        prompt = Prompt(f"p{gid}", "t", tuple(int(t) for t in rng.integers(3, vocab, 6)))
        samples = []
        for i in range(G):
            n = int(rng.integers(3, 11))
            samples.append(Sample(tuple(int(t) for t in rng.integers(3, vocab, n)),
                                  tuple(float(x) for x in -rng.random(n) * 2 - 5.5), "stop", f"r{gid}.{i}"))
        prompts.append(prompt)
        groups.append(RolloutGroup(gid, prompt, tuple(samples), 0, "engine-0", 1000.0 + gid))
    ray.get([buffer.put_group.remote(g) for g in groups])
    entries = [(gid, i, k, JudgeResult(math.nan, "timeout", 1.0) if (gid, i, k) == (gid, gid % G, 0)
                else JudgeResult(float(rng.random()), "ok", 0.01))
               for gid in reversed(range(n_groups)) for i in range(G) for k in range(2)]
    ray.get(buffer.set_rewards.remote(entries))
    return prompts


def test_ranks_training_from_the_table_ref_match_train_step_on_the_driver_built_batch(
        tiny_model_dir: str, ray_local: Any) -> None:
    import ray
    import torch

    from actors.buffer import create_buffer_actor
    from learner.actor import LearnerGroup
    from rvpo_async.loss import make_loss_fn
    from rvpo_async.step_math import StepContext, prepare_step

    port_a, port_b = free_ports(range(21340, 21360), 2)
    cfg = config(port_a)
    buffer = create_buffer_actor(cfg, cfg.reward_names, persist_dir=None)
    try:
        prompts = fill_buffer(buffer, tiny_model_dir, 2 * GROUPS_PER_STEP)
        pulls = [buffer.pull_split.remote(GROUPS_PER_STEP, v, min_groups=GROUPS_PER_STEP) for v in (0, 1)]
        metas = ray.get([m for m, _ in pulls])
        assert metas == [{"groups": GROUPS_PER_STEP, "rows": GROUPS_PER_STEP * G}] * 2
        tables = [t for _, t in pulls]
    finally:
        ray.kill(buffer)  # the pulled tables live on in the object store, owned by this process
    ctx = StepContext.from_config(cfg, prompts, pad_id=0)
    loss_fn = make_loss_fn(cfg.algo, 1.0)

    # the driver's path: read the table, build the batch, train_step splits it across the ranks
    old_group = LearnerGroup(cfg, tiny_model_dir)
    try:
        before = old_group.state_digests()
        old = []
        for ref in tables:
            batch, info = prepare_step(ray.get(ref), pad_id=ctx.pad_id, algo=cfg.algo,
                                       learner_version=old_group.version, total_steps=cfg.run.steps,
                                       rubric=ctx.rubric)
            old.append((old_group.train_step(batch, loss_fn), info))
        old_digests = old_group.state_digests()
    finally:
        old_group.shutdown()

    # the ranks' path: every rank gets the ref and builds the batch itself
    new_group = LearnerGroup(config(port_b), tiny_model_dir)
    try:
        with pytest.raises(RuntimeError, match="without a step context"):
            new_group.train_from_table(tables[0], loss_fn)
        assert new_group.version == 0
        new = [new_group.train_from_table(tables[0], loss_fn, ctx)]  # a context passed with the call
        new_group.set_step_context(ctx)  # or handed to the ranks once
        new.append(new_group.train_from_table(tables[1], loss_fn))
        new_digests = new_group.state_digests()
        assert new_group.version == 2
    finally:
        new_group.shutdown()

    assert old_digests[0] == old_digests[1] != before[0]
    assert new_digests == old_digests
    for (old_stats, old_info), (new_stats, new_info) in zip(old, new):
        assert old_stats.keys() == new_stats.keys()
        assert {k: v for k, v in new_stats.items() if k != "step_seconds"} == \
            {k: v for k, v in old_stats.items() if k != "step_seconds"}
        assert new_info.keys() == old_info.keys()
        for key in old_info:
            if key == "diag":
                for d in old_info[key]:
                    torch.testing.assert_close(new_info[key][d], old_info[key][d], rtol=0, atol=0, equal_nan=True)
            else:
                assert new_info[key] == old_info[key], key
    assert [i["staleness_values"] for _, i in new] == [[0] * GROUPS_PER_STEP, [1] * GROUPS_PER_STEP]
    assert [i["k_risk"] for _, i in new] == [0.5, 2.0]  # linear over run.steps=2: the learner's version counts
    assert [i["group_ids"] for _, i in new] == [[4, 5, 6, 7], [0, 1, 2, 3]]  # scored first, pulled first
    assert new[1][0]["sequences"] == GROUPS_PER_STEP * G and new[1][0]["version"] == 2.0
