"""The data path with real parts: two vLLM rollout actors and a judge pool (rule judges, the vLLM-served
LLM judge, a judge past its deadline and one that raises) fill the Arrow group buffer; a weight update
changes an engine's log-probs and version; the judge pool is resized while work is in flight."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import pytest
import ray

from judge_fakes import EXTRA_BUILDERS
from rvpo_async.config import Config, JudgesConfig, JudgeSpec, RolloutConfig, load_config
from rvpo_async.types import STATUS_CODES

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SPECS = [
    JudgeSpec(name="length", kind="length", params={"min_chars": 5, "max_chars": 60}),
    JudgeSpec(name="keyword", kind="keywords", params={"words": ["safe"], "mode": "any"}),
    JudgeSpec(name="rubric", kind="llm", params={"rubric": "Is the answer polite?", "mode": "yesno"}),
    JudgeSpec(name="slow", kind="sleep", params={"seconds": 5.0}, timeout_s=0.5),  # type: ignore[arg-type]
    JudgeSpec(name="broken", kind="raise"),  # type: ignore[arg-type]
]
G, K = 4, len(SPECS)


def test_rollout_judges_and_buffer_fill_ready_groups(tiny_model_dir: str, ray_local: Any) -> None:
    from actors.buffer import BufferActor
    from actors.judges.pool import JudgePool, create_judge_engines
    from actors.rollout.call import RolloutActor
    from rvpo_async.buffer import to_torch
    from rvpo_async.task import load_prompts

    cfg = dataclasses.replace(
        Config(), judges=JudgesConfig(specs=SPECS, num_workers=1, min_workers=1, max_workers=3, concurrency=4,
                                      timeout_s=20.0, max_retries=1),
        rollout=RolloutConfig(group_size=G, max_new_tokens=12))
    engines = [RolloutActor.options(num_cpus=1).remote(f"rollout-{i}", tiny_model_dir, group_size=G,
                                                       max_new_tokens=12, seed=i) for i in range(2)]
    judge_engines = create_judge_engines(cfg, tiny_model_dir)
    pool = JudgePool(cfg, judge_engines, extra_builders=EXTRA_BUILDERS)
    buffer = BufferActor.options(max_concurrency=100).remote([s.name for s in SPECS], G, 64, 10)
    ray.get([e.ready.remote() for e in engines])

    from transformers import AutoTokenizer

    prompts = load_prompts(load_config(None, ["task.num_prompts=16"]), AutoTokenizer.from_pretrained(tiny_model_dir))
    try:
        # --- two engines generate at once; one round at version 0
        refs = [e.generate.remote(prompts[4 * i:4 * i + 4], list(range(4 * i, 4 * i + 4))) for i, e in enumerate(engines)]
        groups = [g for r in refs for g in ray.get(r)]
        assert {g.engine for g in groups} == {"rollout-0", "rollout-1"}
        assert all(g.policy_version == 0 and len(g.samples) == G for g in groups)
        assert all(len(s.logprobs) == len(s.token_ids) > 0 for g in groups for s in g.samples)

        # --- a weight update in place: log-probs change, the version advances, the engine keeps serving
        probe = groups[0]
        before = ray.get(engines[1].score_tokens.remote(probe.prompt.token_ids, probe.samples[0].token_ids))
        ray.get(engines[1].update_weights.remote(7, _perturbed_blob(tiny_model_dir)))
        after = ray.get(engines[1].score_tokens.remote(probe.prompt.token_ids, probe.samples[0].token_ids))
        assert ray.get(engines[1].get_version.remote()) == 7
        assert max(abs(a - b) for a, b in zip(before, after)) > 1e-3
        groups += ray.get(engines[1].generate.remote(prompts[8:12], list(range(8, 12))))
        assert [g.policy_version for g in groups[-4:]] == [7] * 4

        # --- judge everything, resizing the pool up and back down while work is in flight
        for g in groups:
            ray.get(buffer.put_group.remote(g))
            pool.submit(g)
        entries, resized = [], []
        deadline = time.monotonic() + 240
        while len(entries) < len(groups) * G * K and time.monotonic() < deadline:
            got = pool.poll(0.2)
            entries += got
            if got:
                ray.get(buffer.set_rewards.remote(got))
            if not resized and entries:
                pool.resize(3)
                resized.append(3)
            elif resized == [3] and len(entries) > len(groups) * G * K // 2:
                pool.resize(1)
                resized.append(1)
        assert len(entries) == len(groups) * G * K, "an entry was lost or the pool hung"
        assert resized == [3, 1]
        stats = pool.stats()
        assert sum(1 for w in stats["calls_by_worker"].values() if w > 0) >= 2, stats["calls_by_worker"]

        table = ray.get(buffer.pull.remote(len(groups), 7, min_groups=len(groups)))
        assert table is not None and table.num_rows == len(groups) * G
        batch = to_torch(table, 0)
        assert tuple(batch["rewards"].shape) == (len(groups), G, K)
        status = batch["reward_status"].numpy()
        names = [s.name for s in SPECS]
        assert (status[..., names.index("slow")] == STATUS_CODES["timeout"]).all()
        assert (status[..., names.index("broken")] == STATUS_CODES["error"]).all()
        for ok_judge in ("length", "keyword", "rubric"):
            assert (status[..., names.index(ok_judge)] == STATUS_CODES["ok"]).all(), ok_judge
        rubric = batch["rewards"][..., names.index("rubric")].numpy()
        assert np.isfinite(rubric).all() and (rubric >= 0).all() and (rubric <= 1).all()
        versions = sorted(set(table.column("policy_version").to_pylist()))
        assert versions == [0, 7]
        failures = stats["failures"]
        assert sum(failures.get("timeout", {}).values()) >= len(groups) * G
        assert sum(failures.get("error", {}).values()) >= len(groups) * G
    finally:
        pool.shutdown()
        for h in engines + list(judge_engines.values()) + [buffer]:
            ray.kill(h)


def _perturbed_blob(model_dir: str) -> bytes:
    """The model's weights with the embedding scaled: a known, different policy."""
    from safetensors.torch import load_file, save

    state = load_file(f"{model_dir}/model.safetensors")
    return save({k: (v * 1.5 if "embed_tokens" in k else v) for k, v in state.items()})
