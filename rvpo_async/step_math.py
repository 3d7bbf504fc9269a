"""What a training step computes from a pulled table, apart from the optimizer step itself: the learner
batch with its RVPO advantages, and the step's summary (reward diagnostics, staleness, rubric detail, batch
digest). Pure: no Ray, no actor handles. The driver (rvpo_async.steps.Stepper.train_on) and the learner
ranks (learner.actor.LearnerRank.train_table_shard) call the same functions, so both data paths train on
the same batch bit for bit.

`prepare_step` is `build_step` followed by `PreparedStep.info`; a learner rank that must not delay the
collective step builds first, trains, then computes the summary.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import pyarrow as pa

from rvpo_async.algo import advantages, group_normalize, reward_diagnostics
from rvpo_async.buffer_torch import to_torch
from rvpo_async.config import AlgoConfig, Config
from rvpo_async.rubric_view import RubricView
from rvpo_async.schedule import k_risk_at
from rvpo_async.types import STATUS_CODES, Prompt

DIGEST_COLUMNS = ("group_id", "sample_idx", "response_tokens", "behaviour_logprobs", "rewards")


@dataclass(frozen=True)
class StepContext:
    """What a learner rank needs besides the table to build a step: sent once (LearnerGroup.set_step_context)."""

    pad_id: int
    algo: AlgoConfig
    total_steps: int
    rubric: RubricView  # per-prompt aggregator weights and the rubric batch detail

    @classmethod
    def from_config(cls, cfg: Config, prompts: Sequence[Prompt], pad_id: int) -> "StepContext":
        return cls(pad_id=int(pad_id), algo=cfg.algo, total_steps=cfg.run.steps, rubric=RubricView(cfg, prompts))

    def build(self, table: pa.Table, learner_version: int) -> "PreparedStep":
        """The step builder a learner rank is handed (learner.actor.StepBuilder): the learner knows nothing
        of the rewards, their aggregation or the advantages, only that a table becomes a batch."""
        return build_step(table, pad_id=self.pad_id, algo=self.algo, learner_version=learner_version,
                          total_steps=self.total_steps, rubric=self.rubric)


@dataclass
class PreparedStep:
    """A step's learner batch (advantages included) and what its summary needs."""

    table: pa.Table  # sorted by (group_id, sample_idx): the rows of `batch`, in order
    batch: dict[str, Any]
    prompt_ids: list[str]  # one per group
    k_risk: float
    learner_version: int  # the learner's version before the step
    algo: AlgoConfig
    rubric: RubricView
    z: Any = None  # the rewards' group z-scores (float64), computed once for the advantages and the diagnostics

    def info(self) -> dict[str, Any]:
        """The step summary: everything Stepper.train_on returns apart from the learner's stats, the new
        version and the train/sync timings. Staleness is relative to the version the step produces
        (learner_version + 1): a group sampled by version v trained into version V+1 has staleness V - v."""
        batch, table = self.batch, self.table
        rewards, mask = batch["rewards"], batch["reward_mask"]
        diag = reward_diagnostics(rewards.double(), eps=self.algo.eps, mask=mask, z=self.z)
        digest = hashlib.sha256()
        for col in DIGEST_COLUMNS:
            digest.update(repr(table.column(col).to_pylist()).encode())
        versions = batch["policy_version"].reshape(rewards.shape[0], -1)[:, 0]
        return {"diag": diag, "k_risk": self.k_risk,
                "rubric": self.rubric.batch_detail(self.prompt_ids, rewards.numpy(), batch["reward_status"].numpy()),
                "staleness_values": [int(self.learner_version - v) for v in versions.tolist()],
                "group_ids": sorted(set(table.column("group_id").to_pylist())),
                "samples": int(rewards.shape[0] * rewards.shape[1]),
                "tokens": int(batch["response_mask"].sum()), "batch_digest": digest.hexdigest()[:16]}


