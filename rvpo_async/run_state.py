"""The run's counters, without Ray: prompt admission (ids and seeds of groups, requeued ones first), the
groups still open, and the group ledger: every admitted group is trained, dropped (by reason) or open."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator

from rvpo_async.config import Config
from rvpo_async.task import prompt_stream
from rvpo_async.types import Prompt


def group_seed(run_seed: int, group_id: int) -> int:
    return (run_seed * 1_000_003 + group_id * 7919) % (2**31 - 1)


@dataclass
class RunState:
    """Counters of a run. Only the driver's main thread changes them."""

    cfg: Config
    prompts: list[Prompt]
    step: int = 0
    version: int = 0  # learner policy version
    synced_version: int = 0  # version every rollout engine serves
    submitted_groups: int = 0  # admitted to generation (in flight, in the buffer, trained or dropped)
    prompts_taken: int = 0
    next_group_id: int = 0
    trained_samples_this_run: int = 0
    generated_tokens_this_run: int = 0
    requeued: list[tuple[Prompt, int, int]] = field(default_factory=list)
    # admitted and neither trained nor dropped yet: group_id -> (prompt_id, seed). A checkpoint saves it, so a
    # resume can generate again what a crashed run admitted before the checkpoint and lost afterwards
    open_groups: dict[int, tuple[str, int]] = field(default_factory=dict)
    trained_groups: int = 0  # the ledger: every admitted group is trained, dropped (by reason) or open
    dropped_groups: dict[str, int] = field(default_factory=dict)
    _stream: Iterator[Prompt] | None = None

    @classmethod
    def start(cls, cfg: Config, prompts: list[Prompt]) -> "RunState":
        s = cls(cfg=cfg, prompts=prompts)
        s._stream = prompt_stream(prompts, cfg.run.seed)
        return s

    def skip_prompts(self, n: int) -> None:
        for _ in range(n):
            next(self._stream)  # type: ignore[arg-type]
        self.prompts_taken = n

    def take_prompts(self, n: int) -> tuple[list[Prompt], list[int], list[int]]:
        prompts, gids, seeds = [], [], []
        while self.requeued and len(prompts) < n:
            p, g, s = self.requeued.pop(0)
            prompts.append(p), gids.append(g), seeds.append(s)
        while len(prompts) < n:
            prompts.append(next(self._stream))  # type: ignore[arg-type]
            self.prompts_taken += 1
            gids.append(self.next_group_id)
            seeds.append(group_seed(self.cfg.run.seed, self.next_group_id))
            self.open_groups[self.next_group_id] = (prompts[-1].prompt_id, seeds[-1])
            self.next_group_id += 1
        return prompts, gids, seeds

    def close_groups(self, group_ids: list[int], dropped: str | None = None) -> None:
        """Trained (dropped None) or dropped for that reason: no resume generates these again. Ids that are not
        open (copies dropped by a resume, which admits them again) change nothing."""
        for g in group_ids:
            if self.open_groups.pop(g, None) is None:
                continue
            if dropped is None:
                self.trained_groups += 1
            else:
                self.dropped_groups[dropped] = self.dropped_groups.get(dropped, 0) + 1

    def ledger(self) -> dict[str, Any]:
        """{admitted, trained, dropped: {reason: n}, in_flight}: admitted = trained + dropped + in_flight."""
        return {"admitted": self.next_group_id, "trained": self.trained_groups, "dropped": dict(self.dropped_groups),
                "in_flight": len(self.open_groups)}

    def requeue(self, items: list[tuple[Prompt, int, int]]) -> None:
        self.requeued = list(items) + self.requeued
