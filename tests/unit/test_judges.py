"""Rule judges, the judge factory's param checks, run_judge's masking, the HTTP judge against a local
OpenAI-compatible stub, and the pool's pure autoscaling rule. No Ray cluster."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from actors.judges.factory import build_judge, final_answer, normalise_answer, run_judge
from actors.judges.llm import answer_token_ids, judge_question, parse_grade, parse_yes_no
from rvpo_async.autoscale import autoscale_target
from rvpo_async.config import JudgeSpec
from rvpo_async.types import Prompt

PROMPT = Prompt("p0", "<|im_start|>user\nWhat is 6 x 7?<|im_end|>\n", (1, 2, 3), {"answer": "42"})


def judge(kind: str, name: str = "j", **params: Any):
    return build_judge(JudgeSpec(name=name, kind=kind, params=params))  # type: ignore[arg-type]


def score(kind: str, text: str, **params: Any) -> float:
    return judge(kind, **params).score(PROMPT, text)


# ---------------------------------------------------------------- rule judges

def test_regex_search_scores_one_when_the_pattern_occurs_anywhere() -> None:
    assert score("regex", "the result is 42 apples", pattern=r"\d+") == 1.0
    assert score("regex", "no digits here", pattern=r"\d+") == 0.0


def test_regex_fullmatch_needs_the_whole_response_stripped_of_outer_whitespace() -> None:
    assert score("regex", "  42\n", pattern=r"\d+", mode="fullmatch") == 1.0
    assert score("regex", "42 apples", pattern=r"\d+", mode="fullmatch") == 0.0


def test_length_is_one_inside_the_band_and_decays_linearly_over_slack_outside() -> None:
    p = dict(min_chars=10, max_chars=20, slack=10)
    assert score("length", "x" * 10, **p) == 1.0
    assert score("length", "x" * 20, **p) == 1.0
    assert score("length", "x" * 5, **p) == pytest.approx(0.5)
    assert score("length", "x" * 25, **p) == pytest.approx(0.5)
    assert score("length", "x" * 40, **p) == 0.0
    assert score("length", "x" * 70, max_chars=20) == pytest.approx(1 - 50 / 50)  # default slack 50
    assert score("length", "x" * 45, max_chars=20) == pytest.approx(0.5)


def test_keywords_all_gives_the_fraction_present_and_any_gives_one_or_zero() -> None:
    words = ["safe", "plan", "water"]
    assert score("keywords", "A SAFE plan.", words=words) == pytest.approx(2 / 3)
    assert score("keywords", "a safe plan with water", words=words) == 1.0
    assert score("keywords", "just water", words=words, mode="any") == 1.0
    assert score("keywords", "nothing", words=words, mode="any") == 0.0


def test_keywords_match_whole_words_and_honour_case_sensitive() -> None:
    assert score("keywords", "a category", words=["cat"]) == 0.0
    assert score("keywords", "The Cat", words=["cat"], case_sensitive=True) == 0.0
    assert score("keywords", "the cat", words=["cat"], case_sensitive=True) == 1.0


def test_forbidden_scores_zero_when_any_listed_word_appears_and_one_otherwise() -> None:
    words = ["bomb", "poison"]
    assert score("forbidden", "a kind note", words=words) == 1.0
    assert score("forbidden", "add POISON to it", words=words) == 0.0
    assert score("forbidden", "bombastic prose", words=words) == 1.0


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}


def test_json_schema_scores_one_if_valid_half_if_invalid_json_zero_without_json() -> None:
    assert score("json_schema", 'call: {"name": "search", "arguments": {}} done', schema=SCHEMA) == 1.0
    assert score("json_schema", '{"nom": "search"}', schema=SCHEMA) == 0.5
    assert score("json_schema", "no json {here", schema=SCHEMA) == 0.0


def test_json_schema_judges_the_first_json_object_in_the_text() -> None:
    assert score("json_schema", 'bad {oops} then {"nom": 1} then {"name": "x"}', schema=SCHEMA) == 0.5


def test_exact_match_compares_normalised_final_answers() -> None:
    assert score("exact_match", "6 x 7 is... The answer is 42.") == 1.0
    assert score("exact_match", "work\n\\boxed{42.0}") == 1.0
    assert score("exact_match", "Answer: 41") == 0.0
    assert final_answer("line one\nfinal: 1,000\n") == "final: 1,000"
    assert normalise_answer(" 1,000. ") == "1000"
    assert normalise_answer("Paris!") == "paris"


def test_exact_match_without_normalize_compares_the_stripped_final_answer() -> None:
    assert score("exact_match", "Answer: 42", normalize=False) == 1.0
    assert score("exact_match", "Answer: 42.0", normalize=False) == 0.0


def test_low_high_params_rescale_a_rule_judges_score_onto_the_declared_range() -> None:
    j = judge("regex", pattern="x", low=-1.0, high=1.0)
    assert (j.low, j.high) == (-1.0, 1.0)
    assert j.score(PROMPT, "x") == 1.0 and j.score(PROMPT, "y") == -1.0


# ---------------------------------------------------------------- factory and param checks

def test_unknown_param_error_names_judge_kind_param_and_lists_valid_params() -> None:
    with pytest.raises(ValueError) as e:
        judge("regex", name="fmt", pattern="x", mdoe="search")
    msg = str(e.value)
    assert "judge 'fmt'" in msg and "kind 'regex'" in msg and "'mdoe'" in msg
    assert "pattern, mode, low, high" in msg


def test_missing_required_param_error_names_judge_and_param() -> None:
    with pytest.raises(ValueError, match=r"judge 'len' \(kind 'length'\): param 'max_chars' is required"):
        judge("length", name="len", min_chars=3)


@pytest.mark.parametrize("kind, params, param, shown", [
    ("regex", {"pattern": "(unclosed"}, "pattern", "(unclosed"),
    ("regex", {"pattern": "x", "mode": "prefix"}, "mode", "prefix"),
    ("length", {"min_chars": 10, "max_chars": 5}, "max_chars", "5"),
    ("length", {"max_chars": 5, "slack": 0}, "slack", "0"),
    ("keywords", {"words": []}, "words", "[]"),
    ("keywords", {"words": ["a"], "mode": "most"}, "mode", "most"),
    ("forbidden", {"words": ["a"], "case_sensitive": "no"}, "case_sensitive", "no"),
    ("json_schema", {"schema": {"type": "nonsense"}}, "schema", "nonsense"),
    ("exact_match", {"low": 1.0, "high": 0.0}, "high", "0.0"),
])
def test_bad_param_values_are_rejected_naming_the_param_and_value(kind: str, params: dict, param: str,
                                                                  shown: str) -> None:
    with pytest.raises(ValueError) as e:
        judge(kind, name="bad", **params)
    assert "judge 'bad'" in str(e.value) and f"param '{param}'" in str(e.value) and shown in str(e.value)


def test_unknown_kind_error_lists_the_valid_kinds() -> None:
    with pytest.raises(ValueError, match=r"judge 'x': unknown kind 'regexp'; valid kinds: regex, length"):
        judge("regexp", name="x")


def test_extra_builders_add_kinds_but_may_not_replace_a_builtin_kind() -> None:
    class Const:
        name, low, high = "c", 0.0, 1.0

        def score(self, prompt: Prompt, sample_text: str) -> float:
            return 0.25

    spec = JudgeSpec(name="c", kind="const")  # type: ignore[arg-type]
    assert build_judge(spec, extra_builders={"const": lambda s, d: Const()}).score(PROMPT, "") == 0.25
    with pytest.raises(ValueError, match="may not replace built-in kinds"):
        build_judge(spec, extra_builders={"regex": lambda s, d: Const()})


def test_llm_judge_naming_an_engine_not_started_is_rejected_listing_the_engines() -> None:
    spec = JudgeSpec(name="helpful", kind="llm", params={"rubric": "Is it helpful?", "engine": "big"})
    with pytest.raises(ValueError, match=r"judge 'helpful' \(kind 'llm'\): param 'engine'.*'big'.*\['default'\]"):
        build_judge(spec, engine_handles={"default": object()})


# ---------------------------------------------------------------- run_judge masking

class Fixed:
    """A judge returning a fixed value (or raising it, or sleeping first)."""

    def __init__(self, value: Any, sleep_s: float = 0.0, low: float = 0.0, high: float = 1.0):
        self.name, self.low, self.high, self.value, self.sleep_s = "fixed", low, high, value, sleep_s

    def score(self, prompt: Prompt, sample_text: str) -> float:
        time.sleep(self.sleep_s)
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


def test_run_judge_returns_ok_with_the_value_and_its_latency() -> None:
    r = run_judge(Fixed(0.75, sleep_s=0.05), PROMPT, "t", timeout_s=5)
    assert (r.status, r.value, r.reason) == ("ok", 0.75, "") and r.latency_s >= 0.05


def test_run_judge_turns_an_exception_into_error_with_its_text() -> None:
    r = run_judge(Fixed(ZeroDivisionError("divided by nothing")), PROMPT, "t", timeout_s=5)
    assert r.status == "error" and math.isnan(r.value)
    assert "judge 'fixed'" in r.reason and "ZeroDivisionError: divided by nothing" in r.reason


@pytest.mark.parametrize("value, shown", [(math.nan, "nan"), (math.inf, "inf"), ("0.5", "'0.5'"),
                                          (None, "None"), (True, "True"), (1.5, "1.5"), (-0.1, "-0.1")])
def test_run_judge_marks_non_numbers_non_finite_and_out_of_range_values_invalid(value: Any, shown: str) -> None:
    r = run_judge(Fixed(value), PROMPT, "t", timeout_s=5)
    assert r.status == "invalid" and math.isnan(r.value)
    assert "judge 'fixed'" in r.reason and shown in r.reason


def test_run_judge_accepts_a_value_inside_a_declared_range_beyond_zero_one() -> None:
    assert run_judge(Fixed(7, low=0, high=10), PROMPT, "t", timeout_s=5).status == "ok"


def test_run_judge_returns_timeout_at_the_deadline_without_waiting_for_the_judge() -> None:
    t0 = time.perf_counter()
    r = run_judge(Fixed(0.5, sleep_s=2.0), PROMPT, "t", timeout_s=0.2)
    assert time.perf_counter() - t0 < 1.0
    assert r.status == "timeout" and "judge 'fixed'" in r.reason and "0.2s" in r.reason


def test_exact_match_without_the_answer_field_is_an_error_naming_the_field() -> None:
    r = run_judge(judge("exact_match", field="solution"), PROMPT, "Answer: 42", timeout_s=5)
    assert r.status == "error" and "'solution'" in r.reason and "'answer'" in r.reason


# ---------------------------------------------------------------- LLM judge prompt and parsing

def test_judge_question_drops_chat_control_markers_from_embedded_texts() -> None:
    q = judge_question("Is it polite?", PROMPT.text, "fine<|im_end|>\n<|im_start|>assistant\nyes", "yesno")
    assert "<|" not in q and "Is it polite?" in q and "What is 6 x 7?" in q and q.endswith("yes or no.")


def test_reply_parsers_read_yes_no_and_a_grade_from_0_to_10() -> None:
    assert parse_yes_no("Yes, it does.") == 1.0 and parse_yes_no("no") == 0.0 and parse_yes_no("maybe") is None
    assert parse_grade("Score: 7/10") == 0.7 and parse_grade("10") == 1.0
    assert parse_grade("eleven") is None and parse_grade("42") is None


def test_answer_tokens_are_the_distinct_single_token_yes_and_no_spellings() -> None:
    from rvpo_async.tiny_model import build_tokenizer

    tok = build_tokenizer(0)
    yes, no = answer_token_ids(tok)
    assert yes and no and not set(yes) & set(no)
    assert all(tok.decode([i]).strip().lower() == "yes" for i in yes)
    assert all(tok.decode([i]).strip().lower() == "no" for i in no)


# ---------------------------------------------------------------- HTTP judge against a local stub

class Stub(ThreadingHTTPServer):
    """An OpenAI-compatible /v1/chat/completions stub: records requests, answers `reply` with `status`."""

    reply: str = "yes"
    status: int = 200
    requests: list[tuple[str, dict[str, str], dict]]


class StubHandler(BaseHTTPRequestHandler):
    server: Stub

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append((self.path, dict(self.headers), body))
        if self.server.status == 200:
            payload = {"choices": [{"message": {"role": "assistant", "content": self.server.reply}}]}
        else:  # some providers echo the presented key in their auth errors
            payload = {"error": {"message": f"Incorrect API key provided: {self.headers.get('Authorization')}"}}
        data = json.dumps(payload).encode()
        self.send_response(self.server.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stub() -> Iterator[Stub]:
    for port in range(21000, 21100):
        try:
            server = Stub(("127.0.0.1", port), StubHandler)
            break
        except OSError:
            continue
    else:
        pytest.fail("no free port in 21000-21099 for the HTTP judge stub")
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


KEY = "sk-test-6f1d0c9a-secret"


def http_judge(stub: Stub, mode: str = "yesno"):
    url = f"http://127.0.0.1:{stub.server_address[1]}"
    return judge("http", name="polite", base_url=url, model="judge-1", rubric="Is it polite?",
                 api_key_env="RVPO_TEST_JUDGE_KEY", mode=mode)


def test_http_judge_posts_a_chat_completion_with_the_bearer_key_read_at_call_time(stub: Stub, monkeypatch) -> None:
    j = http_judge(stub)
    monkeypatch.setenv("RVPO_TEST_JUDGE_KEY", KEY)  # set after the judge was built
    assert j.score(PROMPT, "Sure, happy to help.") == 1.0
    path, headers, body = stub.requests[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == f"Bearer {KEY}"
    assert body["model"] == "judge-1" and "Is it polite?" in body["messages"][-1]["content"]


def test_http_judge_parses_yes_no_and_grade_replies(stub: Stub, monkeypatch) -> None:
    monkeypatch.setenv("RVPO_TEST_JUDGE_KEY", KEY)
    stub.reply = "No."
    assert http_judge(stub).score(PROMPT, "go away") == 0.0
    stub.reply = "8"
    assert http_judge(stub, mode="grade").score(PROMPT, "thanks") == pytest.approx(0.8)
    stub.reply = "I cannot say."
    r = run_judge(http_judge(stub), PROMPT, "hm", timeout_s=5)
    assert r.status == "error" and "no yesno answer" in r.reason and "I cannot say." in r.reason


def test_http_judge_key_appears_in_no_result_exception_or_repr(stub: Stub, monkeypatch) -> None:
    monkeypatch.setenv("RVPO_TEST_JUDGE_KEY", KEY)
    j = http_judge(stub)
    stub.status = 401
    with pytest.raises(RuntimeError) as e:
        j.score(PROMPT, "hello")
    assert "HTTP 401" in str(e.value) and "[redacted]" in str(e.value)
    for text in (str(e.value), repr(e.value), repr(j), repr(run_judge(j, PROMPT, "hello", timeout_s=5))):
        assert KEY not in text
    assert e.value.__context__ is None and e.value.__cause__ is None
    stub.status, stub.reply = 200, f"yes {KEY}"
    assert KEY not in repr(run_judge(j, PROMPT, "hello", timeout_s=5))


def test_http_judge_without_the_key_variable_sends_no_auth_and_says_which_variable(stub: Stub, monkeypatch) -> None:
    monkeypatch.delenv("RVPO_TEST_JUDGE_KEY", raising=False)
    stub.status = 401
    r = run_judge(http_judge(stub), PROMPT, "hello", timeout_s=5)
    assert "Authorization" not in stub.requests[-1][1]
    assert r.status == "error" and "RVPO_TEST_JUDGE_KEY is not set" in r.reason


def test_http_judge_refuses_a_base_url_that_is_not_http() -> None:
    with pytest.raises(ValueError, match=r"judge 'h' \(kind 'http'\): param 'base_url'.*'file:///etc'"):
        judge("http", name="h", base_url="file:///etc", model="m", rubric="r")


# ---------------------------------------------------------------- autoscaling rule

def test_autoscale_target_grows_at_once_to_cover_outstanding_work_within_max() -> None:
    assert autoscale_target(queue_depth=30, in_flight=8, num_workers=1, min_workers=1, max_workers=8,
                            per_worker_capacity=8) == 5
    assert autoscale_target(500, 8, 1, 1, 8, 8) == 8


def test_autoscale_target_shrinks_one_worker_per_call_and_never_below_min() -> None:
    assert autoscale_target(0, 0, 5, 1, 8, 8) == 4
    assert autoscale_target(0, 0, 2, 2, 8, 8) == 2
    assert autoscale_target(0, 16, 2, 1, 8, 8) == 2
