"""actors/rollout/inproc.py's call ordering, with a fake engine in place of vLLM's LLMEngine (the logic only: the
real engine's sampling is tests/ray/test_streaming_rollout.py's).

One thread owns the engine; every call is posted to it and runs between two steps. The property that matters on
a busy engine: the requests of one submit enter it together, before its next step, without waiting a step each.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from actors.rollout.inproc import InprocEngine, RequestRefused


class FakeEngine:
    """Steps every active request by one token (10 ms a step); `log` records each call and step in order."""

    def __init__(self, tokens: int = 3) -> None:
        self.tokens = tokens
        self.active: dict[str, int] = {}
        self.log: list[tuple] = []
        self.thread_ids: set[int] = set()

    def _touch(self) -> None:
        self.thread_ids.add(threading.get_ident())

    def get_tokenizer(self) -> None:
        return None

    def add_request(self, rid: str, prompt: Any, params: Any) -> None:
        self._touch()
        if prompt == "bad":
            raise ValueError("prompt too long")
        self.log.append(("add", rid))
        self.active[rid] = 0

    def abort_request(self, ids: list[str]) -> None:
        self._touch()
        self.log.append(("abort", tuple(ids)))
        for rid in ids:
            self.active.pop(rid, None)

    def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        self._touch()
        self.log.append(("rpc", method))
        if method == "fail":
            raise RuntimeError("load failed")
        return [method, *args]

    def reset_prefix_cache(self) -> bool:
        return True

    def set_weight_version(self, version: str) -> None:
        self._touch()
        self.log.append(("version", version))

    def has_unfinished_requests(self) -> bool:
        return bool(self.active)

    def step(self) -> list[Any]:
        self._touch()
        time.sleep(0.01)
        self.log.append(("step", tuple(sorted(self.active))))
        outs = []
        for rid in list(self.active):
            self.active[rid] += 1
            done = self.active[rid] >= self.tokens
            outs.append(SimpleNamespace(request_id=rid, finished=done, outputs=[
                SimpleNamespace(index=0, token_ids=[self.active[rid]], logprobs=None,
                                finish_reason="length" if done else None)]))
            if done:
                del self.active[rid]
        return outs


async def _drain(stream: Any) -> list[int]:
    toks = []
    while True:
        out = await stream.get()
        toks += out.outputs[0].token_ids
        if out.finished:
            return toks


def test_the_requests_of_one_submit_enter_a_busy_engine_together_before_its_next_step() -> None:
    fake = FakeEngine(tokens=30)
    eng = InprocEngine(fake)

    async def main() -> None:
        long = await eng.add_request("long", "p", None)
        while not any(e[0] == "step" for e in fake.log):  # the engine is stepping
            await asyncio.sleep(0.005)
        fake.tokens = 3
        streams = [await eng.add_request(f"r{i}", "p", None) for i in range(6)]  # as StreamingRollout submits
        results = await asyncio.gather(*(_drain(s) for s in streams))
        assert all(r == [1, 2, 3] for r in results)
        await _drain(long)

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    adds = [i for i, e in enumerate(fake.log) if e[0] == "add" and e[1] != "long"]
    assert adds == list(range(adds[0], adds[0] + 6)), fake.log  # no step between them
    first_step_after = next(e for e in fake.log[adds[-1]:] if e[0] == "step")
    assert set(first_step_after[1]) >= {f"r{i}" for i in range(6)}  # they start in the same step
    assert len(fake.thread_ids) == 1  # every call ran on the stepping thread


def test_calls_return_results_and_errors_and_a_paused_engine_does_not_step() -> None:
    fake = FakeEngine(tokens=2)
    eng = InprocEngine(fake)

    async def main() -> None:
        assert await eng.collective_rpc("load", args=(7,)) == ["load", 7]
        with pytest.raises(RuntimeError, match="load failed"):
            await eng.collective_rpc("fail")
        refused = await eng.add_request("x", "bad", None)
        with pytest.raises(RequestRefused, match="engine refused request x: ValueError: prompt too long"):
            await refused.get()
        await eng.pause_generation(mode="keep")
        streams = [await eng.add_request(f"k{i}", "p", None) for i in range(3)]
        await eng.collective_rpc("sync")  # runs after the adds; no step while paused
        steps_while_paused = sum(e[0] == "step" for e in fake.log)
        await asyncio.sleep(0.05)
        assert sum(e[0] == "step" for e in fake.log) == steps_while_paused == 0
        await eng.resume_generation()
        assert [await _drain(s) for s in streams] == [[1, 2]] * 3
        # abort: requests in flight end with finish_reason "abort", between two steps
        fake.tokens = 1000
        s = await eng.add_request("a", "p", None)
        await s.get()
        await eng.pause_generation(mode="abort")
        while True:
            out = await s.get()
            if out.finished:
                break
        assert out.outputs[0].finish_reason == "abort"

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    assert [e for e in fake.log if e[0] != "step"][:4] == [("rpc", "load"), ("rpc", "fail"), ("add", "k0"),
                                                           ("add", "k1")]


def test_an_in_flight_update_loads_and_relabels_between_two_steps_keeping_every_request() -> None:
    """rollout.weight_update=in_flight on this engine: pause ("keep"), load, label, resume. The requests in
    flight are neither aborted nor restarted, no step runs between the load and the new label, and every step
    after the resume carries the new label (the tokens' version spans come from it)."""
    fake = FakeEngine(tokens=40)
    eng = InprocEngine(fake)

    async def main() -> None:
        streams = [await eng.add_request(f"r{i}", "p", None) for i in range(3)]
        while sum(e[0] == "step" for e in fake.log) < 5:  # mid-generation
            await asyncio.sleep(0.005)
        await eng.pause_generation(mode="keep")
        await eng.collective_rpc("load")
        await eng.update_weight_version("1")
        await eng.resume_generation()
        assert [await _drain(s) for s in streams] == [list(range(1, 41))] * 3  # every token, none twice

    try:
        asyncio.run(main())
    finally:
        eng.shutdown()
    i = fake.log.index(("rpc", "load"))
    assert fake.log[i + 1] == ("version", "1"), fake.log[i - 2:i + 3]  # no step between load and label
    assert not any(e[0] == "abort" for e in fake.log)
    steps_before = [e for e in fake.log[:i] if e[0] == "step"]
    steps_after = [e for e in fake.log[i:] if e[0] == "step"]
    assert steps_before and steps_after and len(steps_before) + len(steps_after) == 40
