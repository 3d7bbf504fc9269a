"""actors/judges/worker.py's SampleScorer: every judge of a sample on threads of its own, each with its own
deadline; a batch of samples scored together."""

from __future__ import annotations

import threading
import time

from actors.judges.worker import SampleScorer
from rvpo_async.config import JudgeSpec
from rvpo_async.types import Prompt

PROMPT = Prompt("p0", "<|im_start|>user\nWhat is 6 x 7?<|im_end|>\n", (1, 2, 3), {"answer": "42"})


class _HangJudge:
    """Never answers until released: a rubric service that accepted the connection and went silent."""

    name, low, high = "hang", 0.0, 1.0

    def __init__(self, release: threading.Event) -> None:
        self.release = release

    def score(self, prompt: Prompt, sample_text: str) -> float:
        self.release.wait()
        return 1.0


def test_a_hung_judge_times_out_alone_and_never_starves_the_other_judges() -> None:
    release = threading.Event()
    specs = [JudgeSpec(name="hang", kind="hang", timeout_s=0.05), JudgeSpec(name="fmt", kind="regex",
                                                                              params={"pattern": r"\w"}, timeout_s=5.0)]
    scorer = SampleScorer(specs, concurrency=2, extra_builders={"hang": lambda spec, deps: _HangJudge(release)})
    try:
        # many more calls than the worker has threads: every hung call keeps its thread
        for _ in range(12):
            hang, fmt = scorer.score_sample(PROMPT, "a kind note.")
            assert hang.status == "timeout"
            assert fmt.status == "ok" and fmt.value == 1.0, fmt
    finally:
        release.set()


class _SleepJudge:
    name, low, high = "sleep", 0.0, 1.0

    def score(self, prompt: Prompt, sample_text: str) -> float:
        time.sleep(0.3)
        return float(len(sample_text) % 2)


def test_a_batch_of_samples_is_scored_together_each_within_its_deadline() -> None:
    """score_samples starts every sample at once: four samples whose judge takes 0.3 s all meet a 0.5 s deadline
    (one after the other, the second would not), and each gets what score_sample gives it alone."""
    specs = [JudgeSpec(name="sleep", kind="sleep", timeout_s=0.5),
             JudgeSpec(name="fmt", kind="regex", params={"pattern": r"\w+", "mode": "fullmatch"}, timeout_s=5.0)]
    scorer = SampleScorer(specs, concurrency=4, extra_builders={"sleep": lambda spec, deps: _SleepJudge()})
    texts = ["ab", "abc", "a b", "abcd"]
    got = scorer.score_samples([(PROMPT, t) for t in texts])
    assert [[r.status for r in res] for res in got] == [["ok", "ok"]] * 4
    assert [[r.value for r in res] for res in got] == [[r.value for r in scorer.score_sample(PROMPT, t)]
                                                       for t in texts]
    assert [res[1].value for res in got] == [1.0, 1.0, 0.0, 1.0]  # fullmatch of \w+: "a b" fails
