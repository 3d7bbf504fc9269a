"""StreamingRollout._setup (actors/rollout/streaming.py) runs once and every call waits for it: a request or
weight update that reaches a restarted actor while its setup is under way must not go ahead of the engine's
version label or weight-load mode. A fake engine stands in for vLLM (the logic only)."""

from __future__ import annotations

import asyncio

from actors.rollout.streaming import StreamingRollout


class SlowEngine:
    """Records each setup call; each takes a few event-loop turns, so a second caller can arrive meanwhile."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    async def update_weight_version(self, version: str) -> None:
        await asyncio.sleep(0.05)
        self.calls.append(("label", version))

    async def collective_rpc(self, method: str, args: tuple = ()) -> None:
        await asyncio.sleep(0.05)
        self.calls.append((method, *args))


def _rollout(engine: SlowEngine) -> StreamingRollout:
    r = StreamingRollout.__new__(StreamingRollout)  # no vLLM engine: only what _setup reads
    r.engine, r.version, r._weight_load = engine, 7, "in_place"
    r._set_up, r._setting_up = False, asyncio.Lock()
    return r


def test_a_call_arriving_during_setup_waits_for_it_and_setup_runs_once() -> None:
    async def main() -> list[list[tuple]]:
        engine = SlowEngine()
        r = _rollout(engine)
        seen: list[list[tuple]] = []

        async def call() -> None:
            await r._setup()
            seen.append(list(engine.calls))  # what the engine had done when this call went ahead

        await asyncio.gather(call(), call(), call())
        await call()
        return seen

    seen = asyncio.run(main())
    done = [("label", "7"), ("rvpo_set_weight_load", "in_place")]
    assert seen == [done] * 4  # no call went ahead of the setup, and it ran once
