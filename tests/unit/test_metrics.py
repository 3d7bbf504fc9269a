"""rvpo_async.metrics: the declared metrics, their types and labels, bounded label values, the HTTP server."""

from __future__ import annotations

import math
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from rvpo_async.config import load_config
from ports import free_ports
from rvpo_async.metrics import METRICS, Metrics

REWARDS = ["length", "format", "required_word"]
PORT_RANGE = range(21100, 21110)  # this suite's ports; the Prometheus test uses 21110-21119

# name as exposed -> (type, label names)
REQUIRED = {
    "rvpo_generated_tokens_total": ("counter", set()),
    "rvpo_trained_tokens_total": ("counter", set()),
    "rvpo_samples_total": ("counter", {"stage"}),
    "rvpo_reward_mean": ("gauge", {"reward"}),
    "rvpo_reward_std": ("gauge", {"reward"}),
    "rvpo_reward_inter_variance": ("gauge", set()),
    "rvpo_reward_bottleneck_share": ("gauge", {"reward"}),
    "rvpo_reward_worst_mean": ("gauge", set()),
    "rvpo_policy_version": ("gauge", set()),
    "rvpo_staleness": ("histogram", set()),
    "rvpo_buffer_groups": ("gauge", {"state"}),
    "rvpo_judge_latency_seconds": ("histogram", {"judge"}),
    "rvpo_judge_failures_total": ("counter", {"judge", "reason"}),
    "rvpo_weight_sync_seconds": ("histogram", set()),
    "rvpo_importance_weight_truncated_ratio": ("gauge", set()),
    "rvpo_importance_weight_mean": ("gauge", set()),
    "rvpo_importance_weight_max": ("gauge", set()),
    "rvpo_learner_step_seconds": ("histogram", set()),
    "rvpo_judge_workers": ("gauge", set()),
    "rvpo_judge_queue_depth": ("gauge", set()),
    "rvpo_k_risk": ("gauge", set()),
    "rvpo_kl_ref": ("gauge", set()),
    "rvpo_rubric_met_ratio": ("gauge", set()),
    "rvpo_rubric_worst_mean": ("gauge", set()),
    "rvpo_rubric_pitfall_rate": ("gauge", set()),
    "rvpo_rubric_met_ratio_by_tag": ("gauge", {"tag"}),
    "rvpo_rubric_criteria": ("histogram", set()),
    "rvpo_eval_reward_mean": ("gauge", {"reward"}),
    "rvpo_eval_worst_reward_mean": ("gauge", set()),
    "rvpo_eval_all_met_share": ("gauge", set()),
}


def _record_everything(m: Metrics) -> None:
    m.record_generation(tokens=640, samples=20)
    m.record_scored(20)
    m.record_trained(tokens=320, samples=10, staleness=[0, 1, 1, 2, 2, 2, 0, 1, 2, 9], step_seconds=0.2,
                     is_truncated_ratio=0.05, is_weight_mean=1.02, is_weight_max=3.5)
    m.record_dropped(3)
    m.record_rewards(mean=[0.9, 0.5, 0.1], std=[0.1, 0.2, 0.3], inter_variance=0.4,
                     bottleneck_share=[0.0, 0.25, 0.75], worst_mean=0.05)
    m.set_policy_version(7)
    m.set_buffer(pending=4, ready=2)
    m.observe_judge("length", 0.002, "ok")
    m.observe_judge("format", 10.0, "timeout")
    m.observe_judge("required_word", 0.01, "invalid")
    m.set_judge_pool(workers=3, queue_depth=12)
    m.observe_weight_sync(1.5)
    m.record_objective(k_risk=1.25, kl_ref=0.003)
    m.record_eval({"length": 0.8, "format": 1.0, "required_word": None}, worst_mean=0.3, all_met_share=0.25)
    m.record_rubric(0.5, 0.0, 0.25, [3, 17], {"axis:format": 0.75, "axis:word": None})


def _families(m: Metrics) -> dict:
    return {f.name: f for f in text_string_to_metric_families(m.render().decode())}


def _samples(m: Metrics, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(m.render().decode()) for s in f.samples if s.name == name}


def _family_name(exposed: str, kind: str) -> str:
    return exposed[: -len("_total")] if kind == "counter" else exposed


def test_declared_metrics_are_exactly_the_required_ones() -> None:
    assert {s.name: (s.kind, set(s.labels)) for s in METRICS} == REQUIRED


