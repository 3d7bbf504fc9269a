"""RunState without Ray actors: prompt admission, requeueing and the group ledger."""

from __future__ import annotations

from rvpo_async.config import Config
from rvpo_async.run_state import RunState, group_seed
from rvpo_async.task import prompt_stream
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


def test_group_seeds_depend_only_on_the_run_seed_and_the_group_id() -> None:
    seeds = [group_seed(3, g) for g in range(1000)]
    assert seeds == [group_seed(3, g) for g in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 - 1 for s in seeds)
    assert [group_seed(4, g) for g in range(1000)] != seeds
    st = RunState.start(Config().override("run.seed=3"), PROMPTS)
    assert st.take_prompts(4)[2] == seeds[:4]


def test_prompts_are_taken_in_the_seeded_stream_order_across_epochs() -> None:
    cfg = Config().override("run.seed=11")
    stream = prompt_stream(PROMPTS, 11)
    want = [next(stream).prompt_id for _ in range(12)]
    st = RunState.start(cfg, PROMPTS)
    got = [p.prompt_id for n in (4, 5, 3) for p in st.take_prompts(n)[0]]
    assert got == want and st.prompts_taken == 12
    assert sorted(want[:5]) == sorted(want[5:10]) == [p.prompt_id for p in PROMPTS]  # each epoch covers them all


def test_a_resumed_state_that_skips_the_taken_prompts_continues_the_same_stream() -> None:
    cfg = Config().override("run.seed=5")
    first = RunState.start(cfg, PROMPTS)
    first.take_prompts(7)
    after = [p.prompt_id for p in first.take_prompts(6)[0]]
    resumed = RunState.start(cfg, PROMPTS)
    resumed.skip_prompts(7)
    resumed.next_group_id = 7
    prompts, gids, seeds = resumed.take_prompts(6)
    assert resumed.prompts_taken == 13 and [p.prompt_id for p in prompts] == after
    assert gids == list(range(7, 13)) and seeds == [group_seed(5, g) for g in gids]


def test_the_latest_requeued_items_come_first_in_their_given_order() -> None:
    st = RunState.start(Config(), PROMPTS)
    prompts, gids, seeds = st.take_prompts(4)
    items = list(zip(prompts, gids, seeds))
    st.requeue([items[2], items[3]])
    st.requeue([items[0]])
    again, again_gids, _ = st.take_prompts(2)
    assert again_gids == [0, 2] and again[0] is prompts[0]
    assert st.take_prompts(2)[1] == [3, 4] and st.requeued == []


def test_drops_are_counted_by_reason() -> None:
    st = RunState.start(Config(), PROMPTS)
    st.take_prompts(7)
    st.close_groups([0, 1, 2], dropped="stale")
    st.close_groups([3], dropped="judge_failed")
    st.close_groups([4], dropped="stale")
    st.close_groups([5])
    led = st.ledger()
    assert led == {"admitted": 7, "trained": 1, "dropped": {"stale": 4, "judge_failed": 1}, "in_flight": 1}
    assert reconciles(led)
    led["dropped"]["stale"] = 0  # the ledger is a copy
    assert st.dropped_groups["stale"] == 4
