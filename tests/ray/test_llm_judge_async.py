"""The JudgeEngine on vLLM's AsyncLLM: its scores are those of one plain vllm.LLM batch (the engine's former
path), concurrent callers each get their own answers back, and its engine-core process ends with the actor.
One engine serves the whole module (an AsyncLLM spawns its engine core: seconds to start)."""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import ray

from actors.judges.llm import JudgeEngine, judge_question

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TASK = "Write a kind note to a neighbour."
RESPONSES = ("the cat likes green tea.", "No.", "Thank you for the lovely flowers!", "go away",
             "please be safe and kind. " * 60,  # longer than max_model_len: the prompt is cut in the middle
             "1 2 3 4 5", "I will water your plants while you are away.", "")
QUESTIONS = [judge_question("Is the response polite?", TASK, r, "yesno") for r in RESPONSES]
MAX_MODEL_LEN = 256


@ray.remote(num_cpus=1, max_calls=1)
def old_path_scores(model_dir: str, questions: list[str]) -> dict[str, list[float]]:
    """Reference: the engine's former `_run`, one vllm.LLM.generate batch per mode with the same sampling
    parameters and prompt tokens (chat template, middle cut to fit max_model_len)."""
    import math

    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    from actors.judges.llm import _SYSTEM, answer_token_ids, parse_grade
    from actors.vllm_engine import make_llm

    llm = make_llm(model_dir, seed=0, max_model_len=MAX_MODEL_LEN)
    tok = llm.get_tokenizer()
    yes, no = answer_token_ids(tok)

    def token_ids(question: str, mode: str, reserve: int) -> list[int]:
        msgs = [{"role": "system", "content": _SYSTEM[mode]}, {"role": "user", "content": question}]
        ids = list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))
        limit = MAX_MODEL_LEN - reserve
        if len(ids) > limit:
            tail = min(48, limit // 2)
            ids = ids[:limit - tail] + ids[-tail:]
        return ids

    def lse(xs: list[float]) -> float:
        m = max(xs)
        return m + math.log(sum(math.exp(x - m) for x in xs))

    yes_params = SamplingParams(max_tokens=1, temperature=1.0, logprob_token_ids=yes + no, detokenize=False)
    outs = llm.generate([{"prompt_token_ids": token_ids(q, "yesno", 1)} for q in questions], yes_params,
                        use_tqdm=False)
    yesno = []
    for o in outs:
        lps = o.outputs[0].logprobs[0]
        yesno.append(1.0 / (1.0 + math.exp(lse([lps[i].logprob for i in no]) - lse([lps[i].logprob for i in yes]))))
    grade_params = SamplingParams(max_tokens=4, temperature=0.0,
                                  structured_outputs=StructuredOutputsParams(regex=r"(10|[0-9])"))
    outs = llm.generate([{"prompt_token_ids": token_ids(q, "grade", 4)} for q in questions], grade_params,
                        use_tqdm=False)
    return {"yesno": yesno, "grade": [parse_grade(o.outputs[0].text) for o in outs]}


@pytest.fixture(scope="module")
def engine(ray_module, tiny_model_dir):
    t0 = time.perf_counter()
    handle = JudgeEngine.options(max_concurrency=64).remote(tiny_model_dir, max_model_len=MAX_MODEL_LEN,
                                                            kv_cache_memory_bytes=32 * 1024 * 1024)
    ray.get(handle.ready.remote(), timeout=300)
    print(f"judge engine (AsyncLLM) ready in {time.perf_counter() - t0:.1f} s")
    yield handle
    ray.kill(handle)


def test_async_engine_scores_equal_one_plain_llm_batch(engine, tiny_model_dir) -> None:
    ref = old_path_scores.remote(tiny_model_dir, QUESTIONS)
    yesno = ray.get(engine.grade.remote(QUESTIONS, "yesno"), timeout=120)
    grades = ray.get(engine.grade.remote(QUESTIONS, "grade"), timeout=120)
    expected = ray.get(ref, timeout=300)
    assert yesno == pytest.approx(expected["yesno"], abs=1e-5)
    assert len(set(round(s, 4) for s in yesno)) > 1  # the questions score differently: a mix-up would show
    assert grades == expected["grade"]
    assert ray.get(engine.served_model.remote(), timeout=60) == {"model": tiny_model_dir,
                                                                 "max_model_len": MAX_MODEL_LEN}
    assert ray.get(engine.grade.remote([], "yesno"), timeout=60) == []
    with pytest.raises(ValueError, match="grade mode"):
        ray.get(engine.grade.remote(QUESTIONS[:1], "likert"), timeout=60)


def test_sixteen_concurrent_callers_each_get_the_scores_they_get_alone(engine) -> None:
    n = len(QUESTIONS)
    calls = [(QUESTIONS[i % n:i % n + 1 + i % 3], ("yesno", "grade")[i // 8]) for i in range(16)]
    alone = [ray.get(engine.grade.remote(qs, mode), timeout=120) for qs, mode in calls]
    with ThreadPoolExecutor(max_workers=16) as pool:
        together = list(pool.map(lambda c: ray.get(engine.grade.remote(*c), timeout=120), calls))
    assert [len(s) for s in together] == [len(qs) for qs, _ in calls]
    for got, want in zip(together, alone):
        assert got == pytest.approx(want, abs=1e-5)


def test_the_engine_core_process_ends_with_the_actor(engine) -> None:
    import psutil

    pid = ray.get(engine.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
    children = psutil.Process(pid).children(recursive=True)
    assert any("EngineCore" in " ".join(c.cmdline()) or "EngineCore" in c.name() for c in children), \
        [c.cmdline() for c in children]
    ray.kill(engine)
    _, alive = psutil.wait_procs(children, timeout=60)
    assert not alive, [(c.pid, c.cmdline()) for c in alive]
