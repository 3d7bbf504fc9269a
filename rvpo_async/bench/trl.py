"""`rvpo-async bench trl`: this project's async and sync modes against TRL's GRPOTrainer, side by side.

Every run is a fresh subprocess: TRL's GRPOTrainer (CPU, transformers `generate`, the config's rule judges
re-expressed as TRL reward functions) and `rvpo-async train` in sync and async mode, on the same model,
prompts, group size, batch shape, max new tokens and learning rate. The systems are interleaved over
`--repeats` (the order rotates each repeat), so drift in the machine's load hits all of them alike.
Each system's speed is the samples trained in a steady-state window of steps divided by the time between
the END of step `a` and the end of step `b` (`--window a:b`): start-up, compilation and the final
checkpoint fall outside it. Needs the `bench` extra (trl).

Model ladder (`--model`): `tiny` (the embedded default), `25m` (a random Qwen2 of about 25M parameters
built locally, rvpo_async.tiny_model.make_qwen2_25m), `smollm2-135m` (the real pretrained model of
`rvpo-async make-model`). Larger rungs run fewer steps by default.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

# a mode alone runs the config's engine core; MODE-CORE sets rollout.engine_core=CORE
SYSTEMS = ("trl", "async", "sync", "async-inproc", "async-process", "sync-inproc", "sync-process")


@dataclass(frozen=True)
class Rung:
    path: str
    steps: int
    window: tuple[int, int]
    overrides: tuple[str, ...] = ()


LADDER: dict[str, Rung] = {
    "tiny": Rung(".cache/tiny-qwen2", 30, (6, 30)),
    "25m": Rung(".cache/qwen2-25m", 14, (4, 14), ("model.build_if_missing=false",)),
    # 30 layers of 3 KV heads: 46 KB of KV cache per token, 384 MB holds a whole step's 64 sequences. A
    # pretrained model trains at configs/smollm2-cpu.yaml's lr (5e-4 collapses its responses within a few steps,
    # which shortens every system's steps); its learner is compute-bound and takes both threads
    "smollm2-135m": Rung(".cache/smollm2-135m", 5, (2, 5),
                         ("model.build_if_missing=false", "rollout.kv_cache_memory_bytes=402653184",
                          "learner.lr=0.00001", "learner.num_threads=2")),
}


def ensure_rung_model(name: str, rung: Rung) -> str:
    if name == "tiny":
        from rvpo_async.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(rung.path))
    if name == "25m":
        from rvpo_async.tiny_model import ensure_qwen2_25m

        return str(ensure_qwen2_25m(rung.path))
    from rvpo_async.make_model import ensure_model

    return str(ensure_model(name, rung.path))


def parse_window(text: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--window: expected FIRST:LAST step numbers like 6:30, got {text!r}") from None
    if not 0 <= a < b:
        raise argparse.ArgumentTypeError(f"--window: need 0 <= FIRST < LAST, got {text!r}")
    return a, b


def window_rate(end_times: Sequence[float], samples: Sequence[int], window: tuple[int, int]) -> float:
    """Samples/s over steps a+1..b, timed from the end of step a to the end of step b (steps count from 1;
    step 0's "end" is the first step's start, which a window starting at 0 uses)."""
    a, b = window
    if len(end_times) < b + 1:
        raise ValueError(f"window {a}:{b} needs {b} steps, the run logged {len(end_times) - 1}")
    return sum(samples[a + 1:b + 1]) / (end_times[b] - end_times[a])


# ---------------------------------------------------------------- TRL, in its own process
def trl_worker(spec: dict[str, Any]) -> None:
    """Train with TRL's GRPOTrainer and write one {"step", "time", "samples"} line per step to spec["out"]."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.judges.factory import build_judge
    from rvpo_async.config import load_config
    from rvpo_async.task import constraint_prompts, file_prompts
    from rvpo_async.types import Prompt

    cfg = load_config(spec["config"], spec["overrides"])
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    rows = (constraint_prompts(cfg.task.num_prompts, cfg.run.seed) if cfg.task.name == "constraints"
            else file_prompts(str(cfg.task.prompts_file)))
    by_id = {r["id"]: Prompt(prompt_id=r["id"], text=r["prompt"], token_ids=(), meta=r["meta"]) for r in rows}
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}], "prompt_id": r["id"]}
                              for r in rows])

    def reward_fn(judge: Any) -> Any:
        def fn(prompts: list[Any], completions: list[Any], prompt_id: list[str], **_: Any) -> list[float]:
            texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
            return [float(judge.score(by_id[i], t)) for i, t in zip(prompt_id, texts)]

        fn.__name__ = judge.name
        return fn

    judges = [build_judge(s) for s in cfg.judges.specs]
    n = cfg.rollout.group_size * cfg.rollout.groups_per_step
    args = GRPOConfig(
        output_dir=spec["workdir"], use_cpu=True, seed=cfg.run.seed, max_steps=cfg.run.steps,
        per_device_train_batch_size=n, num_generations=cfg.rollout.group_size, gradient_accumulation_steps=1,
        max_completion_length=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature, top_k=0, top_p=1.0,
        learning_rate=cfg.learner.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.learner.weight_decay, max_grad_norm=cfg.learner.grad_clip, beta=0.0,
        reward_weights=list(cfg.reward_weights), multi_objective_aggregation="normalize_then_sum",
        save_strategy="no", report_to=[], logging_steps=10**6, disable_tqdm=True, dataloader_num_workers=0,
        bf16=False, fp16=False,
        generation_kwargs={"min_new_tokens": cfg.rollout.min_new_tokens} if cfg.rollout.min_new_tokens else None)
    times: list[float] = []

    class StepTimes(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            times.append(time.time())

        def on_step_end(self, *a: Any, **k: Any) -> None:
            times.append(time.time())

    tok = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_path"], dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[reward_fn(j) for j in judges], args=args,
                          train_dataset=data, processing_class=tok, callbacks=[StepTimes()])
    trainer.train()
    with open(spec["out"], "w") as f:
        for i, t in enumerate(times):
            f.write(json.dumps({"step": i, "time": t, "samples": n if i else 0}) + "\n")


