"""Streaming rollout: one vLLM engine keeping many groups in flight, each emitted once its G samples end.

The engine is vLLM's AsyncLLM (`engine_core="process"`: its engine core in a process of its own) or InprocEngine
(actors/rollout/inproc.py, `"inproc"`, the default: the same interface, stepped by a thread of this process).

`StreamingRollout` is an async Ray actor. `submit` hands it groups and returns at once; every sample runs as
its own engine request (seed + j for sample j, as vLLM's n=G fan-out does), so the engine batches
continuously across groups and a short group never waits for a long one. When a group's G samples are done
it goes straight to its sinks (`connect`: the buffer actor, which stores it and hands it to the judge service
actor in the same call), and the driver only learns its id and token count (`poll`). `generate` is the
call-at-a-time form (sync mode, benchmarks).

Weight updates (`rollout.weight_update`):
- `drain`: new requests wait, in-flight ones finish under the old weights, the weights load, requests resume.
  No response mixes two policy versions.
- `interrupt`: generation is aborted where it stands, the weights load, the prefix cache is reset, and every
  interrupted sample is submitted again as prompt + the tokens it has so far (a re-prefill under the new
  weights). Tokens keep the behaviour log-probs of the weights that sampled them; each sample records the
  versions of its first and last token, and its group's policy_version is its oldest token's version, from
  which staleness is counted. Importance weights stay per token (the learner's decoupled-PPO ratio).
- `in_flight` (PipelineRL's): the engine stops between two steps keeping every request, the weights load, and
  the requests go on with their KV cache (nothing aborted, recomputed or waited for). vLLM labels each step's
  tokens with the engine's weight version (changed in the same pause), a finished output carries its tokens'
  version spans, and prompts share cached prefixes only within one version (a per-version `cache_salt`).

A version tag is exact by construction: in `drain` and `interrupt` a request is only submitted while no update
is in progress, every token it returns comes from the weights of its submission, and an aborted request's
stream ends before the new weights load; in `in_flight` the engine's label changes in the same pause as the
weights. Setup (the label, the weight-load mode) ends before any request or update, on a restarted actor too.

When a submit finds the engine idle, its requests are added while the scheduler is paused and released
together, so the engine batches them as `vllm.LLM.generate` would: with max_staleness = 0 a run samples the
same tokens whatever the timing of the calls. A prompt may cap its own responses with meta["max_new_tokens"]
(at most the engine's max_new_tokens); an interrupted sample resumes with what is left of its own budget.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import ray

from actors.vllm_engine import apply_vllm_env, check_request, make_async_llm
from rvpo_async.types import Prompt, RolloutGroup, Sample

log = logging.getLogger("rvpo_async")

WORKER_EXTENSION = "actors.rollout.weight_receiver.WeightReceiverExtension"
WEIGHT_UPDATES = ("drain", "interrupt", "in_flight")


@dataclass
class _Partial:
    """One sample being generated: what it has so far, and the versions that sampled it."""

    prompt_ids: list[int]
    seed: int | None
    max_tokens: int  # the response budget: the engine's max_new_tokens or the prompt's own
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)  # one per token: the weights that sampled it
    finish_reason: str = ""
    interruptions: int = 0


def _token_versions(c: Any, n: int, submitted: int) -> list[int]:
    """Each of the `n` tokens' version in a whole output `c`: vLLM's spans, else the submission's version."""
    spans = getattr(c, "weight_versions", None) or []
    out = [int(sp.version) for sp in spans for _ in range(int(sp.end) - int(sp.start))] if spans else [submitted] * n
    if len(out) != n:
        raise RuntimeError(f"the engine's version spans cover {len(out)} tokens of an output of {n}")
    return out


