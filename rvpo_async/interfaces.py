"""The parts a run wires together, as typing.Protocols: what each plain class offers, whoever hosts it.

| protocol | plain classes | Ray actor (a thin `ray.remote` wrapper) |
|---|---|---|
| `RolloutEngine` | `actors.rollout.streaming.StreamingRollout` (vLLM AsyncLLM) | `StreamingRolloutActor` |
| `Judge`, `SlotJudge` | `actors.judges.rules`, `actors.judges.llm`, `actors.judges.rubric` | hosted by `JudgeWorker` |
| `Learner` | `learner.actor.LearnerGroup` (driving `LearnerRank` x N) | `LearnerActor` per rank |
| `WeightSync` | `learner.weight_sync.ObjectStoreSync`, `CollectiveSync` | runs on the driver |

Every Ray wrapper takes its remote options from `rvpo_async.placement.actor_options`. The learner is handed
its loss and its step builder (`learner.engine.LossFn`, `learner.actor.StepBuilder`) and knows nothing of RVPO.
Pure: typing only.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

from rvpo_async.types import JudgeResult, Prompt, RolloutGroup

if TYPE_CHECKING:
    from ray.actor import ActorHandle


class RolloutEngine(Protocol):
    """One generation engine. Streaming: `submit` returns at once; each group goes to the buffer and the
    judges the moment its G samples are done, and `poll` reports which did (ids and counts only).
    Weight updates pause it (drain, interrupt or in_flight: rollout.weight_update) and it serves `version` after."""

    async def ready(self) -> str: ...

    def connect(self, buffer: "ActorHandle", judges: "ActorHandle") -> None: ...

    async def submit(self, prompts: Sequence[Prompt], group_ids: Sequence[int],
                     seeds: Sequence[int] | None = None) -> int: ...

    async def poll(self) -> dict[str, Any]: ...

    async def generate(self, prompts: Sequence[Prompt], group_ids: Sequence[int],
                       seeds: Sequence[int] | None = None) -> list[RolloutGroup]: ...

    async def update_weights(self, version: int, blob: Any) -> int: ...

    async def init_weight_group(self, master_addr: str, master_port: int, world_size: int, rank: int) -> None: ...

    async def receive_weights(self, version: int, meta: Any) -> int: ...

    async def get_version(self) -> int: ...

    async def stats(self) -> dict[str, Any]: ...

    async def sample_texts(self, prompts: Sequence[Prompt], n: int, temperature: float, max_tokens: int,
                           seed: int = 0, min_version: int = 0) -> tuple[list[list[str]], int, int]: ...

    async def score_tokens(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]: ...


class Judge(Protocol):
    """One reward entry. `low`/`high` is the declared range; scores outside it are rejected."""

    name: str
    low: float
    high: float

    def score(self, prompt: Prompt, sample_text: str) -> float: ...


@runtime_checkable
class SlotJudge(Protocol):
    """A judge filling `slots` reward entries per response (the rubric judge: one per criterion slot).
    `score_all` never raises and keeps its own deadlines, so one slot can time out alone."""

    name: str
    slots: int

    def score_all(self, prompt: Prompt, sample_text: str) -> list[JudgeResult]: ...


class Learner(Protocol):
    """The policy being trained, on one or more ranks: every call runs on all ranks together."""

    @property
    def version(self) -> int:
        """Optimizer steps taken (resumed runs included)."""
        ...

    def set_step_context(self, ctx: Any) -> None:
        """The step builder that turns a pulled table into a batch (rvpo_async.step_math.StepContext)."""
        ...

    def train_from_table(self, table_ref: Any, loss_fn: Any,
                         ctx: Any = None) -> tuple[dict[str, float], dict[str, Any]]: ...

    def train_step(self, batch: Mapping[str, Any], loss_fn: Any) -> dict[str, float]: ...

    def export_blob(self) -> Any:
        """The full weights as one safetensors blob in Ray's object store (an ObjectRef)."""
        ...

    def load_weights(self, blob: Any) -> None: ...

    def state_digests(self) -> list[str]: ...

    def save_checkpoint(self, root: str | Path, extra: Mapping[str, Any] | None = None) -> Path: ...

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]: ...

    def shutdown(self) -> None: ...


class WeightSync(Protocol):
    """Push the learner's weights to engines; each engine then reports `version` from get_version()."""

    def sync(self, learner: Learner, engines: Sequence["ActorHandle"], version: int, wait: bool = True) -> float:
        """Bring `engines` to `version`; wait=False may return before they have loaded it."""
        ...

    def catch_up(self, learner: Learner, engine: "ActorHandle", version: int) -> bool:
        """Bring one engine that is behind `version` (e.g. restarted) up to date; True if it was behind."""
        ...

    def landed(self) -> int | None:
        """The version of the last sync once every engine has loaded it (None while one is loading or before
        the first sync); admission control counts from it. May be called from another thread than sync's."""
        ...

    def wait_landing(self, after: int, timeout_s: float) -> None:
        """Block until a sync newer than version `after` has landed, at most `timeout_s` (any thread)."""
        ...
