"""Judges scored by a language model: one served by vLLM in a Ray actor, or an OpenAI-compatible URL.

The vLLM judge engine (`JudgeEngine`, an async Ray actor around `VLLMGrader`) serves a vLLM AsyncLLM. Each
`grade` call sends one engine request per question at once (unique request ids, only the final output
streamed back); the engine batches every request in flight, from every caller, step by step (continuous
batching), so many judge workers' calls share the engine with no batching code here. A call cancelled by
its caller (a judge past its deadline) aborts its requests in the engine. The engine core runs in a child
process of the actor, ended by `shutdown` (or the object's finalizer), and by Ray when it kills the actor.

Both ask the same rubric question about a (task, response) pair, in one of two modes:
- 'yesno': the score is P(yes) / (P(yes) + P(no)). The vLLM engine reads it from the next-token
  log-probs of the answer tokens (every single-token spelling of yes/no the tokenizer has), which is
  smoother than a sampled word; the HTTP judge parses the reply's first yes/no word.
- 'grade': a short greedy reply holding a number 0-10, divided by 10. The vLLM engine constrains
  decoding to that number, so even a weak judge model yields a parseable grade.

Texts embedded in the judge prompt lose chat-control markers (`<|...|>`), so a response cannot close
the judge's turn and answer for it. The HTTP judge reads its API key from the environment at call
time and never keeps, logs or repeats it: it is scrubbed from every error message.
"""

from __future__ import annotations

import asyncio
import http.client
import itertools
import json
import math
import os
import re
import uuid
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import ray

from actors.judges.base import Judge, Params
from rvpo_async.config import JudgeSpec
from rvpo_async.types import Prompt

GradeMode = Literal["yesno", "grade"]
MODES: tuple[str, ...] = ("yesno", "grade")
YES_SPELLINGS = (" yes", "yes", " Yes", "Yes", " YES", "YES")
NO_SPELLINGS = (" no", "no", " No", "No", " NO", "NO")
_SYSTEM = {
    "yesno": "You grade a response against one rubric item. Reply with only yes or no.",
    "grade": "You grade a response against one rubric item. Reply with only an integer score from 0 to 10.",
}
_ASK = {"yesno": "Does the response satisfy the rubric? Answer yes or no.",
        "grade": "Score the response against the rubric from 0 to 10."}


def _plain(text: str) -> str:
    return re.sub(r"<\|[^|<>]*\|>", " ", text)


def judge_question(rubric: str, task: str, response: str, mode: str) -> str:
    """The user message a judge model sees (the system message comes from `_SYSTEM[mode]`)."""
    return (f"Rubric: {_plain(rubric)}\n\nTask:\n{_plain(task).strip()}\n\nResponse:\n{_plain(response).strip()}"
            f"\n\n{_ASK[mode]}")


def parse_yes_no(reply: str) -> float | None:
    m = re.search(r"\b(yes|no)\b", reply, re.IGNORECASE)
    return None if m is None else (1.0 if m.group(1).lower() == "yes" else 0.0)


def parse_grade(reply: str) -> float | None:
    m = re.search(r"\d+(?:\.\d+)?", reply)
    if m is None or not 0 <= float(m.group()) <= 10:
        return None
    return float(m.group()) / 10


