"""Each plain class offers every member of its protocol (rvpo_async.interfaces) with the same parameters, and
every Ray actor of a run is a thin `ray.remote` wrapper around a plain class. Checked on the classes
themselves: nothing is started."""

from __future__ import annotations

import inspect

import pytest

from rvpo_async import interfaces


def _members(proto: type) -> dict[str, object]:
    skip = set(dir(object)) | {"_is_protocol", "_is_runtime_protocol", "__protocol_attrs__",
                               "__non_callable_proto_members__", "__abstractmethods__", "_abc_impl"}
    return {k: v for k, v in vars(proto).items()
            if not k.startswith("__") and k not in skip and (callable(v) or isinstance(v, property))}


def _params(fn: object) -> list[tuple[str, object]]:
    """Names and kinds, less the keyword Ray's tracing adds to the signature of a wrapped class's methods."""
    fn = fn.fget if isinstance(fn, property) else fn
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values() if p.name != "_ray_trace_ctx"]


def _plain_classes() -> list[tuple[type, type]]:
    from actors.rollout.streaming import StreamingRollout
    from learner.actor import LearnerGroup
    from learner.weight_sync import CollectiveSync, ObjectStoreSync

    return [(interfaces.RolloutEngine, StreamingRollout), (interfaces.Learner, LearnerGroup),
            (interfaces.WeightSync, ObjectStoreSync), (interfaces.WeightSync, CollectiveSync)]


@pytest.mark.parametrize("proto,cls", _plain_classes(), ids=lambda x: x.__name__)
def test_plain_class_offers_every_protocol_member_with_its_parameters(proto: type, cls: type) -> None:
    members = _members(proto)
    assert members, f"{proto.__name__} declares no members"
    for name, want in members.items():
        got = inspect.getattr_static(cls, name, None)
        assert got is not None, f"{cls.__name__} lacks {proto.__name__}.{name}"
        assert isinstance(got, property) == isinstance(want, property), f"{cls.__name__}.{name}: property or not"
        assert _params(got) == _params(want), f"{cls.__name__}.{name}: parameters differ from the protocol"
        if not isinstance(want, property):
            assert inspect.iscoroutinefunction(got) == inspect.iscoroutinefunction(want), \
                f"{cls.__name__}.{name}: async in one and not the other"


def test_every_built_in_judge_is_a_judge_or_a_slot_judge() -> None:
    from pathlib import Path

    from actors.judges.factory import build_judge
    from rvpo_async.config import load_config

    cfg = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"))
    assert len(cfg.judges.specs) >= 4
    for spec in cfg.judges.specs:
        judge = build_judge(spec)
        if isinstance(judge, interfaces.SlotJudge):
            assert judge.slots >= 1
        else:
            assert isinstance(judge.name, str) and judge.low < judge.high and callable(judge.score)


def test_every_actor_of_a_run_wraps_a_plain_class() -> None:
    """`X = ray.remote(Plain)`: the plain class stays importable and testable without Ray."""
    from actors.buffer import BufferActor, BufferService
    from actors.control import RunControl, RunControlActor
    from actors.judges.service import JudgeService, JudgeServiceActor
    from actors.judges.worker import JudgeWorker, SampleScorer
    from actors.rollout.call import CallRollout, RolloutActor
    from actors.rollout.streaming import StreamingRollout, StreamingRolloutActor
    from learner.actor import LearnerActor, LearnerRank

    pairs = [(BufferActor, BufferService), (RunControlActor, RunControl), (JudgeServiceActor, JudgeService),
             (JudgeWorker, SampleScorer), (RolloutActor, CallRollout), (StreamingRolloutActor, StreamingRollout),
             (LearnerActor, LearnerRank)]
    for actor, plain in pairs:
        assert actor.__ray_metadata__.modified_class.__bases__ == (plain,), actor
        assert not hasattr(plain, "remote"), f"{plain.__name__} is itself a Ray actor class"
