"""A real Prometheus server scrapes a short real training run; its HTTP API then shows the run's
throughput, inter-reward variance, staleness histogram and one reward-mean series per configured reward."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ports import free_ports
from prometheus_server import prometheus, query
from rvpo_async.config import load_config

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
PORTS = range(21500, 21520)


def test_prometheus_scrapes_a_real_run(tmp_path: Path, tiny_model_dir: str, ray_local: Any) -> None:
    from rvpo_async.driver import train

    metrics_port, prom_port = free_ports(PORTS, 2)
    run = tmp_path / "run"
    cfg = load_config(str(ROOT / "configs" / "tiny-cpu.yaml"), [
        f"run.output_dir={run}", f"model.path={tiny_model_dir}", "run.steps=400", "run.progress=false",
        "rollout.group_size=4", "rollout.groups_per_step=4", "rollout.max_new_tokens=12", "judges.num_workers=1",
        "checkpoint.every=0", f"metrics.port={metrics_port}", "metrics.host=127.0.0.1", "rollout.compile=false"])
    scraped_during_run: list[float] = []

    def stop_after_scrapes() -> None:
        # let the run go until Prometheus has scraped it for a while, then stop it like a user would
        import os
        import signal

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if query(prom_port, "rvpo_policy_version > 3", time.time()):
                    time.sleep(6)
                    scraped_during_run.append(time.time())
                    os.kill(os.getpid(), signal.SIGTERM)
                    return
            except OSError:
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=stop_after_scrapes, daemon=True)
    watcher.start()
    with prometheus(tmp_path, metrics_port, prom_port, rules=False):
        from rvpo_async.driver import Interrupted

        with pytest.raises(Interrupted):
            train(cfg)
        assert scraped_during_run, f"Prometheus never saw the run; log:\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}"
        at = scraped_during_run[0]
        rate = query(prom_port, "rate(rvpo_generated_tokens_total[10s])", at)
        assert rate and float(rate[0]["value"][1]) > 0
        inter = query(prom_port, "count_over_time(rvpo_reward_inter_variance[30s])", at)
        assert inter and float(inter[0]["value"][1]) > 0
        stal = query(prom_port, "sum(rvpo_staleness_count)", at)
        assert stal and float(stal[0]["value"][1]) > 0
        buckets = query(prom_port, "rvpo_staleness_bucket", at)
        assert len(buckets) > 1
        means = query(prom_port, "rvpo_reward_mean", at)
        assert sorted(r["metric"]["reward"] for r in means) == sorted(cfg.reward_names)
        worst = query(prom_port, "rvpo_reward_worst_mean", at)
        assert worst and 0.0 <= float(worst[0]["value"][1]) <= min(float(r["value"][1]) for r in means) + 1e-9
        # the learner's importance weights: the engines sample from (nearly) the learner's policy, so the
        # mean weight is near 1 and the largest is at least the mean
        w_mean = query(prom_port, "rvpo_importance_weight_mean", at)
        w_max = query(prom_port, "rvpo_importance_weight_max", at)
        assert w_mean and w_max
        assert 0.5 < float(w_mean[0]["value"][1]) < 2.0
        assert float(w_max[0]["value"][1]) >= float(w_mean[0]["value"][1]) * (1 - 1e-6)
