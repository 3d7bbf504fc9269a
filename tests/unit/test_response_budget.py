"""A prompt's own response budget (meta["max_new_tokens"]), checked before a rollout engine generates anything."""

from __future__ import annotations

import numpy as np
import pytest

from actors.vllm_engine import check_request, response_budget
from rvpo_async.types import Prompt


def _p(pid: str, **meta) -> Prompt:
    return Prompt(pid, "text", (1, 2, 3), meta)


def test_a_prompt_without_a_budget_gets_the_engines_and_one_with_a_budget_its_own() -> None:
    assert response_budget(_p("a"), 64) == 64
    assert response_budget(_p("b", max_new_tokens=4), 64) == 4
    assert response_budget(_p("c", max_new_tokens=64), 64) == 64
    assert response_budget(_p("d", max_new_tokens=np.int64(1)), 64) == 1
    assert response_budget(_p("e", answer="42"), 64) == 64


@pytest.mark.parametrize("bad", [0, -3, 65, 4.0, "8", True])
def test_a_budget_out_of_range_or_not_an_int_names_the_prompt(bad) -> None:
    with pytest.raises(ValueError, match=r"prompt 'q7'.*1\.\.64"):
        response_budget(_p("q7", max_new_tokens=bad), 64)


def test_a_request_gets_one_seed_and_one_budget_per_prompt_and_fails_whole_on_one_bad_prompt() -> None:
    prompts = [_p("a"), _p("b", max_new_tokens=8)]
    assert check_request(prompts, [0, 1], [5, 6], 32) == ([5, 6], [32, 8])
    assert check_request(prompts, [0, 1], None, 32) == ([None, None], [32, 8])
    with pytest.raises(ValueError, match="prompt 'late'"):
        check_request(prompts + [_p("late", max_new_tokens=33)], [0, 1, 2], None, 32)
    with pytest.raises(ValueError, match="2 prompts but 1 seeds"):
        check_request(prompts, [0, 1], [5], 32)
    with pytest.raises(ValueError, match="2 prompts but 3 group ids"):
        check_request(prompts, [0, 1, 2], None, 32)