# ---------------------------------------------------------------- the benchmark
def _run(cmd: list[str], log: Path, env: dict[str, str]) -> None:
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env).returncode
    if rc != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... exited {rc}; last lines of {log}:\n" + "\n".join(tail))


def run_system(system: str, a: argparse.Namespace, overrides: list[str], work: Path, rep: int
               ) -> tuple[list[float], list[int]]:
    """Run one system once in a subprocess; returns step end times (index 0 = start) and samples per step."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                         os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    run_dir = work / f"{system}-{rep}"
    run_dir.mkdir(parents=True, exist_ok=True)
    if system == "trl":
        spec = {"config": a.config, "overrides": overrides, "model_path": a.model_path, "threads": a.trl_threads,
                "workdir": str(run_dir / "trl"), "out": str(run_dir / "steps.jsonl")}
        (run_dir / "spec.json").write_text(json.dumps(spec))
        _run([sys.executable, "-m", "rvpo_async.bench.trl", "--worker", str(run_dir / "spec.json")],
             run_dir / "log.txt", env)
        rows = [json.loads(x) for x in (run_dir / "steps.jsonl").read_text().splitlines()]
        return [r["time"] for r in rows], [r["samples"] for r in rows]
    mode, _, core = system.partition("-")
    t_start = time.time()
    _run([sys.executable, "-m", "rvpo_async.cli", "train", "--config", a.config, *overrides, f"run.mode={mode}",
          *([f"rollout.engine_core={core}"] if core else []),
          f"run.output_dir={run_dir}", "run.overwrite=true", "run.progress=false", "checkpoint.every=0",
          "metrics.enabled=false"], run_dir / "log.txt", env)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    totals = [0] + [int(r["trained_samples_total"]) for r in rows]
    return [t_start] + [float(r["time"]) for r in rows], [0] + [b - a for a, b in zip(totals, totals[1:])]


DIFFERENCES = """\
how the setups differ (where they cannot be identical):
  - generation: TRL calls transformers `generate` inside the training process (padded batch, no KV paging);
    rvpo-async generates with vLLM's CPU build in its own Ray actor (1 CPU) and syncs weights to it each step
  - aggregation/loss: TRL multi_objective_aggregation=normalize_then_sum (GDPO), loss_type=dapo, beta=0;
    rvpo-async algo.aggregator from the config (rvpo) with its decoupled PPO loss and behaviour weights
  - optimizer: TRL torch AdamW through accelerate; rvpo-async DeepSpeed (config's ZeRO stage), AdamW; same lr,
    weight decay, grad clip, constant schedule
  - threads: TRL one process with torch's threads ({trl_threads}); rvpo-async one thread per actor (engine,
    judge workers, buffer, driver) and {learner_threads} torch thread(s) per learner rank, under Ray
  - learner forward: TRL runs every row (prompt + completion) whole and its output layer at every completion
    position (padding included); rvpo-async with learner.shared_prefix ({shared_prefix}) runs each distinct
    prompt once and its G responses after its KV cache, in up to learner.length_buckets ({length_buckets})
    forwards by length, with the output layer at trained tokens only (the same log-probs and gradients:
    tests/unit/test_learner_logprobs.py)
  - data: async mode trains on samples up to staleness.max_staleness policy versions old; TRL and sync on-policy
  - prompt order: each system shuffles the same prompt set with its own sampler"""


def _fmt(values: Sequence[float]) -> str:
    return f"{statistics.median(values):8.2f}  [{min(values):.2f} .. {max(values):.2f}]"


def bench_trl(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rvpo-async bench trl", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/tiny-cpu.yaml")
    p.add_argument("--model", choices=list(LADDER), default="tiny")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="steps per run (default: the rung's)")
    p.add_argument("--window", type=parse_window, default=None, help="FIRST:LAST steps timed (default: the rung's)")
    p.add_argument("--systems", default="trl,async,sync",
                   help="comma-separated subset of " + ",".join(SYSTEMS) + " (MODE-CORE: rollout.engine_core=CORE)")
    p.add_argument("--trl-threads", type=int, default=None, help="torch threads of the TRL process (default: torch's)")
    p.add_argument("--port", type=int, default=21400, help="learner.master_port of the rvpo-async runs")
    p.add_argument("--out", default=None, help="run directories (default: a temp dir)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every system")
    a = p.parse_args(list(argv))
    rung = LADDER[a.model]
    steps = a.steps or rung.steps
    window = a.window or ((rung.window[0], steps) if a.steps else rung.window)
    if window[1] > steps:
        p.error(f"--window {window[0]}:{window[1]} ends after the last step ({steps})")
    systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    bad = [s for s in systems if s not in SYSTEMS]
    if bad:
        p.error(f"--systems: unknown {bad}; choose from {', '.join(SYSTEMS)}")
    if "trl" in systems:
        try:
            import trl  # noqa: F401
        except ImportError:
            p.error("TRL is not installed: pip install 'rvpo-async[bench]'")
    a.model_path = str(Path(ensure_rung_model(a.model, rung)).resolve())
    overrides = [*rung.overrides, f"model.path={a.model_path}", f"run.steps={steps}",
                 f"learner.master_port={a.port}", *a.overrides]
    work = Path(a.out or tempfile.mkdtemp(prefix="rvpo-bench-trl-"))
    rates: dict[str, list[float]] = {s: [] for s in systems}
    print(f"bench trl: model {a.model} ({a.model_path}), config {a.config} {' '.join([*rung.overrides, *a.overrides])}; "
          f"{steps} steps, "
          f"window {window[0]}:{window[1]}, {a.repeats} repeats; runs in {work}", flush=True)
    for rep in range(a.repeats):
        order = systems[rep % len(systems):] + systems[:rep % len(systems)]
        for s in order:
            t0 = time.perf_counter()
            ends, samples = run_system(s, a, overrides, work, rep)
            rates[s].append(window_rate(ends, samples, window))
            # the load average shows when other work on the machine distorted a run
            print(f"  repeat {rep + 1} {s:12s}: {rates[s][-1]:8.2f} samples/s  (run {time.perf_counter() - t0:.0f} s, "
                  f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)", flush=True)
    print(f"samples/s, steps {window[0] + 1}-{window[1]} (median [min .. max] over {a.repeats} repeats):")
    for s in systems:
        print(f"  {s:12s} {_fmt(rates[s])}")
    pairs = [(x, "trl") for x in systems if x != "trl"] + [
        ("async", "sync"), ("async-inproc", "sync-inproc"), ("async-process", "sync-process"),
        ("async-inproc", "async-process"), ("sync-inproc", "sync-process")]
    for num, den in pairs:
        if num in rates and den in rates:
            r = [x / y for x, y in zip(rates[num], rates[den])]
            print(f"  {num}/{den}: median of medians {statistics.median(rates[num]) / statistics.median(rates[den]):.2f}x"
                  f"  per repeat [{min(r):.2f} .. {max(r):.2f}]")
    if "trl" in systems:
        import torch

        from rvpo_async.config import load_config

        lcfg = load_config(a.config, overrides).learner
        print(DIFFERENCES.format(trl_threads=a.trl_threads or torch.get_num_threads(), learner_threads=lcfg.num_threads,
                                 shared_prefix=str(lcfg.shared_prefix).lower(), length_buckets=lcfg.length_buckets))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        trl_worker(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit(bench_trl(sys.argv[1:]))