def test_every_required_metric_is_rendered_with_its_type_and_labels() -> None:
    m = Metrics(REWARDS, REWARDS)
    _record_everything(m)
    fams = _families(m)
    for exposed, (kind, labels) in REQUIRED.items():
        fam = fams.get(_family_name(exposed, kind))
        assert fam is not None, f"{exposed} missing from render()"
        assert fam.type == kind, f"{exposed}: type {fam.type}, expected {kind}"
        main = [s for s in fam.samples if s.name in (exposed, exposed + "_bucket")]
        assert main, f"{exposed}: no samples"
        for s in main:
            assert set(s.labels) - {"le"} == labels, f"{exposed}: labels {set(s.labels)}"


def test_recorded_values_appear_in_render() -> None:
    m = Metrics(REWARDS, REWARDS)
    _record_everything(m)
    assert _samples(m, "rvpo_generated_tokens_total") == {(): 640}
    assert _samples(m, "rvpo_samples_total") == {(("stage", "generated"),): 20, (("stage", "scored"),): 20,
                                                  (("stage", "trained"),): 10, (("stage", "dropped"),): 3}
    assert _samples(m, "rvpo_reward_mean")[(("reward", "required_word"),)] == pytest.approx(0.1)
    assert _samples(m, "rvpo_reward_bottleneck_share")[(("reward", "format"),)] == pytest.approx(0.25)
    assert _samples(m, "rvpo_policy_version") == {(): 7}
    assert _samples(m, "rvpo_reward_worst_mean") == {(): pytest.approx(0.05)}
    assert _samples(m, "rvpo_importance_weight_truncated_ratio") == {(): pytest.approx(0.05)}
    assert _samples(m, "rvpo_importance_weight_mean") == {(): pytest.approx(1.02)}
    assert _samples(m, "rvpo_importance_weight_max") == {(): pytest.approx(3.5)}
    assert _samples(m, "rvpo_k_risk") == {(): pytest.approx(1.25)}
    assert _samples(m, "rvpo_kl_ref") == {(): pytest.approx(0.003)}
    assert _samples(m, "rvpo_buffer_groups") == {(("state", "pending"),): 4, (("state", "ready"),): 2}
    failures = _samples(m, "rvpo_judge_failures_total")
    assert failures[(("judge", "format"), ("reason", "timeout"))] == 1
    assert failures[(("judge", "required_word"), ("reason", "invalid"))] == 1
    assert sum(failures.values()) == 2  # the "ok" call is not a failure
    assert sum(_samples(m, "rvpo_judge_latency_seconds_count").values()) == 3  # every call is timed


def test_staleness_histogram_has_integer_buckets_0_to_8() -> None:
    m = Metrics(REWARDS, REWARDS)
    m.record_trained(tokens=1, samples=4, staleness=[0, 2, 8, 9], step_seconds=0.1, is_truncated_ratio=0.0,
                     is_weight_mean=1.0, is_weight_max=1.0)
    buckets = {dict(k)["le"]: v for k, v in _samples(m, "rvpo_staleness_bucket").items()}
    assert list(buckets) == [f"{float(i)}" for i in range(9)] + ["+Inf"]
    assert buckets["0.0"] == 1 and buckets["1.0"] == 1 and buckets["2.0"] == 2
    assert buckets["8.0"] == 3 and buckets["+Inf"] == 4


def test_labelled_series_exist_at_zero_before_any_event() -> None:
    m = Metrics(REWARDS, ["length"])
    assert set(_samples(m, "rvpo_samples_total").values()) == {0}
    assert len(_samples(m, "rvpo_samples_total")) == 4
    assert len(_samples(m, "rvpo_judge_failures_total")) == 3  # one judge x timeout|error|invalid
    assert all(math.isnan(v) for v in _samples(m, "rvpo_reward_mean").values())


def test_kl_ref_stays_nan_while_the_kl_anchor_is_off() -> None:
    m = Metrics(REWARDS, REWARDS)
    m.record_objective(k_risk=0.5)
    assert _samples(m, "rvpo_k_risk") == {(): pytest.approx(0.5)}
    assert all(math.isnan(v) for v in _samples(m, "rvpo_kl_ref").values())


