"""rvpo_async.step_math: the batch and summary of a training step built from a pulled table, without Ray.
Checked against the computation Stepper.train_on did inline before it called prepare_step, and the
advantages against the float64 NumPy reference."""

from __future__ import annotations

import hashlib
import math
import pickle

import numpy as np
import pytest
import torch

import reference
from rvpo_async.algo import advantages, reward_diagnostics
from rvpo_async.buffer import GroupBuffer, to_torch
from rvpo_async.config import Config, load_config
from rvpo_async.rubric import META_KEY
from rvpo_async.rubric_view import RubricView
from rvpo_async.schedule import k_risk_at
from rvpo_async.step_math import StepContext, build_step, prepare_step
from rvpo_async.types import STATUS_CODES, JudgeResult, Prompt, RolloutGroup, Sample

G = 4
RULES = "judges.specs=[{name: fmt, kind: regex, weight: 2.0, params: {pattern: x}}, " \
        "{name: len, kind: length}, {name: kw, kind: keywords, params: {words: [a]}}]"
RUBRIC = "judges.specs=[{name: fmt, kind: regex, weight: 2.0, params: {pattern: x}}, " \
         "{name: rubric, kind: rubric, weight: 0.5, params: {max_items: 3}}]"
CRITERIA = {"p0": [{"criterion": "a", "points": 3.0}, {"criterion": "b", "points": -2.0}],
            "p1": [{"criterion": "c", "points": 1.0}]}


def make_prompts() -> list[Prompt]:
    return [Prompt(pid, "t", (1, 2, 3), {META_KEY: crit}) for pid, crit in CRITERIA.items()]


def make_table(cfg: Config, *, seed: int = 0, invalid: bool = False, versions: tuple[int, int] = (0, 1)):
    """Two groups (ids 7 and 3, of prompts p0 and p1) scored in reverse id order, one timeout per group, the
    rubric slots a prompt has no criterion for 'absent'."""
    rng = np.random.default_rng(seed)
    names = cfg.reward_names
    buf = GroupBuffer(names, G, 8, 5)
    prompts = make_prompts()
    groups = []
    for gid, prompt, version in ((7, prompts[0], versions[0]), (3, prompts[1], versions[1])):
        samples = []
        for i in range(G):
            n = int(rng.integers(2, 6))
            samples.append(Sample(tuple(int(t) for t in rng.integers(4, 50, n)),
                                  tuple(float(x) for x in -rng.random(n) - 0.5), "stop", f"r{gid}.{i}"))
        groups.append(RolloutGroup(gid, prompt, tuple(samples), version, "engine-0", 1000.0 + gid))
        buf.add_group(groups[-1])
    rubric_first = names.index(next((n for n in names if "/" in n), names[-1])) if cfg.rubric_spec else len(names)
    for g in reversed(groups):  # group 3 becomes ready first: the pulled table is not in id order
        n_crit = len(CRITERIA[g.prompt.prompt_id])
        entries = []
        for i in range(G):
            for k in range(len(names)):
                if k >= rubric_first and k - rubric_first >= n_crit:
                    res = JudgeResult(math.nan, "absent", 0.0)
                elif i == 1 and k == 0:
                    res = JudgeResult(math.nan, "timeout", 1.0, "deadline")
                elif invalid and i == 2 and k == 1:
                    res = JudgeResult(math.nan, "invalid", 0.1, "nan")
                else:
                    res = JudgeResult(float(rng.random()), "ok", 0.01)
                entries.append((g.group_id, i, k, res))
        buf.set_rewards(entries)
    table = buf.pull(2, max(versions) + 1, min_groups=2)
    assert table is not None and table.column("group_id").to_pylist()[0] == 3
    return table


