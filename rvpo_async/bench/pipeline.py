"""`rvpo-async bench pipeline`: async against sync training on the same config, in one process.

Prints samples/s of each mode and their ratio, beside the ideal ratio computed from the sync run's own
measured per-step times: with generation + judging (g) overlapping training + weight sync (t), a step
costs max(g, t) instead of g + t, so the ideal speed-up is (g + t) / max(g, t). Each run also reports the
driver process's CPU seconds per trained sample.

`--weight-updates` adds async runs with rollout.weight_update = drain and = interrupt on a long-tailed
version of the config (task.short_max_new_tokens: most responses short, a share of prompts run to
rollout.max_new_tokens), alternated over `--repeats`, and prints their samples/s, staleness and the
samples the interrupt mode interrupted.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any, Sequence


def _run(config: str, overrides: list[str], out: Path) -> dict[str, Any]:
    from rvpo_async.config import load_config
    from rvpo_async.driver import train

    cfg = load_config(config, overrides + [f"run.output_dir={out}", "run.overwrite=true", "run.progress=false",
                                           "checkpoint.every=0", "metrics.enabled=false"])
    return train(cfg)


def _engine_sum(report: dict[str, Any], key: str) -> int:
    engines = report.get("engines")
    return sum(int(e.get(key, 0)) for e in engines) if isinstance(engines, list) else 0


def _line(name: str, r: dict[str, Any]) -> str:
    return (f"  {name:<10} {r['samples_per_second']:8.2f} samples/s  {r['generated_tokens_per_second']:8.0f} gen tok/s"
            f"  staleness mean {r['staleness']['mean']:.2f} max {r['staleness']['max']}"
            f"  driver CPU {1000 * r.get('driver_cpu_s_per_sample', float('nan')):.2f} ms/sample")


def bench_pipeline(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rvpo-async bench pipeline")
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--out", default=None, help="run directories (default: a temp dir)")
    p.add_argument("--weight-updates", action="store_true",
                   help="also compare rollout.weight_update drain and interrupt on a long-tailed workload")
    p.add_argument("--repeats", type=int, default=2, help="alternated repeats of the drain/interrupt pair")
    p.add_argument("--short-tokens", type=int, default=8, help="long tail: the cap of most responses")
    p.add_argument("--long-share", type=float, default=0.15, help="long tail: share of prompts left uncapped")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    a = p.parse_args(argv)

    out = Path(a.out or tempfile.mkdtemp(prefix="rvpo-bench-pipeline-"))
    base = list(a.overrides) + [f"run.steps={a.steps}"]
    reports = {mode: _run(a.config, base + [f"run.mode={mode}"], out / mode) for mode in ("sync", "async")}
    sync, asy = reports["sync"], reports["async"]
    t = sync["timing_mean_s"]
    g, tr = t["generate_s"] + t["judge_s"], t["train_and_sync_s"]
    ideal = (g + tr) / max(g, tr)
    ratio = asy["samples_per_second"] / sync["samples_per_second"]
    print(f"pipeline: {a.steps} steps, config {a.config} {' '.join(a.overrides)}")
    print(_line("sync", sync))
    print(_line("async", asy))
    print(f"  sync per step: generate {t['generate_s']:.3f} s + judge {t['judge_s']:.3f} s + "
          f"train+sync {tr:.3f} s")
    print(f"  async/sync samples/s: {ratio:.2f}x   ideal (g+t)/max(g,t): {ideal:.2f}x")
    if a.weight_updates:
        tail = base + ["run.mode=async", f"task.short_max_new_tokens={a.short_tokens}",
                       f"task.long_tail_share={a.long_share}"]
        runs: dict[str, list[dict[str, Any]]] = {"drain": [], "interrupt": []}
        for rep in range(a.repeats):
            order = ("drain", "interrupt") if rep % 2 == 0 else ("interrupt", "drain")
            for mode in order:
                runs[mode].append(_run(a.config, tail + [f"rollout.weight_update={mode}"], out / f"{mode}-{rep}"))
        print(f"weight updates on a long tail: responses capped at {a.short_tokens} tokens except "
              f"{a.long_share:.0%} of prompts; {a.repeats} alternated repeats (run.seed from the config)")
        med = {}
        for mode, rs in runs.items():
            for i, r in enumerate(rs):
                print(_line(f"{mode}#{i}", r) + f"  interrupted samples {_engine_sum(r, 'interrupted_samples')}"
                      f"  re-prefilled tokens {_engine_sum(r, 'reprefilled_tokens')}")
            med[mode] = statistics.median(r["samples_per_second"] for r in rs)
        print(f"  interrupt/drain samples/s (medians): {med['interrupt'] / med['drain']:.2f}x")
    return 0
