"""A real vLLM JudgeEngine on the tiny local model. Its grades are noise (random weights), but every
step is the real path: chat prompt, next-token log-probs or constrained greedy decoding, Ray calls."""

from __future__ import annotations

import dataclasses
import math

import pytest
import ray

from actors.judges.pool import JudgePool, JudgeWorker, create_judge_engines
from actors.judges.llm import judge_question
from rvpo_async.config import Config, JudgesConfig, JudgeSpec, ModelConfig, load_config
from rvpo_async.types import Prompt, RolloutGroup, Sample

pytestmark = [pytest.mark.ray, pytest.mark.slow]

PROMPT = Prompt("p0", "<|im_start|>user\nWrite a kind note.<|im_end|>\n<|im_start|>assistant\n", (1,), {})
SPECS = [
    JudgeSpec(name="polite", kind="llm", params={"rubric": "Is the response polite?", "mode": "yesno"}),
    JudgeSpec(name="helpful", kind="llm", params={"rubric": "How helpful is the response?", "mode": "grade"}),
    JudgeSpec(name="fmt", kind="regex", params={"pattern": r"\w"}),
]


def in_unit_interval(xs: list[float]) -> bool:
    return all(math.isfinite(x) and 0.0 <= x <= 1.0 for x in xs)


def test_judge_engine_grades_in_both_modes_directly_and_through_a_judge_worker(ray_local, tiny_model_dir) -> None:
    cfg = dataclasses.replace(Config(), model=ModelConfig(path=tiny_model_dir, max_model_len=256),
                              judges=JudgesConfig(specs=SPECS, num_workers=1, concurrency=2, timeout_s=60.0))
    engines = create_judge_engines(cfg, tiny_model_dir)
    assert list(engines) == ["default"]
    engine = engines["default"]
    questions = [judge_question("Is the response polite?", PROMPT.text, text, "yesno")
                 for text in ("the cat likes green tea.", "No.", "please be safe and kind. " * 60)]
    try:
        yes = ray.get(engine.grade.remote(questions, "yesno"), timeout=120)
        grades = ray.get(engine.grade.remote(questions, "grade"), timeout=120)
        assert len(yes) == 3 and in_unit_interval(yes)
        assert len(grades) == 3 and in_unit_interval(grades)
        assert all(round(g * 10) == g * 10 for g in grades)  # a grade is an integer 0-10 over 10
        # concurrent callers are batched by the engine and each gets its own answers back
        refs = [engine.grade.remote(questions[:i], mode) for i in (1, 2, 3) for mode in ("yesno", "grade")]
        assert [len(r) for r in ray.get(refs, timeout=120)] == [1, 1, 2, 2, 3, 3]

        worker = JudgeWorker.options(max_concurrency=2).remote(SPECS, engines, 2, 60.0)
        results = ray.get(worker.score_sample.remote(PROMPT, "a kind note for you."), timeout=120)
        assert [r.status for r in results] == ["ok", "ok", "ok"], [r.reason for r in results]
        assert in_unit_interval([r.value for r in results])
        ray.kill(worker)

        pool = JudgePool(cfg, engines)
        pool.submit(RolloutGroup(7, PROMPT, (Sample((1,), (0.0,), "stop", "ok done."),
                                             Sample((2,), (0.0,), "stop", "the sun keeps a quiet room.")),
                                 policy_version=0, engine="test", created_at=0.0))
        entries = []
        while len(entries) < 6:
            got = pool.poll(timeout_s=60.0)
            assert got, f"judge pool gave nothing within 60 s: {pool.stats()}"
            entries += got
        pool.shutdown()
        assert sorted((g, s, j) for g, s, j, _ in entries) == [(7, s, j) for s in (0, 1) for j in range(3)]
        assert all(r.status == "ok" and 0.0 <= r.value <= 1.0 for *_, r in entries)

        # a judge engine whose process dies is started again, and a grading call it held is sent again
        ref = engine.grade.remote(questions, "yesno")
        ray.kill(engine, no_restart=False)
        assert ray.get(ref, timeout=300) == pytest.approx(yes, abs=1e-6)
        assert ray.get(engine.grade.remote(questions[:1], "yesno"), timeout=120) == pytest.approx(yes[:1], abs=1e-6)
    finally:
        ray.kill(engine)


def _yes_probability(model_dir: str, question: str) -> float:
    """float64 reference: P(yes) / (P(yes) + P(no)) of the next token after the yesno chat prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from actors.judges.llm import _SYSTEM, answer_token_ids

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    msgs = [{"role": "system", "content": _SYSTEM["yesno"]}, {"role": "user", "content": question}]
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    yes, no = answer_token_ids(tok)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([list(ids)])).logits[0, -1], -1)
    return float(torch.sigmoid(torch.logsumexp(logp[yes], 0) - torch.logsumexp(logp[no], 0)))


def test_llm_judges_are_served_by_the_judge_model_of_judges_engine(ray_local, tiny_model_dir, tmp_path) -> None:
    """judges.engine.model_path names a judge model other than the policy: the engine loads that model with
    its own max_model_len, and its yes/no scores are the judge model's, not the policy's."""
    from rvpo_async.tiny_model import make_tiny_model

    judge_dir = str(make_tiny_model(tmp_path / "judge-model", seed=1))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", "model.max_model_len=256",
                             f"judges.engine.model_path={judge_dir}", "judges.engine.max_model_len=320",
                             "judges.engine.kv_cache_memory_bytes=16777216", "judges.engine.num_cpus=0.5"])
    cfg = dataclasses.replace(cfg, judges=dataclasses.replace(cfg.judges, specs=SPECS[:1]))
    engines = create_judge_engines(cfg, tiny_model_dir)
    engine = engines["default"]
    try:
        served = ray.get(engine.served_model.remote(), timeout=60)
        assert served == {"model": judge_dir, "max_model_len": 320}
        questions = [judge_question("Is the response polite?", PROMPT.text, text, "yesno")
                     for text in ("the cat likes green tea.", "No.")]
        got = ray.get(engine.grade.remote(questions, "yesno"), timeout=120)
        for q, score in zip(questions, got):
            judge_ref, policy_ref = _yes_probability(judge_dir, q), _yes_probability(tiny_model_dir, q)
            assert abs(judge_ref - policy_ref) > 1e-3, "the two models must score differently for this test"
            assert score == pytest.approx(judge_ref, abs=1e-4), (score, judge_ref, policy_ref)
    finally:
        ray.kill(engine)