def test_unknown_reward_name_raises() -> None:
    m = Metrics(REWARDS, REWARDS)
    with pytest.raises(ValueError, match="unknown reward name 'helpfulness'.*configured reward names"):
        m.record_rewards(mean={"helpfulness": 1.0}, std={}, inter_variance=0.0, bottleneck_share={},
                         worst_mean=0.0)
    assert (("reward", "helpfulness"),) not in _samples(m, "rvpo_reward_mean")


def test_reward_lists_must_have_one_value_per_configured_reward() -> None:
    m = Metrics(REWARDS, REWARDS)
    with pytest.raises(ValueError, match="one value per reward"):
        m.record_rewards(mean=[1.0, 2.0], std=[0.0, 0.0, 0.0], inter_variance=0.0, bottleneck_share=[0, 0, 1],
                         worst_mean=0.0)


def test_unknown_judge_name_raises() -> None:
    m = Metrics(REWARDS, REWARDS)
    with pytest.raises(ValueError, match="unknown judge name 'gpt-judge'"):
        m.observe_judge("gpt-judge", 0.1, "ok")
    assert not any(dict(k).get("judge") == "gpt-judge" for k in _samples(m, "rvpo_judge_latency_seconds_count"))


def test_unknown_judge_status_raises() -> None:
    m = Metrics(REWARDS, REWARDS)
    with pytest.raises(ValueError, match="judge status must be one of ok, timeout, error, invalid"):
        m.observe_judge("length", 0.1, "crashed")  # type: ignore[arg-type]


def test_negative_or_non_integer_counts_raise() -> None:
    m = Metrics(REWARDS, REWARDS)
    with pytest.raises(ValueError, match="tokens must be a non-negative integer"):
        m.record_generation(tokens=-1, samples=1)
    with pytest.raises(ValueError, match="staleness must be a non-negative integer"):
        m.record_trained(tokens=1, samples=1, staleness=[1.5], step_seconds=0.1,  # type: ignore[list-item]
                         is_truncated_ratio=0.0, is_weight_mean=1.0, is_weight_max=1.0)
    with pytest.raises(ValueError, match=r"is_truncated_ratio must be in \[0, 1\]"):
        m.record_trained(tokens=1, samples=1, staleness=[0], step_seconds=0.1, is_truncated_ratio=1.5,
                         is_weight_mean=1.0, is_weight_max=1.0)
    with pytest.raises(ValueError, match="is_weight_max must be a finite number >= 0"):
        m.record_trained(tokens=1, samples=1, staleness=[0], step_seconds=0.1, is_truncated_ratio=0.0,
                         is_weight_mean=1.0, is_weight_max=float("nan"))


def test_an_overflowed_importance_weight_is_shown_as_inf_not_an_error() -> None:
    m = Metrics(REWARDS, REWARDS)
    m.record_trained(tokens=1, samples=1, staleness=[0], step_seconds=0.1, is_truncated_ratio=0.0,
                     is_weight_mean=float("inf"), is_weight_max=float("inf"))
    assert _samples(m, "rvpo_importance_weight_max") == {(): math.inf}


def test_repeated_names_raise() -> None:
    with pytest.raises(ValueError, match="reward names must be unique"):
        Metrics(["a", "a"], ["a"])


def test_two_instances_keep_separate_registries() -> None:
    a, b = Metrics(REWARDS, REWARDS), Metrics(["other"], ["other"])
    a.set_policy_version(3)
    assert _samples(b, "rvpo_policy_version") == {(): 0}
    assert (("reward", "other"),) in _samples(b, "rvpo_reward_mean")
    assert (("reward", "other"),) not in _samples(a, "rvpo_reward_mean")


def test_from_config_labels_rewards_and_judges_by_spec_name(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("judges:\n  specs:\n    - {name: short, kind: length}\n    - {name: polite, kind: keywords}\n")
    m = Metrics.from_config(load_config(p))
    assert m.reward_names == ("short", "polite") and m.judge_names == ("short", "polite")


def test_http_server_binds_to_127_0_0_1_and_serves_metrics() -> None:
    m = Metrics(REWARDS, REWARDS)
    m.set_policy_version(5)
    port = free_ports(PORT_RANGE)[0]
    server = m.start_http_server("127.0.0.1", port)
    try:
        assert server.server_address[:2] == ("127.0.0.1", port)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            body = r.read().decode()
        assert r.status == 200
        assert "rvpo_policy_version 5.0" in body
        assert 'rvpo_samples_total{stage="trained"} 0.0' in body
    finally:
        server.shutdown()
        server.server_close()