class StreamingRollout:
    def __init__(self, name: str, model_path: str, *, group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, max_model_len: int = 256,
                 kv_cache_memory_bytes: int = 64 * 1024 * 1024, version: int = 0,
                 gpu_memory_utilization: float = 0.9, gpu_kv_cache_memory_bytes: int | None = None,
                 weight_load: str = "repack", weight_update: str = "drain", ignore_eos: bool = False,
                 engine_core: str = "inproc", min_new_tokens: int = 0, compile_model: bool = False) -> None:
        apply_vllm_env()
        if weight_update not in WEIGHT_UPDATES:
            raise ValueError(f"rollout.weight_update must be one of {WEIGHT_UPDATES}, got {weight_update!r}")
        if compile_model and weight_load == "in_place":  # the compiled graph was traced on the packed weights
            raise ValueError("rollout.compile needs rollout.weight_load=repack (in_place swaps the kernels)")
        self.name, self.group_size, self.max_new_tokens = name, group_size, max_new_tokens
        self.temperature, self.top_p, self.seed, self.version = temperature, top_p, seed, version
        self.weight_update = weight_update
        self.ignore_eos = ignore_eos  # benchmarks: responses run to their budget
        self.min_new_tokens = min_new_tokens  # no end of sequence before it (rollout.min_new_tokens)
        self.engine = make_async_llm(model_path, seed=seed, max_model_len=max_model_len,
                                     kv_cache_memory_bytes=kv_cache_memory_bytes, enforce_eager=not compile_model,
                                     worker_extension_cls=WORKER_EXTENSION, logprobs_mode="processed_logprobs",
                                     gpu_memory_utilization=gpu_memory_utilization,
                                     gpu_kv_cache_memory_bytes=gpu_kv_cache_memory_bytes, engine_core=engine_core)
        self.tokenizer = self.engine.tokenizer
        self._weight_load, self._set_up, self._setting_up = weight_load, False, asyncio.Lock()  # see _setup
        self._ids = itertools.count()
        self._open = asyncio.Event()  # cleared while weights are updated: no request is submitted then
        self._open.set()
        self._admission = asyncio.Lock()  # a submit's requests enter the engine together (see _start_all)
        self._inflight = 0  # engine requests running now
        self._idle = asyncio.Condition()
        self._sinks: tuple[Any, Any] | None = None  # (buffer, judge pool) actor handles, from connect()
        self._groups: dict[int, asyncio.Task] = {}
        self._notices: list[dict[str, Any]] = []
        self._failures: list[dict[str, Any]] = []
        self.counts = {"generated_tokens": 0, "interrupted_samples": 0, "interruptions": 0,
                       "reprefilled_tokens": 0, "groups_emitted": 0, "weight_updates": 0, "tokens_streamed": 0,
                       "pause_seconds": 0.0, "load_seconds": 0.0}

    async def _setup(self) -> None:
        """Once, before the first request or update (a restarted actor too, whichever call comes first); a call
        that finds it under way waits for it to end."""
        if self._set_up:
            return
        async with self._setting_up:
            if self._set_up:
                return
            # the engine labels each step's tokens with its weight version (the version spans of an output)
            await self.engine.update_weight_version(str(self.version))
            if self._weight_load != "repack":
                await self.engine.collective_rpc("rvpo_set_weight_load", args=(str(self._weight_load),))
            self._set_up = True

    async def ready(self) -> str:
        await self._setup()
        return self.name

    # ------------------------------------------------------------------ sampling
    def _params(self, seed: int | None, max_tokens: int, min_tokens: int = 0):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        # drain, in_flight: each sample read once, at its end; interrupt: each token as it comes (an abort keeps them)
        kind = RequestOutputKind.DELTA if self.weight_update == "interrupt" else RequestOutputKind.FINAL_ONLY
        return SamplingParams(n=1, max_tokens=max_tokens, min_tokens=max(0, min(min_tokens, max_tokens)),
                              temperature=self.temperature, top_p=self.top_p, logprobs=0, seed=seed,
                              detokenize=False, ignore_eos=self.ignore_eos, output_kind=kind)

    async def _add(self, part: _Partial) -> tuple[Any, int]:
        """Submit what `part` still needs as one engine request; returns its output queue and version."""
        await self._setup()
        await self._open.wait()
        prompt = part.prompt_ids + part.token_ids
        # a resubmitted sample draws from a fresh stream: the seed moves on with each interruption
        seed = None if part.seed is None else part.seed + 1_000_003 * part.interruptions
        params = self._params(seed, part.max_tokens - len(part.token_ids), self.min_new_tokens - len(part.token_ids))
        self._inflight += 1
        q = await self.engine.add_request(f"{self.name}-{next(self._ids)}", self._inputs(prompt), params)
        return q, self.version

    def _inputs(self, prompt_ids: Sequence[int]) -> dict[str, Any]:
        """in_flight never empties the prefix cache (requests hold it): each version caches under its own salt."""
        salt = {"cache_salt": f"v{self.version}"} if self.weight_update == "in_flight" else {}
        return {"prompt_token_ids": list(prompt_ids), **salt}

    async def _run(self, part: _Partial, q: Any, version: int) -> None:
        """Read one sample's stream to its end, resubmitting it after each interruption."""
        while True:
            try:
                finished, reason = False, ""
                while not finished:
                    out = q.get_nowait() or await q.get()
                    finished = out.finished
                    c = out.outputs[0]
                    ids = [int(t) for t in c.token_ids]
                    part.token_ids += ids
                    part.logprobs += [float(next(iter(d.values())).logprob) if d else 0.0 for d in (c.logprobs or [])]
                    part.versions += ([version] * len(ids) if self.weight_update == "interrupt"  # deltas
                                      else _token_versions(c, len(ids), version))
                    self.counts["tokens_streamed"] += len(ids)
                    reason = str(c.finish_reason)
            finally:
                async with self._idle:
                    self._inflight -= 1
                    self._idle.notify_all()
            if reason != "abort" or len(part.token_ids) >= part.max_tokens:
                part.finish_reason = "length" if reason == "abort" else reason
                return
            # aborted by a weight update: go on from here under the new weights
            part.interruptions += 1
            self.counts["interrupted_samples"] += part.interruptions == 1
            self.counts["reprefilled_tokens"] += len(part.prompt_ids) + len(part.token_ids)
            q, version = await self._add(part)

    async def _start_group(self, prompt: Prompt, seed: int | None, budget: int) -> list[tuple[_Partial, Any, int]]:
        parts = [_Partial(list(prompt.token_ids), None if seed is None else int(seed) + j, budget)
                 for j in range(self.group_size)]
        return [(p, *(await self._add(p))) for p in parts]

    async def _finish_group(self, prompt: Prompt, gid: int, started: list[tuple[_Partial, Any, int]]) -> RolloutGroup:
        await asyncio.gather(*(self._run(p, q, v) for p, q, v in started))
        samples = []
        for p in (s[0] for s in started):
            if len(p.logprobs) != len(p.token_ids):
                raise RuntimeError(f"engine {self.name}: {len(p.token_ids)} tokens but {len(p.logprobs)} log-probs")
            text = self.tokenizer.decode(p.token_ids, skip_special_tokens=True)
            first, last = (p.versions[0], p.versions[-1]) if p.versions else (self.version, self.version)
            samples.append(Sample(token_ids=tuple(p.token_ids), logprobs=tuple(p.logprobs),
                                  finish_reason=p.finish_reason, text=text, first_version=first, last_version=last))
            self.counts["generated_tokens"] += len(p.token_ids)
        oldest = min(s.first_version for s in samples)
        self.counts["groups_emitted"] += 1
        return RolloutGroup(group_id=int(gid), prompt=prompt, samples=tuple(samples), policy_version=oldest,
                            engine=self.name, created_at=time.time())

    async def _start_all(self, prompts: Sequence[Prompt], seeds: Sequence[int | None],
                         budgets: Sequence[int]) -> list[list]:
        # an idle engine gets all of them in one scheduler step, as LLM.generate would (see module docstring).
        # Under the admission lock: a weight update waits until the scheduler is released again (draining
        # requests that a paused scheduler holds would never end).
        async with self._admission:
            await self._open.wait()
            batch = self._inflight == 0
            if batch:
                await self.engine.pause_generation(mode="keep", clear_cache=False)
            try:
                return [await self._start_group(p, s, b) for p, s, b in zip(prompts, seeds, budgets)]
            finally:
                if batch:
                    await self.engine.resume_generation()

    async def generate(self, prompts: Sequence[Prompt], group_ids: Sequence[int],
                       seeds: Sequence[int] | None = None) -> list[RolloutGroup]:
        """Call-at-a-time: G samples for each prompt, returned together (sync mode, benchmarks, tests)."""
        seeds, budgets = check_request(prompts, group_ids, seeds, self.max_new_tokens)
        started = await self._start_all(prompts, seeds, budgets)
        return list(await asyncio.gather(*(self._finish_group(p, g, s)
                                           for p, g, s in zip(prompts, group_ids, started))))

    # ------------------------------------------------------------------ streaming data path
    def connect(self, buffer: Any, judges: Any) -> None:
        """Finished groups go to `buffer.put_group(group, judges=judges)`: stored, then handed to the judges."""
        self._sinks = (buffer, judges)

    async def submit(self, prompts: Sequence[Prompt], group_ids: Sequence[int],
                     seeds: Sequence[int] | None = None) -> int:
        """Start the groups and return at once; each goes to the sinks when its samples are done."""
        if self._sinks is None:
            raise RuntimeError(f"engine {self.name}: submit before connect(buffer, judges)")
        seeds, budgets = check_request(prompts, group_ids, seeds, self.max_new_tokens)
        started = await self._start_all(prompts, seeds, budgets)
        for p, g, s in zip(prompts, group_ids, started):
            self._groups[int(g)] = asyncio.create_task(self._deliver(p, int(g), s))
        return len(prompts)

    async def _deliver(self, prompt: Prompt, gid: int, started: list) -> None:
        try:
            group = await self._finish_group(prompt, gid, started)
            buffer, judges = self._sinks  # type: ignore[misc]
            await buffer.put_group.remote(group, judges=judges)  # the buffer hands it to the judges
            self._notices.append({"group_id": gid, "tokens": sum(len(s.token_ids) for s in group.samples),
                                  "samples": len(group.samples), "policy_version": group.policy_version})
        except Exception as e:  # the driver hears of it in poll() and stops the run naming this engine
            self._failures.append({"group_id": gid, "error": f"{type(e).__name__}: {e}"})
        finally:
            self._groups.pop(gid, None)

    async def poll(self) -> dict[str, Any]:
        """Groups delivered since the last poll (ids and counts only), failures, and the groups in flight."""
        notices, self._notices = self._notices, []
        failures, self._failures = self._failures, []
        return {"delivered": notices, "failed": failures, "in_flight": sorted(self._groups)}

    # ------------------------------------------------------------------ weights
    async def _pause(self) -> None:
        await self._setup()
        async with self._admission:
            self._open.clear()
        if self.weight_update == "interrupt":
            self.counts["interruptions"] += self._inflight > 0
            await self.engine.pause_generation(mode="abort", clear_cache=False)
        async with self._idle:  # aborted streams end at once; drained ones when their samples finish
            await self._idle.wait_for(lambda: self._inflight == 0)

    async def _resume(self, version: int) -> int:
        await self.engine.reset_prefix_cache()
        self.version = int(version)
        self.counts["weight_updates"] += 1
        await self.engine.update_weight_version(str(self.version))
        if await self.engine.is_paused():
            await self.engine.resume_generation()
        self._open.set()
        return self.version

    async def _load_in_flight(self, version: int, method: str, arg: Any) -> int:
        """Stop between two steps keeping every request, load, relabel, go on (never inside a submit)."""
        await self._setup()
        async with self._admission:
            await self.engine.pause_generation(mode="keep", clear_cache=False)
            t1 = time.perf_counter()
            try:
                await self.engine.collective_rpc(method, args=(arg,))
                await self.engine.update_weight_version(str(int(version)))
                self.version = int(version)
                self.counts["weight_updates"] += 1
            finally:
                await self.engine.resume_generation()
        self.counts["load_seconds"] += time.perf_counter() - t1
        return self.version

    async def _load(self, version: int, method: str, arg: Any) -> int:
        """Pause (drain or interrupt), run the weight receiver's `method`, resume serving `version`."""
        if self.weight_update == "in_flight":
            return await self._load_in_flight(version, method, arg)
        t0 = time.perf_counter()
        await self._pause()
        t1 = time.perf_counter()
        try:
            await self.engine.collective_rpc(method, args=(arg,))
        finally:
            version = await self._resume(version)
        self.counts["pause_seconds"] += t1 - t0  # draining (or stopping) the requests in flight
        self.counts["load_seconds"] += time.perf_counter() - t1
        return version

    async def update_weights(self, version: int, blob: Any) -> int:
        """Load a safetensors blob of the full state dict; the engine then serves `version`."""
        return await self._load(version, "rvpo_load_blob",
                                blob if isinstance(blob, bytes) else bytes(memoryview(blob).cast("B")))

    async def init_weight_group(self, master_addr: str, master_port: int, world_size: int, rank: int) -> None:
        await self.engine.collective_rpc("rvpo_init_group", args=(str(master_addr), int(master_port),
                                                                  int(world_size), int(rank)))

    async def receive_weights(self, version: int, meta: Any) -> int:
        """Receive a broadcast from learner rank 0 over the collective group (all members call together)."""
        return await self._load(version, "rvpo_receive_broadcast", meta)

    async def get_version(self) -> int:
        return self.version

    async def stats(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "in_flight_requests": self._inflight,
                "groups_in_flight": len(self._groups), **self.counts}

    # ------------------------------------------------------------------ evaluation and checks
    async def sample_texts(self, prompts: Sequence[Prompt], n: int, temperature: float, max_tokens: int,
                           seed: int = 0, min_version: int = 0) -> tuple[list[list[str]], int, int]:
        """Evaluation: n decoded responses per prompt (temperature 0 = greedy), the policy version that wrote
        them and the tokens generated. Nothing here feeds training; waits for any weight update to end, and
        until the engine serves `min_version`."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        while self.version < min_version:  # a weight update on its way (the learner does not wait for it)
            await asyncio.sleep(0.01)
        await self._open.wait()
        version = self.version
        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed, detokenize=False,
                                output_kind=RequestOutputKind.FINAL_ONLY)

        async def one(p: Prompt) -> list[list[int]]:
            while True:  # an interrupting weight update aborts it: ask again
                final = None
                async for out in self.engine.generate(self._inputs(p.token_ids), params,
                                                      request_id=f"{self.name}-eval-{next(self._ids)}"):
                    final = out
                if all(str(c.finish_reason) != "abort" for c in final.outputs):
                    outs = sorted(final.outputs, key=lambda c: c.index)
                    seen.update(int(s.version) for c in outs for s in (getattr(c, "weight_versions", None) or []))
                    return [list(c.token_ids) for c in outs]
                await self._open.wait()

        seen: set[int] = set()
        outs = await asyncio.gather(*(one(p) for p in prompts))
        texts = [[self.tokenizer.decode(ids, skip_special_tokens=True) for ids in o] for o in outs]
        # in_flight: an update may land while they are written; the oldest weights that wrote a token count
        return texts, min(seen, default=version), sum(len(ids) for o in outs for ids in o)

    async def score_tokens(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        """Log-prob of each of `response_ids` after `prompt_ids` under the engine's current weights."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        await self._open.wait()
        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False,
                            output_kind=RequestOutputKind.FINAL_ONLY)
        full = list(prompt_ids) + list(response_ids)
        final = None
        async for out in self.engine.generate(self._inputs(full), sp,
                                              request_id=f"{self.name}-score-{next(self._ids)}"):
            final = out
        plp = final.prompt_logprobs
        return [float(plp[i][full[i]].logprob) for i in range(len(prompt_ids), len(full))]

    def shutdown(self) -> None:
        self.engine.shutdown()


# The Ray actor hosting one streaming engine (an async actor: every method runs on one event loop); its remote
# options come from rvpo_async.placement.
StreamingRolloutActor = ray.remote(StreamingRollout)
