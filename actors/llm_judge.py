"""Judges scored by a language model: one served by vLLM in a Ray actor, or an OpenAI-compatible URL.

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

import json
import math
import os
import queue
import http.client
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Literal

import ray

from actors.judges import Judge, Params
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
    """A vLLM engine answering rubric questions. Concurrent `grade` calls (from many judge workers)
    queue up and one engine thread runs everything queued as one batch per mode: the engine is not
    thread-safe, and batching is where its throughput comes from."""

    def __init__(self, model_path: str, *, max_model_len: int = 256, seed: int = 0,
                 kv_cache_memory_bytes: int = 64 * 1024 * 1024, grade_max_tokens: int = 4,
                 gpu_memory_utilization: float = 0.9, gpu_kv_cache_memory_bytes: int | None = None):
        from actors.vllm_engine import make_llm

        self._llm = make_llm(model_path, seed=seed, max_model_len=max_model_len,
                             kv_cache_memory_bytes=kv_cache_memory_bytes, gpu_memory_utilization=gpu_memory_utilization,
                             gpu_kv_cache_memory_bytes=gpu_kv_cache_memory_bytes)
        self._tok = self._llm.get_tokenizer()
        self._yes, self._no = answer_token_ids(self._tok)
        self._max_model_len = max_model_len
        self._grade_max_tokens = grade_max_tokens
        self._requests: queue.Queue[tuple[str, list[str], Future[list[float]]]] = queue.Queue()
        threading.Thread(target=self._serve, name="judge-engine", daemon=True).start()

    def ready(self) -> bool:
        return True

    def served_model(self) -> dict[str, Any]:
        """The model this engine serves, as vLLM loaded it."""
        mc = self._llm.llm_engine.model_config
        return {"model": mc.model, "max_model_len": int(mc.max_model_len)}

    def grade(self, prompts: list[str], mode: str) -> list[float]:
        """One score in [0, 1] per rubric question, or NaN where a grade reply held no number 0-10."""
        if mode not in MODES:
            raise ValueError(f"grade mode must be one of {MODES}, got {mode!r}")
        if not prompts:
            return []
        fut: Future[list[float]] = Future()
        self._requests.put((mode, list(prompts), fut))
        return fut.result()

    def _serve(self) -> None:
        while True:
            batch = [self._requests.get()]
            while not self._requests.empty():
                batch.append(self._requests.get_nowait())
            for mode in MODES:
                part = [r for r in batch if r[0] == mode]
                if not part:
                    continue
                try:
                    scores = self._run(mode, [p for _, ps, _ in part for p in ps])
                except Exception as e:  # a failed batch fails its callers, never the engine thread
                    for _, _, fut in part:
                        fut.set_exception(e)
                    continue
                for _, ps, fut in part:
                    fut.set_result(scores[:len(ps)])
                    scores = scores[len(ps):]

    def _token_ids(self, question: str, mode: str, reserve: int) -> list[int]:
        msgs = [{"role": "system", "content": _SYSTEM[mode]}, {"role": "user", "content": question}]
        ids = list(self._tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True,
                                                 return_dict=False))
        limit = self._max_model_len - reserve
        if len(ids) > limit:  # cut the middle (the response's tail), keep the instructions at both ends
            tail = min(48, limit // 2)
            ids = ids[:limit - tail] + ids[-tail:]
        return ids

    def _run(self, mode: str, questions: list[str]) -> list[float]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if mode == "yesno":
            params = SamplingParams(max_tokens=1, temperature=1.0, logprob_token_ids=self._yes + self._no,
                                    detokenize=False)
        else:
            params = SamplingParams(max_tokens=self._grade_max_tokens, temperature=0.0,
                                    structured_outputs=StructuredOutputsParams(regex=r"(10|[0-9])"))
        reserve = 1 if mode == "yesno" else self._grade_max_tokens
        inputs = [{"prompt_token_ids": self._token_ids(q, mode, reserve)} for q in questions]
        outs = self._llm.generate(inputs, params, use_tqdm=False)
        if mode == "grade":
            return [math.nan if (g := parse_grade(o.outputs[0].text)) is None else g for o in outs]
        scores = []
        for o in outs:
            lps = o.outputs[0].logprobs[0]
            lse_yes = _logsumexp([lps[i].logprob for i in self._yes])
            lse_no = _logsumexp([lps[i].logprob for i in self._no])
            scores.append(1.0 / (1.0 + math.exp(min(lse_no - lse_yes, 700.0))))
        return scores


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
