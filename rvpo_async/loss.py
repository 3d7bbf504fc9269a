"""The loss the learner is handed: RVPO's decoupled-PPO policy loss, configured from AlgoConfig.

A frozen dataclass rather than a closure, so it pickles into every learner rank. It also names the
sampling temperature, because the learner must take its log-probs at the temperature the behaviour
log-probs were sampled at, or the importance weights compare two different distributions, and whether it
reads the reference model's log-probs (`needs_reference`: only with the KL anchor on, so that kl_coef = 0
costs no reference model and no forward).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from rvpo_async.algo import policy_loss
from rvpo_async.config import AlgoConfig


@dataclass(frozen=True)
class PolicyLoss:
    """loss_fn(logprobs, proximal_logprobs, batch) -> (token-mean loss, stats), batch keys: advantages,
    behaviour_logprobs, response_mask, staleness, and ref_logprobs when `needs_reference`."""

    temperature: float
    clip_eps_low: float
    clip_eps_high: float
    is_mode: str
    is_cap: float
    is_low: float
    is_high: float
    is_level: str
    staleness_decay: float
    kl_coef: float = 0.0

    @property
    def needs_reference(self) -> bool:
        return self.kl_coef > 0

    def __call__(self, logprobs: torch.Tensor, proximal_logprobs: torch.Tensor,
                 batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return policy_loss(
            logprobs, proximal_logprobs, batch["behaviour_logprobs"], batch["advantages"], batch["response_mask"],
            clip_eps_low=self.clip_eps_low, clip_eps_high=self.clip_eps_high, is_mode=self.is_mode,
            is_cap=self.is_cap, is_low=self.is_low, is_high=self.is_high, is_level=self.is_level,  # type: ignore[arg-type]
            staleness=batch.get("staleness"), staleness_decay=self.staleness_decay,
            ref_logprobs=batch.get("ref_logprobs") if self.needs_reference else None, kl_coef=self.kl_coef)


def make_loss_fn(algo: AlgoConfig, temperature: float = 1.0) -> PolicyLoss:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (rollout.temperature), got {temperature}")
    return PolicyLoss(temperature=float(temperature), clip_eps_low=algo.clip_eps_low,
                      clip_eps_high=algo.clip_eps_high, is_mode=algo.is_mode, is_cap=algo.is_cap,
                      is_low=algo.is_low, is_high=algo.is_high, is_level=algo.is_level,
                      staleness_decay=algo.staleness_decay, kl_coef=algo.kl_coef)