def answer_token_ids(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids of every yes/no spelling that is a single token for this tokenizer."""
    def single(words: tuple[str, ...]) -> set[int]:
        ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        return {i[0] for i in ids if len(i) == 1}

    yes, no = single(YES_SPELLINGS), single(NO_SPELLINGS)
    if not yes or not no or yes & no:
        raise ValueError(f"judge model tokenizer has no distinct single-token yes/no (yes ids {sorted(yes)}, "
                         f"no ids {sorted(no)}); use mode 'grade' with this judge model")
    return sorted(yes), sorted(no)


class VLLMGrader:
    """A vLLM AsyncLLM answering rubric questions, inside an async Ray actor (`JudgeEngine`).

    Every `grade` call sends one engine request per question, all at once; the engine batches whatever is
    in flight, from every caller, step by step (continuous batching) and returns each request its own
    output. Its engine core runs in a child process, which `shutdown` (or the object's finalizer) stops."""

    def __init__(self, model_path: str, *, max_model_len: int = 256, seed: int = 0,
                 kv_cache_memory_bytes: int = 64 * 1024 * 1024, grade_max_tokens: int = 4,
                 gpu_memory_utilization: float = 0.9, gpu_kv_cache_memory_bytes: int | None = None):
        from actors.vllm_engine import make_async_llm

        self._engine = make_async_llm(model_path, seed=seed, max_model_len=max_model_len,
                                      kv_cache_memory_bytes=kv_cache_memory_bytes,
                                      gpu_memory_utilization=gpu_memory_utilization,
                                      gpu_kv_cache_memory_bytes=gpu_kv_cache_memory_bytes)
        self._tok = self._engine.get_tokenizer()
        self._yes, self._no = answer_token_ids(self._tok)
        self._max_model_len = max_model_len
        self._grade_max_tokens = grade_max_tokens
        self._prefix = f"judge-{uuid.uuid4().hex[:8]}-"
        self._next_id = itertools.count()

    async def ready(self) -> bool:
        return True

    async def served_model(self) -> dict[str, Any]:
        """The model this engine serves, as vLLM loaded it."""
        mc = self._engine.model_config
        return {"model": mc.model, "max_model_len": int(mc.max_model_len)}

    async def grade(self, prompts: list[str], mode: str) -> list[float]:
        """One score in [0, 1] per rubric question, or NaN where a grade reply held no number 0-10."""
        if mode not in MODES:
            raise ValueError(f"grade mode must be one of {MODES}, got {mode!r}")
        if not prompts:
            return []
        params, reserve = self._params(mode)
        tasks = [asyncio.ensure_future(self._generate(self._token_ids(q, mode, reserve), params))
                 for q in prompts]
        try:
            outs = await asyncio.gather(*tasks)
        finally:  # a failed or cancelled call leaves none of its requests running in the engine
            for t in tasks:
                t.cancel()
        return [self._score(mode, o) for o in outs]

    def shutdown(self) -> None:
        """Stop the engine and its engine-core process (idempotent)."""
        engine, self._engine = getattr(self, "_engine", None), None
        if engine is not None:
            engine.shutdown()

    def __del__(self) -> None:
        self.shutdown()

    def _params(self, mode: str) -> tuple[Any, int]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        if mode == "yesno":
            return SamplingParams(max_tokens=1, temperature=1.0, logprob_token_ids=self._yes + self._no,
                                  detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY), 1
        return SamplingParams(max_tokens=self._grade_max_tokens, temperature=0.0,
                              structured_outputs=StructuredOutputsParams(regex=r"(10|[0-9])"),
                              output_kind=RequestOutputKind.FINAL_ONLY), self._grade_max_tokens

    async def _generate(self, token_ids: list[int], params: Any) -> Any:
        final = None
        async for out in self._engine.generate({"prompt_token_ids": token_ids}, params,
                                               request_id=f"{self._prefix}{next(self._next_id)}"):
            final = out
        return final

    def _token_ids(self, question: str, mode: str, reserve: int) -> list[int]:
        msgs = [{"role": "system", "content": _SYSTEM[mode]}, {"role": "user", "content": question}]
        ids = list(self._tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                 return_dict=False))
        limit = self._max_model_len - reserve
        if len(ids) > limit:  # cut the middle (the response's tail), keep the instructions at both ends
            tail = min(48, limit // 2)
            ids = ids[:limit - tail] + ids[-tail:]
        return ids

    def _score(self, mode: str, out: Any) -> float:
        if mode == "grade":
            return math.nan if (g := parse_grade(out.outputs[0].text)) is None else g
        lps = out.outputs[0].logprobs[0]
        lse_yes = _logsumexp([lps[i].logprob for i in self._yes])
        lse_no = _logsumexp([lps[i].logprob for i in self._no])
        return 1.0 / (1.0 + math.exp(min(lse_no - lse_yes, 700.0)))


def _logsumexp(xs: list[float]) -> float:
    m = max(xs)
    return m if m == -math.inf else m + math.log(sum(math.exp(x - m) for x in xs))


JudgeEngine = ray.remote(VLLMGrader)


@dataclass(frozen=True)
class LLMJudge:
    name: str
    rubric: str
    mode: str
    engine_name: str
    engine: Any  # JudgeEngine actor handle
    timeout_s: float
    low: float = 0.0
    high: float = 1.0

    def score(self, prompt: Prompt, sample_text: str) -> float:
        ref = self.engine.grade.remote([judge_question(self.rubric, prompt.text, sample_text, self.mode)], self.mode)
        try:
            return ray.get(ref, timeout=self.timeout_s)[0]
        except ray.exceptions.GetTimeoutError:
            try:
                ray.cancel(ref)
            except Exception:  # the call may have finished or its actor gone: nothing left to cancel
                pass
            raise TimeoutError(f"judge '{self.name}': engine '{self.engine_name}' gave no grade within "
                               f"{self.timeout_s:g}s") from None


def _timeout(spec: JudgeSpec, deps: Mapping[str, Any]) -> float:
    return float(spec.timeout_s or deps.get("default_timeout_s") or 10.0)


def build_llm_judge(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    p = Params(spec, ["rubric"], {"mode": "yesno", "engine": "default"})
    engines: Mapping[str, Any] = deps.get("engine_handles") or {}
    name = p.text("engine")
    if name not in engines:
        raise p.error("engine", f"names no judge engine: {name!r}; engines started: {sorted(engines) or 'none'}"
                                " (create_judge_engines starts one per engine name)")
    return LLMJudge(spec.name, p.text("rubric"), p.choice("mode", MODES), name, engines[name], _timeout(spec, deps))


@dataclass(frozen=True)
class HTTPJudge:
    """Holds the name of the key's environment variable, never the key."""

    name: str
    url: str
    model: str
    rubric: str
    mode: str
    api_key_env: str
    timeout_s: float
    low: float = 0.0
    high: float = 1.0

    def score(self, prompt: Prompt, sample_text: str) -> float:
        return self.ask(judge_question(self.rubric, prompt.text, sample_text, self.mode))

    def ask(self, question: str) -> float:
        """The grade of one judge question (a rubric judge asks one per criterion)."""
        key = os.environ.get(self.api_key_env, "")
        body = {"model": self.model, "temperature": 0, "max_tokens": 8, "messages": [
            {"role": "system", "content": _SYSTEM[self.mode]}, {"role": "user", "content": question}]}
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        req = urllib.request.Request(self.url, data=json.dumps(body).encode(), headers=headers, method="POST")
        problem = ""
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                reply = json.loads(resp.read())["choices"][0]["message"]["content"]
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace")
            hint = "" if key else f" (no API key sent: {self.api_key_env} is not set)"
            problem = f"HTTP {e.code} from {self.url}{hint}: {detail}"
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            problem = f"request to {self.url} failed: {getattr(e, 'reason', e)}"
        except (ValueError, KeyError, IndexError, TypeError) as e:
            problem = f"reply from {self.url} is not a chat completion ({type(e).__name__}: {e})"
        if problem:  # raised outside the except blocks so no original exception rides along as context
            raise RuntimeError(_redact(f"judge '{self.name}': {problem}", key))
        value = (parse_yes_no if self.mode == "yesno" else parse_grade)(str(reply))
        if value is None:
            raise ValueError(_redact(f"judge '{self.name}': no {self.mode} answer in reply {str(reply)[:200]!r}", key))
        return value


def _redact(message: str, key: str) -> str:
    return message.replace(key, "[redacted]") if key else message


def http_url(p: Params) -> str:
    """The chat-completions URL of params `base_url` (with or without its /v1)."""
    base = p.text("base_url").rstrip("/")
    if not re.match(r"https?://", base):
        raise p.error("base_url", f"must start with http:// or https://, got {base!r}")
    return base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")


def build_http_judge(spec: JudgeSpec, deps: Mapping[str, Any]) -> Judge:
    p = Params(spec, ["base_url", "model", "rubric"], {"api_key_env": "OPENAI_API_KEY", "mode": "yesno"})
    return HTTPJudge(spec.name, http_url(p), p.text("model"), p.text("rubric"), p.choice("mode", MODES),
                     p.text("api_key_env"), _timeout(spec, deps))
