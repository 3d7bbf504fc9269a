"""Which actor a failure is about, and whether the run may recover from it: a dead actor (RayActorError) is
ActorDied, named after the pipeline's actor with that id; an exception raised by an actor's code is not."""

from __future__ import annotations

from types import SimpleNamespace

import ray

from rvpo_async.steps import ActorDied, actor_failure, actor_name


class Handle:
    def __init__(self, hex_id: str) -> None:
        self._actor_id = SimpleNamespace(hex=lambda: hex_id)


PIPELINE = SimpleNamespace(learner=SimpleNamespace(actors=[Handle("l0"), Handle("l1")]), buffer=Handle("b"),
                           engine_names=["rollout-0", "rollout-1"], engines=[Handle("r0"), Handle("r1")],
                           judge_engines={"default": Handle("j")})


def dead(actor_id: str) -> ray.exceptions.RayActorError:
    return ray.exceptions.RayActorError(actor_id=actor_id, error_msg="The actor died.")


def test_a_dead_actor_is_named_by_its_id() -> None:
    assert [actor_name(PIPELINE, dead(i)) for i in ("l1", "b", "r1", "j", "zz")] == \
        ["learner", "buffer", "rollout-1", "judge engine default", None]
    assert actor_name(None, dead("l0")) is None and actor_name(PIPELINE, ValueError("x")) is None


def test_only_a_dead_actor_is_recoverable() -> None:
    died = actor_failure("learner", dead("l0"))
    assert isinstance(died, ActorDied) and died.actor == "learner" and "actor 'learner' failed" in str(died)
    raised = actor_failure("rollout-0", ValueError("bad prompt"))
    assert type(raised) is RuntimeError and "rollout-0" in str(raised) and "bad prompt" in str(raised)
