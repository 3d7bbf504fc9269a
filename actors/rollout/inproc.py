"""An in-process vLLM engine with the part of AsyncLLM's interface the streaming rollout uses.

vLLM's AsyncLLM always runs its engine core in a process of its own, fed over ZeroMQ by an output-handler
thread in the caller: on a small CPU box that front end costs about a third of a core next to the engine core
itself (BENCHMARKS.md). `InprocEngine` keeps the engine core, the scheduler and the model in the actor's own
process: one thread steps a `vllm.v1.engine.llm_engine.LLMEngine` (an in-process engine core when
VLLM_ENABLE_V1_MULTIPROCESSING=0, as actors.vllm_engine sets), and hands each step's outputs to the event loop.
`rollout.engine_core: inproc` (the default) selects it; `process` selects AsyncLLM.

One thread owns the engine: every engine call (adding a request, aborting, loading weights) is posted to it
and runs between two steps, all the calls posted since the last step first, in order. Adding a request is
posted without waiting, so the requests of one submit enter the engine before its next step even while it is
busy (each add under a lock shared with the step took up to a step of its own). Paused ("keep"), the thread
stops stepping and added requests wait in the scheduler, so requests added while paused start in one step.
Paused with "abort", every request in flight is aborted between two steps, so each token a request produced has
already been delivered, and its stream ends with an output whose finish_reason is "abort" (as AsyncLLM's does).
"""

from __future__ import annotations

import asyncio
import collections
import threading
from types import SimpleNamespace
from typing import Any, AsyncIterator


class RequestRefused(RuntimeError):
    """A request the engine would not take (add_request raised); its stream ends with this."""