def old_inline(table, cfg: Config, pad_id: int, learner_version: int, rubric: RubricView):
    """What Stepper.train_on computed around the learner call before prepare_step (version: after the step)."""
    table = table.sort_by([("group_id", "ascending"), ("sample_idx", "ascending")])
    batch = to_torch(table, pad_id)
    rewards, mask = batch["rewards"], batch["reward_mask"]
    if cfg.algo.nan_policy == "error":
        status = batch.get("reward_status")
        if status is not None and bool((status == STATUS_CODES["invalid"]).any()):
            raise ValueError("nan_policy")
    k_risk = k_risk_at(int(learner_version), cfg.algo, cfg.run.steps)
    prompt_ids = table.column("prompt_id").to_pylist()[::rewards.shape[1]]
    adv = advantages(rewards.double(), cfg.algo.aggregator, k_risk=k_risk,
                     weights=rubric.weights(prompt_ids), beta=cfg.algo.beta,
                     batch_norm=cfg.algo.batch_norm, eps=cfg.algo.eps, mask=mask)
    batch["advantages"] = adv.reshape(-1).float()
    version = learner_version + 1
    diag = reward_diagnostics(rewards.double(), eps=cfg.algo.eps, mask=mask)
    digest = hashlib.sha256()
    for col in ("group_id", "sample_idx", "response_tokens", "behaviour_logprobs", "rewards"):
        digest.update(repr(table.column(col).to_pylist()).encode())
    versions = batch["policy_version"].reshape(rewards.shape[0], -1)[:, 0]
    info = {"diag": diag, "k_risk": k_risk,
            "rubric": rubric.batch_detail(prompt_ids, rewards.numpy(), batch["reward_status"].numpy()),
            "staleness_values": [int(version - 1 - v) for v in versions.tolist()],
            "group_ids": sorted(set(table.column("group_id").to_pylist())),
            "samples": int(rewards.shape[0] * rewards.shape[1]),
            "tokens": int(batch["response_mask"].sum()), "batch_digest": digest.hexdigest()[:16]}
    return batch, info