def check_nan_policy(batch: dict[str, Any], algo: AlgoConfig) -> None:
    if algo.nan_policy == "error":
        status = batch.get("reward_status")
        if status is not None and bool((status == STATUS_CODES["invalid"]).any()):
            raise ValueError("a judge returned a non-finite or out-of-range reward and algo.nan_policy is "
                             "'error'; see the judge failure counts in the run log")


def build_step(table: pa.Table, *, pad_id: int, algo: AlgoConfig, learner_version: int, total_steps: int,
               rubric: RubricView) -> PreparedStep:
    """Sort the pulled table, build the learner tensors, check algo.nan_policy and put the RVPO advantages
    (k_risk of the step with index `learner_version`) in batch["advantages"]."""
    if table is None or table.num_rows == 0:
        raise ValueError("build_step needs a non-empty table from GroupBuffer.pull")
    table = table.sort_by([("group_id", "ascending"), ("sample_idx", "ascending")])
    batch = to_torch(table, pad_id)
    rewards, mask = batch["rewards"], batch["reward_mask"]
    check_nan_policy(batch, algo)
    # the learner's version counts the optimizer steps taken, resumed runs included
    k_risk = k_risk_at(int(learner_version), algo, total_steps)
    prompt_ids = table.column("prompt_id").to_pylist()[::rewards.shape[1]]  # one per group
    z = group_normalize(rewards.double(), eps=algo.eps, mask=mask)
    adv = advantages(rewards.double(), algo.aggregator, k_risk=k_risk, weights=rubric.weights(prompt_ids),
                     beta=algo.beta, batch_norm=algo.batch_norm, eps=algo.eps, mask=mask, z=z)
    batch["advantages"] = adv.reshape(-1).float()
    return PreparedStep(table=table, batch=batch, prompt_ids=prompt_ids, k_risk=k_risk,
                        learner_version=int(learner_version), algo=algo, rubric=rubric, z=z)


def prepare_step(table: pa.Table, *, pad_id: int, algo: AlgoConfig, learner_version: int, total_steps: int,
                 rubric: RubricView) -> tuple[dict[str, Any], dict[str, Any]]:
    """(learner batch with advantages, step summary) of a pulled table; see build_step and PreparedStep.info."""
    step = build_step(table, pad_id=pad_id, algo=algo, learner_version=learner_version, total_steps=total_steps,
                      rubric=rubric)
    return step.batch, step.info()


def step_row(r: dict[str, Any], names: list[str], *, step: int, generated_tokens_total: int,
             trained_samples_total: int, now: float | None = None) -> dict[str, Any]:
    """The metrics.jsonl row of a trained step, from what the step returned (`r`: the summary of
    PreparedStep.info() plus the learner's stats, version and timings)."""
    import time

    diag = r["diag"]
    row = {
        "step": step, "policy_version": int(r["version"]), "time": time.time() if now is None else now,
        "reward_mean": {n: float(diag["mean"][k]) for k, n in enumerate(names)},
        "reward_std": {n: float(diag["std"][k]) for k, n in enumerate(names)},
        "bottleneck_share": {n: float(diag["bottleneck_share"][k]) for k, n in enumerate(names)},
        "inter_variance": float(diag["inter_variance"]),
        "worst_reward_mean": float(diag["worst_mean"]),
        "all_met_share": float(diag["all_met_share"]),
        "staleness_values": r["staleness_values"], "group_ids": r["group_ids"], "batch_digest": r["batch_digest"],
        "generated_tokens_total": generated_tokens_total, "trained_samples_total": trained_samples_total,
        "train_s": r["train_s"], "sync_s": r["sync_s"], "k_risk": r["k_risk"],
        "learner": {k: float(v) for k, v in r["stats"].items() if isinstance(v, (int, float))},
    }
    if r.get("rubric"):  # per-slot detail lives here only, never in Prometheus labels
        row.update(r["rubric"])
    return row