class _Collector:
    """One request's outputs, in order: `get_nowait()` (None when empty) and `await get()`."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._ready = asyncio.Event()

    def put(self, out: Any) -> None:
        self._items.append(out)
        self._ready.set()

    def get_nowait(self) -> Any:
        if not self._items:
            return None
        out = self._items.popleft()
        if not self._items:
            self._ready.clear()
        return out

    async def get(self) -> Any:
        while not self._items:
            await self._ready.wait()
        return self.get_nowait()


def _aborted(request_id: str) -> Any:
    """The last output of an aborted request: no new tokens, finish_reason 'abort'."""
    return SimpleNamespace(request_id=request_id, finished=True, prompt_logprobs=None,
                           outputs=[SimpleNamespace(index=0, token_ids=[], logprobs=[], finish_reason="abort")])


class InprocEngine:
    """AsyncLLM's add_request / generate / pause_generation / resume_generation / is_paused /
    update_weight_version / reset_prefix_cache / collective_rpc / tokenizer / shutdown, over an LLMEngine
    stepped by one thread.
    The event loop that awaits its streams is the one of the first `add_request`."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.tokenizer = engine.get_tokenizer()
        self._loop: asyncio.AbstractEventLoop | None = None  # set by the first add_request
        self._wake = threading.Condition()  # guards the flags and the mailbox
        self._calls: collections.deque = collections.deque()  # engine calls for the stepping thread
        self._paused = False
        self._stop = False
        self._streams: dict[str, _Collector] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="vllm-inproc-step", daemon=True)
        self._thread.start()

    @classmethod
    def from_engine_args(cls, kwargs: dict[str, Any]) -> "InprocEngine":
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        return cls(LLMEngine.from_engine_args(EngineArgs(**kwargs)))

    # ---------------------------------------------------------------- the stepping thread
    def _run(self) -> None:
        """The only thread that touches the engine: runs the calls posted since the last step (all of them,
        in order), then one step unless paused."""
        work = False  # requests may be unfinished: step
        while True:
            with self._wake:
                self._wake.wait_for(lambda: self._stop or self._calls or (work and not self._paused))
                if self._stop:
                    break
                calls, paused = list(self._calls), self._paused
                self._calls.clear()
            for fn, args, done in calls:
                try:
                    result, error = fn(*args), None
                except Exception as e:  # the caller hears of it
                    result, error = None, e
                done(result, error)
            if calls:
                work = self.engine.has_unfinished_requests()
            if paused or not work:
                continue
            try:
                outs = self.engine.step()
                work = self.engine.has_unfinished_requests()
            except BaseException as e:  # every stream in flight hears of it
                self._error = e
                assert self._loop is not None
                self._loop.call_soon_threadsafe(self._fail_all, e)
                break
            if outs and self._loop is not None:
                self._loop.call_soon_threadsafe(self._deliver, outs)
        with self._wake:  # calls posted after the end: refused
            calls = list(self._calls)
            self._calls.clear()
        for _fn, _args, done in calls:
            done(None, RuntimeError("the in-process engine has stopped"))

    def _deliver(self, outs: list[Any]) -> None:
        for out in outs:
            stream = self._streams.get(out.request_id)
            if stream is None:  # aborted after this step: its stream already ended
                continue
            stream.put(out)
            if out.finished:
                del self._streams[out.request_id]

    def _fail_all(self, e: BaseException) -> None:
        for stream in self._streams.values():
            stream.put(e)
        self._streams.clear()

    def _set(self, **flags: bool) -> None:
        with self._wake:
            for k, v in flags.items():
                setattr(self, k, v)
            self._wake.notify_all()

    def _post(self, fn: Any, args: tuple, done: Any) -> None:
        """Hand `fn(*args)` to the stepping thread: it runs before the next step; `done(result, error)` then."""
        if self._error is not None:
            raise RuntimeError(f"the in-process engine failed: {self._error!r}") from self._error
        with self._wake:
            if self._stop:
                raise RuntimeError("the in-process engine has stopped")
            self._calls.append((fn, args, done))
            self._wake.notify_all()

    async def _call(self, fn: Any, *args: Any) -> Any:
        """An engine call between two steps, run by the stepping thread; returns its result."""
        loop = asyncio.get_running_loop()
        fut = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if not fut.done():
                if error is None:
                    fut.set_result(result)
                else:
                    fut.set_exception(error)

        self._post(fn, args, lambda result, error: loop.call_soon_threadsafe(settle, result, error))
        return await fut

    # ---------------------------------------------------------------- AsyncLLM's interface
    async def add_request(self, request_id: str, prompt: Any, params: Any) -> "_Stream":
        """`request_id` must be unique among the requests in flight (outputs carry it back)."""
        loop = self._loop = self._loop or asyncio.get_running_loop()
        stream = _Collector()
        self._streams[request_id] = stream  # before the engine has it: its first output may come at once

        def refused(_result: Any, error: BaseException | None) -> None:
            if error is not None:  # the request never entered the engine: its stream ends with the error
                loop.call_soon_threadsafe(self._refuse, request_id, error)

        # posted, not awaited: the requests of one submit enter the engine together, before its next step
        self._post(self.engine.add_request, (request_id, prompt, params), refused)
        return _Stream(stream)

    def _refuse(self, request_id: str, error: BaseException) -> None:
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            refusal = RequestRefused(f"the engine refused request {request_id}: {type(error).__name__}: {error}")
            refusal.__cause__ = error
            stream.put(refusal)

    async def generate(self, prompt: Any, params: Any, request_id: str) -> AsyncIterator[Any]:
        stream = await self.add_request(request_id, prompt, params)
        while True:
            out = await stream.get()
            yield out
            if out.finished:
                return

    async def pause_generation(self, mode: str = "keep", clear_cache: bool = False) -> None:
        self._set(_paused=True)
        if mode == "abort" and self._streams:
            ids = list(self._streams)
            await self._call(self.engine.abort_request, ids)  # between two steps: what they made is delivered
            for rid in ids:
                stream = self._streams.pop(rid, None)
                if stream is not None:
                    stream.put(_aborted(rid))
        if clear_cache:
            await self.reset_prefix_cache()

    async def resume_generation(self) -> None:
        self._set(_paused=False)

    async def is_paused(self) -> bool:
        return self._paused

    async def update_weight_version(self, version: str) -> None:
        """Label the outputs of later steps `version` (vLLM's per-token version spans), between two steps."""
        await self._call(self.engine.set_weight_version, str(version))

    async def reset_prefix_cache(self) -> bool:
        return bool(await self._call(self.engine.reset_prefix_cache))

    async def collective_rpc(self, method: str, args: tuple = ()) -> list[Any]:
        return await self._call(lambda: self.engine.collective_rpc(method, args=args))

    def shutdown(self) -> None:
        self._set(_stop=True)
        self._thread.join(timeout=10)
        core = getattr(self.engine, "engine_core", None)
        if core is not None:
            core.shutdown()


class _Stream:
    """What add_request returns: the collector, raising an engine failure in place of an output."""

    def __init__(self, collector: _Collector) -> None:
        self._c = collector

    def get_nowait(self) -> Any:
        return self._raise(self._c.get_nowait())

    async def get(self) -> Any:
        return self._raise(await self._c.get())

    @staticmethod
    def _raise(out: Any) -> Any:
        if isinstance(out, RequestRefused):
            raise out
        if isinstance(out, BaseException):
            raise RuntimeError(f"the in-process engine failed: {out!r}") from out
        return out
