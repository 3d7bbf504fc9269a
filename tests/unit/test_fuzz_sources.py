"""Fuzzed prompt files and HTTP judge replies: whatever a prompts file holds, it loads or raises a
PromptFileError naming the file and line; whatever an OpenAI-compatible judge server answers (garbage, any
status, an echo of the key, silence past the deadline), the entry is masked with a reason that names the
judge and never holds the key."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actors.judges.factory import build_judge, run_judge
from ports import free_ports
from rvpo_async.config import JudgeSpec
from rvpo_async.task import PromptFileError, file_prompts
from rvpo_async.types import Prompt

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8)
ROW = st.one_of(JSON.map(json.dumps), st.fixed_dictionaries({"prompt": JSON}).map(json.dumps),
                st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=8), "rubric": JSON}).map(json.dumps))
LINE = st.one_of(ROW.map(str.encode), st.binary(max_size=24).filter(lambda b: b"\n" not in b))
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@SETTINGS
@given(lines=st.lists(LINE, max_size=5), need_rubric=st.booleans())
def test_any_prompts_file_loads_or_names_file_and_line(tmp_path_factory, lines: list[bytes], need_rubric: bool):
    f = tmp_path_factory.mktemp("fuzz") / "p.jsonl"
    f.write_bytes(b"\n".join(lines))
    try:
        rows = file_prompts(str(f), need_rubric=need_rubric, rubric_max_items=17)
    except PromptFileError as e:
        assert str(f) in str(e) or "p.jsonl" in str(e), str(e)
        return
    assert rows and all(isinstance(r["prompt"], (str, list)) for r in rows)


def test_a_10_mb_line_loads_whole(tmp_path: Path):
    f = tmp_path / "p.jsonl"
    big = "word " * (2 * 1024 * 1024)  # 10 MiB of text in one row
    f.write_text(json.dumps({"prompt": "short"}) + "\n" + json.dumps({"id": "big", "prompt": big}) + "\n")
    rows = file_prompts(str(f))
    assert [r["id"] for r in rows][1] == "big" and len(rows[1]["prompt"]) == len(big)


KEY = "sk-fuzz-0a1b2c3d4e5f"


class Reply(ThreadingHTTPServer):
    status: int = 200
    body: bytes = b""
    delay_s: float = 0.0


class Handler(BaseHTTPRequestHandler):
    server: Reply

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        time.sleep(self.server.delay_s)
        body = self.server.body.replace(b"$KEY", self.headers.get("Authorization", "").encode())
        self.send_response(self.server.status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[Reply]:
    s = Reply(("127.0.0.1", free_ports(range(22100, 22200))[0]), Handler)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    yield s
    s.shutdown()
    s.server_close()


def _judge(server: Reply, timeout_s: float = 5.0):
    spec = JudgeSpec(name="fuzzy", kind="http", timeout_s=timeout_s, params={
        "base_url": f"http://127.0.0.1:{server.server_address[1]}", "model": "m", "rubric": "Is it polite?",
        "api_key_env": "RVPO_FUZZ_JUDGE_KEY"})
    return build_judge(spec, default_timeout_s=timeout_s)


BODIES = st.one_of(st.binary(max_size=64), JSON.map(lambda v: json.dumps(v).encode()),
                   st.just(b'{"choices": [{"message": {"content": "$KEY"}}]}'),
                   st.just(b'{"error": {"message": "bad key $KEY"}}'),
                   st.text(max_size=12).map(lambda t: json.dumps({"choices": [{"message": {"content": t}}]}).encode()))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(status=st.sampled_from([200, 200, 200, 400, 401, 404, 429, 500, 502, 503]), body=BODIES)
def test_any_http_judge_reply_is_a_score_or_a_masked_entry_without_the_key(server: Reply, monkeypatch, status: int,
                                                                         body: bytes):
    monkeypatch.setenv("RVPO_FUZZ_JUDGE_KEY", KEY)
    server.status, server.body, server.delay_s = status, body, 0.0
    res = run_judge(_judge(server), Prompt("p0", "prompt", (1,), {}), "text", timeout_s=5.0)
    assert KEY not in repr(res)
    if res.status == "ok":
        assert status == 200 and 0.0 <= res.value <= 1.0
    else:
        assert res.status in ("error", "invalid") and "fuzzy" in res.reason, res


def test_a_judge_server_that_does_not_answer_in_time_masks_the_entry_as_timeout(server: Reply, monkeypatch):
    monkeypatch.setenv("RVPO_FUZZ_JUDGE_KEY", KEY)
    server.status, server.body, server.delay_s = 200, b'{"choices": [{"message": {"content": "yes"}}]}', 3.0
    res = run_judge(_judge(server, timeout_s=0.5), Prompt("p0", "prompt", (1,), {}), "text", timeout_s=0.5)
    assert res.status in ("timeout", "error") and "fuzzy" in res.reason and KEY not in repr(res), res
