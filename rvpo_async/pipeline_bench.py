"""`rvpo-async bench pipeline`: async against sync training on the same config, in one process.

Prints samples/s of each mode and their ratio, beside the ideal ratio computed from the sync run's own
measured per-step times: with generation + judging (g) overlapping training + weight sync (t), a step
costs max(g, t) instead of g + t, so the ideal speed-up is (g + t) / max(g, t).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Sequence


def bench_pipeline(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rvpo-async bench pipeline")
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=None, help="run directories (default: a temp dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)

    from rvpo_async.config import load_config
    from rvpo_async.driver import train

    out = Path(a.out or tempfile.mkdtemp(prefix="rvpo-bench-pipeline-"))
    reports: dict[str, dict[str, Any]] = {}
    for mode in ("sync", "async"):
        cfg = load_config(a.config, list(a.overrides) + [
            f"run.mode={mode}", f"run.steps={a.steps}", f"run.output_dir={out / mode}", "run.overwrite=true",
            "run.progress=false", "checkpoint.every=0", "metrics.enabled=false"])
        reports[mode] = train(cfg)
    sync, asy = reports["sync"], reports["async"]
    t = sync["timing_mean_s"]
    g, tr = t["generate_s"] + t["judge_s"], t["train_and_sync_s"]
    ideal = (g + tr) / max(g, tr)
    ratio = asy["samples_per_second"] / sync["samples_per_second"]
    print(f"pipeline: {a.steps} steps, config {a.config} {' '.join(a.overrides)}")
    print(f"  sync : {sync['samples_per_second']:8.2f} samples/s  {sync['generated_tokens_per_second']:8.0f} gen tok/s")
    print(f"  async: {asy['samples_per_second']:8.2f} samples/s  {asy['generated_tokens_per_second']:8.0f} gen tok/s"
          f"  (staleness mean {asy['staleness']['mean']:.2f}, max {asy['staleness']['max']})")
    print(f"  sync per step: generate {t['generate_s']:.3f} s + judge {t['judge_s']:.3f} s + "
          f"train+sync {tr:.3f} s")
    print(f"  async/sync samples/s: {ratio:.2f}x   ideal (g+t)/max(g,t): {ideal:.2f}x")
    return 0
