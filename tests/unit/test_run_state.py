"""RunState without Ray actors: prompt admission, requeueing and the group ledger."""

from __future__ import annotations

from rvpo_async.config import Config
from rvpo_async.run_state import RunState
from rvpo_async.types import Prompt

PROMPTS = [Prompt(f"p{i}", f"prompt {i}", (1, 2, 3), {}) for i in range(5)]


def reconciles(led: dict) -> bool:
    return led["admitted"] == led["trained"] + sum(led["dropped"].values()) + led["in_flight"]


def test_every_admitted_group_is_trained_dropped_or_open_exactly_once() -> None:
    st = RunState.start(Config(), PROMPTS)
    _, gids, seeds = st.take_prompts(6)
    assert gids == list(range(6)) and len(set(seeds)) == 6
    st.close_groups([0, 1])
    st.close_groups([2], dropped="stale")
    st.close_groups([1, 2])  # closing again changes nothing
    st.close_groups([99], dropped="after_checkpoint")  # never admitted: not a ledger drop
    led = st.ledger()
    assert led == {"admitted": 6, "trained": 2, "dropped": {"stale": 1}, "in_flight": 3} and reconciles(led)
    assert sorted(st.open_groups) == [3, 4, 5]


def test_requeued_groups_keep_their_ids_and_seeds_and_are_not_admitted_twice() -> None:
    st = RunState.start(Config(), PROMPTS)
    prompts, gids, seeds = st.take_prompts(3)
    st.requeue(list(zip(prompts[1:], gids[1:], seeds[1:])))
    again_prompts, again_gids, again_seeds = st.take_prompts(3)
    assert again_gids == [1, 2, 3] and again_seeds[:2] == seeds[1:]
    assert [p.prompt_id for p in again_prompts[:2]] == [p.prompt_id for p in prompts[1:]]
    assert st.ledger()["admitted"] == 4 and st.ledger()["in_flight"] == 4
