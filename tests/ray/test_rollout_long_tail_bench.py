"""`rvpo-async bench rollout --workload long_tail` on tiny settings: both engines' figures, per-prompt caps honoured."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_long_tail_bench_reports_both_engines_and_every_response_keeps_its_prompts_cap(tiny_model_dir, ray_local):
    from transformers import AutoTokenizer

    from rvpo_async.bench.rollout import FIGURES, run_long_tail
    from rvpo_async.config import load_config
    from rvpo_async.task import load_prompts

    prompts = load_prompts(load_config(None, ["task.num_prompts=16"]), AutoTokenizer.from_pretrained(tiny_model_dir))
    res = run_long_tail(tiny_model_dir, prompts, groups_per_step=4, group_size=4, max_new_tokens=32, groups=8,
                        repeats=1, seed=3, short_share=0.75, short_div=8)

    assert {x["engine"] for x in res["runs"]} == {"stream", "call"} and len(res["runs"]) == 2
    for kind in ("stream", "call", "ratio"):
        assert all(res["summary"][kind][f] > 0 for f in FIGURES), kind
    for run in res["runs"]:
        assert run["groups"] == 8 and run["responses"] == 8 * 4
        caps = [cap for cap, _ in run["lengths"]]
        assert sorted(set(caps))[0] == 4 and max(caps) >= 28  # short groups and long ones
        assert all(n <= cap for cap, lengths in run["lengths"] for n in lengths), run["engine"]
        # ignore_eos: every response runs to its own cap, so both engines generate the same tokens
        assert all(n == cap for cap, lengths in run["lengths"] for n in lengths), run["engine"]
        assert run["over_cap"] == 0 and run["at_cap"] == run["responses"]
    assert res["runs"][0]["lengths"] == res["runs"][1]["lengths"]
