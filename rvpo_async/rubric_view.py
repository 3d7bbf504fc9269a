"""What a training step needs to know about the rubric judge's slots: per-prompt weight rows for the
aggregator and the rubric statistics of a batch (rvpo_async.rubric holds the math). The prompts' criteria
are looked up by prompt_id, so the buffer rows need no extra column.

No ray, vllm or deepspeed; torch only inside `weights`.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from rvpo_async.config import Config
from rvpo_async.rubric import from_meta, points_matrix, rubric_stats
from rvpo_async.types import STATUS_CODES, Prompt

RUBRIC_ROW_KEYS = ("rubric_met_ratio", "rubric_worst_mean", "pitfall_rate")  # metrics.jsonl step row keys
_OK, _ABSENT = STATUS_CODES["ok"], STATUS_CODES["absent"]
_CODE_NAMES = {v: k for k, v in STATUS_CODES.items()}


def nan_or(v: float | None) -> float:
    return math.nan if v is None else float(v)


class RubricView:
    def __init__(self, cfg: Config, prompts: Sequence[Prompt]) -> None:
        self.cfg = cfg
        self.spec = cfg.rubric_spec
        self.slots = len(self.spec.slot_names) if self.spec else 0
        self.rule_names = cfg.reward_names[:len(cfg.reward_names) - self.slots]
        self.criteria = {p.prompt_id: from_meta(p.meta)[:self.slots] for p in prompts} if self.spec else {}

    def weights(self, prompt_ids: Sequence[str]) -> Any:
        """The aggregator's weights: [K] from the config, or [B, K] rows when the rubric slots are weighted by
        each prompt's points (`algo.rubric_weights: points`). Uniform rubric weights need no rows: absent
        slots are masked, and the aggregator normalises the weights over each response's valid slots."""
        w = self.cfg.reward_weights
        mode = self.cfg.algo.rubric_weights
        if self.spec is None or mode == "uniform":
            return w
        import torch

        from rvpo_async.algo_weights import rubric_weights

        points = torch.as_tensor(points_matrix([self.criteria[p] for p in prompt_ids], self.slots), dtype=torch.float64)
        present = points != 0
        # a prompt's criteria share M times the rubric judge's weight by |points| (HealthBench scoring): on
        # average a criterion weighs what it weighs in uniform mode, next to the rule judges' weights
        rubric = w[-1] * present.sum(-1, keepdim=True) * rubric_weights(points, present, "points")
        rules = torch.tensor(w[:len(self.rule_names)], dtype=torch.float64).expand(len(prompt_ids), -1)
        return torch.cat([rules, rubric], dim=-1)

    def batch_detail(self, prompt_ids: Sequence[str], rewards: np.ndarray, status: np.ndarray) -> dict[str, Any] | None:
        """metrics.jsonl fields of a batch ([B, G, K] rewards and status codes): the rubric statistics (None
        where there was nothing to measure), criteria per prompt, and per group the rubric slots each
        response had (not 'absent') and the masked slots by status."""
        if self.spec is None:
            return None
        r0 = len(self.rule_names)
        st = status[..., r0:]
        crit = [self.criteria[p] for p in prompt_ids]
        pitfall = np.zeros((len(crit), self.slots), dtype=bool)
        for b, cs in enumerate(crit):
            pitfall[b, :len(cs)] = [c.pitfall for c in cs]
        tags = [[c.tags for c in cs] for cs in crit] if any(c.tags for cs in crit for c in cs) else None
        stats = rubric_stats(np.asarray(rewards[..., r0:], dtype=np.float64), st == _OK, pitfall, tags)
        by_tag = stats.pop("rubric_met_by_tag", None)
        groups = []
        for b, pid in enumerate(prompt_ids):
            codes, counts = np.unique(st[b][(st[b] != _OK) & (st[b] != _ABSENT)], return_counts=True)
            groups.append({"prompt_id": pid, "criteria": len(crit[b]),
                           "present": [int(n) for n in (st[b] != _ABSENT).sum(-1)],
                           "masked": {_CODE_NAMES[int(c)]: int(n) for c, n in zip(codes, counts)}})
        return {**{k: (None if math.isnan(v) else v) for k, v in stats.items()},
                **({"rubric_met_by_tag": {t: (None if math.isnan(v) else v) for t, v in by_tag.items()}}
                   if by_tag is not None else {}),
                "rubric_criteria": [len(c) for c in crit], "rubric_groups": groups}