def assert_identical(a: torch.Tensor, b: torch.Tensor) -> None:
    """Same dtype, shape and values, NaN where the other has NaN."""
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def assert_same_info(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "diag":
            assert a[key].keys() == b[key].keys()
            for d in a[key]:
                assert_identical(torch.as_tensor(a[key][d]), torch.as_tensor(b[key][d]))
        else:
            assert a[key] == b[key], key


def assert_same_batch(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert_identical(a[key], b[key])


CONFIGS = {
    "rules_linear_k": [RULES, "algo.k_risk_schedule=linear", "run.steps=5"],
    "rubric_points": [RUBRIC, "algo.rubric_weights=points", "algo.k_risk=1.5"],
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prepare_step_gives_the_batch_and_summary_of_the_old_inline_computation(name: str) -> None:
    cfg = load_config(None, CONFIGS[name])
    rubric = RubricView(cfg, make_prompts())
    table = make_table(cfg)
    batch, info = prepare_step(table, pad_id=0, algo=cfg.algo, learner_version=2, total_steps=cfg.run.steps,
                               rubric=rubric)
    old_batch, old_info = old_inline(table, cfg, 0, 2, rubric)
    assert_same_batch(batch, old_batch)
    assert_same_info(info, old_info)
    assert info["staleness_values"] == [1, 2]  # groups 3 (version 1) and 7 (version 0) into version 3
    assert info["group_ids"] == [3, 7] and info["samples"] == 2 * G
    assert batch["group_ids"].tolist() == [3, 7]
    if name == "rules_linear_k":
        assert info["k_risk"] == pytest.approx(0.5 + 1.5 * 2 / 4) and info["rubric"] is None
    else:
        assert info["k_risk"] == 1.5 and info["rubric"]["rubric_criteria"] == [1, 2]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_advantages_match_the_float64_reference_with_the_masked_entries(name: str) -> None:
    cfg = load_config(None, CONFIGS[name])
    rubric = RubricView(cfg, make_prompts())
    table = make_table(cfg, seed=1)
    batch, info = prepare_step(table, pad_id=0, algo=cfg.algo, learner_version=1, total_steps=cfg.run.steps,
                               rubric=rubric)
    rewards = batch["rewards"].double().numpy()
    mask = batch["reward_mask"].numpy()
    assert (~mask).sum() >= 2  # one timeout per group (and the absent rubric slots) are masked
    weights = rubric.weights(["p1", "p0"])  # the sorted groups: 3 (p1), 7 (p0)
    weights = weights.numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
    ref = reference.advantages(rewards, cfg.algo.aggregator, k_risk=info["k_risk"], weights=weights,
                               beta=cfg.algo.beta, batch_norm=cfg.algo.batch_norm, eps=cfg.algo.eps, mask=mask)
    np.testing.assert_allclose(batch["advantages"].numpy(), ref.reshape(-1), rtol=1e-5, atol=1e-6)
    assert batch["advantages"].dtype == torch.float32 and batch["advantages"].shape == (2 * G,)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_step_group_normalizes_its_rewards_once(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The advantages and the diagnostics share the step's group z-scores (and still equal the old inline
    computation, above)."""
    import rvpo_async.algo as algo
    import rvpo_async.step_math as step_math

    calls = []
    real = algo.group_normalize

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(algo, "group_normalize", counting)
    monkeypatch.setattr(step_math, "group_normalize", counting)
    cfg = load_config(None, CONFIGS[name])
    prepare_step(make_table(cfg), pad_id=0, algo=cfg.algo, learner_version=1, total_steps=cfg.run.steps,
                 rubric=RubricView(cfg, make_prompts()))
    assert len(calls) == 1, calls


def test_the_digest_hashes_the_sorted_rows_and_ignores_the_pull_order() -> None:
    cfg = load_config(None, [RULES])
    rubric = RubricView(cfg, make_prompts())
    table = make_table(cfg)
    _, info = prepare_step(table, pad_id=0, algo=cfg.algo, learner_version=1, total_steps=1, rubric=rubric)
    _, again = prepare_step(table.take([4, 5, 6, 7, 0, 1, 2, 3]), pad_id=0, algo=cfg.algo, learner_version=1,
                            total_steps=1, rubric=rubric)
    ordered = table.sort_by([("group_id", "ascending"), ("sample_idx", "ascending")])
    h = hashlib.sha256()
    for col in ("group_id", "sample_idx", "response_tokens", "behaviour_logprobs", "rewards"):
        h.update(repr(ordered.column(col).to_pylist()).encode())
    assert info["batch_digest"] == again["batch_digest"] == h.hexdigest()[:16]
    _, other = prepare_step(make_table(cfg, seed=5), pad_id=0, algo=cfg.algo, learner_version=1, total_steps=1,
                            rubric=rubric)
    assert other["batch_digest"] != info["batch_digest"]


def test_nan_policy_error_refuses_a_batch_with_an_invalid_reward_and_mask_trains_it() -> None:
    cfg = load_config(None, [RULES, "algo.nan_policy=error"])
    rubric = RubricView(cfg, make_prompts())
    table = make_table(cfg, invalid=True)
    with pytest.raises(ValueError, match="algo.nan_policy is 'error'"):
        prepare_step(table, pad_id=0, algo=cfg.algo, learner_version=1, total_steps=1, rubric=rubric)
    prepare_step(make_table(cfg), pad_id=0, algo=cfg.algo, learner_version=1, total_steps=1, rubric=rubric)
    masked = load_config(None, [RULES])
    batch, _ = prepare_step(table, pad_id=0, algo=masked.algo, learner_version=1, total_steps=1, rubric=rubric)
    assert torch.isfinite(batch["advantages"]).all()
    with pytest.raises(ValueError, match="non-empty table"):
        prepare_step(None, pad_id=0, algo=masked.algo, learner_version=1, total_steps=1, rubric=rubric)


def test_a_step_context_pickles_and_builds_the_same_step() -> None:
    cfg = load_config(None, CONFIGS["rubric_points"])
    ctx = StepContext.from_config(cfg, make_prompts(), pad_id=0)
    back = pickle.loads(pickle.dumps(ctx))
    table = make_table(cfg)
    a = build_step(table, pad_id=ctx.pad_id, algo=ctx.algo, learner_version=0, total_steps=ctx.total_steps,
                   rubric=ctx.rubric)
    b = build_step(table, pad_id=back.pad_id, algo=back.algo, learner_version=0, total_steps=back.total_steps,
                   rubric=back.rubric)
    assert_same_batch(a.batch, b.batch)
    assert_same_info(a.info(), b.info())


def test_step_math_imports_no_ray_vllm_or_deepspeed() -> None:
    from test_algo_purity import _loaded_after_import

    assert _loaded_after_import("rvpo_async.step_math", ("ray", "vllm", "deepspeed")) == []


def test_step_row_names_each_reward_and_keeps_the_step_summary() -> None:
    import torch

    from rvpo_async.step_math import step_row

    r = {"diag": {"mean": torch.tensor([0.5, 0.25]), "std": torch.tensor([0.1, 0.2]),
                  "bottleneck_share": torch.tensor([0.0, 1.0]), "inter_variance": torch.tensor(0.03),
                  "worst_mean": torch.tensor(0.2), "all_met_share": torch.tensor(0.125)},
         "version": 7, "staleness_values": [0, 1], "group_ids": [3, 4], "batch_digest": "abc",
         "train_s": 0.5, "sync_s": 0.25, "k_risk": 1.0, "stats": {"loss": -0.5, "note": "x"},
         "rubric": {"rubric_met_ratio": 0.5}}
    row = step_row(r, ["a", "b"], step=3, generated_tokens_total=100, trained_samples_total=64, now=12.0)
    assert row["step"] == 3 and row["policy_version"] == 7 and row["time"] == 12.0
    assert row["reward_mean"] == {"a": 0.5, "b": 0.25} and row["bottleneck_share"] == {"a": 0.0, "b": 1.0}
    assert row["worst_reward_mean"] == pytest.approx(0.2) and row["all_met_share"] == 0.125
    assert row["learner"] == {"loss": -0.5}  # numbers only
    assert row["rubric_met_ratio"] == 0.5 and row["batch_digest"] == "abc"
