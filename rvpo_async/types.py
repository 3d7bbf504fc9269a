"""Records that cross actor boundaries. Plain dataclasses: cheap to pickle, no heavy imports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

JudgeStatus = Literal["ok", "timeout", "error", "invalid", "absent"]
# a masked reward entry is any status other than "ok"; "absent": a rubric slot the prompt has no criterion for
STATUS_CODES: dict[str, int] = {"pending": 0, "ok": 1, "timeout": 2, "error": 3, "invalid": 4, "absent": 5}


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    text: str  # the chat-formatted text handed to the engine
    token_ids: tuple[int, ...]
    meta: dict[str, Any] = field(default_factory=dict)  # task data a judge may need (e.g. "answer")


@dataclass(frozen=True)
class Sample:
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...]  # behaviour log-prob of each sampled token
    finish_reason: str  # "stop" | "length" | ...
    text: str
    # the policy versions of the weights that sampled its first and last token (they differ only when a
    # weight update interrupted it: rollout.weight_update = interrupt); -1 where not recorded
    first_version: int = -1
    last_version: int = -1


@dataclass(frozen=True)
class RolloutGroup:
    group_id: int
    prompt: Prompt
    samples: tuple[Sample, ...]
    policy_version: int  # version of the weights that generated every sample of this group
    engine: str  # which rollout engine produced it
    created_at: float  # time.time() when generation finished


@dataclass(frozen=True)
class JudgeResult:
    value: float  # NaN when status != "ok"
    status: JudgeStatus
    latency_s: float
    reason: str = ""  # why an entry is masked (exception text, "deadline 2.0s passed", ...)
