"""`rvpo-async bench sync`: seconds per GB of weights, learner -> vLLM engine, for both transports.

The path is the real one end to end: a DeepSpeed learner rank exports a random Qwen2 model of a few
hundred MB (fp32) and a vLLM engine in its own Ray actor loads it in place. The baseline, measured in the
same run, is one plain memory copy of the same number of bytes (a torch tensor copy, one thread): the
ratio says how many memory copies' worth of time a sync costs. GB = 1e9 bytes.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

from rvpo_async.bench import best_of


def build_bench_model(out: Path, *, hidden: int, layers: int, vocab: int, seed: int = 0) -> int:
    """A random Qwen2 (the tiny model's tokenizer, a wider and deeper body); returns its fp32 bytes."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rvpo_async.tiny_model import build_tokenizer

    tok = build_tokenizer(seed)
    heads = hidden // 64
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=64,
                      max_position_embeddings=512, tie_word_embeddings=True, torch_dtype="float32",
                      eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                      pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), bos_token_id=None)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return sum(p.numel() * p.element_size() for p in model.parameters())


def memcpy_seconds(nbytes: int, repeat: int) -> float:
    """Best time of one torch tensor copy of `nbytes` (one thread, as the learner ranks run)."""
    import torch

    torch.set_num_threads(1)
    src = torch.ones(nbytes // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in before timing
    return best_of(lambda: dst.copy_(src), repeat)


def _time_reload(worker: Any, blob: Any, repeat: int) -> float:
    return best_of(lambda: worker.rvpo_load_blob(blob), repeat)


def _time_repack(worker: Any, repeat: int) -> tuple[float, int]:
    """Best time to build the oneDNN kernels of every linear layer from its plain weight (in_place mode has
    them), as vLLM's CPU build does after each reload; and the number of layers."""
    from vllm import _custom_ops as ops

    mods = [m for m in worker.model_runner.get_model().modules() if hasattr(m, "cpu_linear")]
    return best_of(lambda: [ops.create_onednn_mm(m.weight.t(), 32) for m in mods], repeat), len(mods)


def engine_breakdown(model_dir: Path, nbytes: int, repeat: int) -> None:
    """Engine-side cost of one load, in this process (no transport): vLLM's reload with repacking, the
    repacking alone, and the in-place copy, against a memory copy."""
    import os

    from actors.vllm_engine import make_llm
    from actors.rollout.weight_receiver import set_weight_load
    from rvpo_async.weight_format import safetensors_array

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from safetensors.torch import load_file

    blob = safetensors_array({k: v + 1e-3 for k, v in load_file(str(model_dir / "model.safetensors")).items()})
    copy_s, gb = memcpy_seconds(nbytes, 5), nbytes / 1e9
    llm = make_llm(str(model_dir), max_model_len=128, worker_extension_cls="actors.rollout.weight_receiver.WeightReceiverExtension")
    reload_s = llm.collective_rpc(_time_reload, args=(blob, repeat))[0]
    set_weight_load(llm, "in_place")
    repack_s, layers = llm.collective_rpc(_time_repack, args=(repeat,))[0]
    in_place_s = llm.collective_rpc(_time_reload, args=(blob, repeat))[0]
    print(f"engine-side load of {nbytes / 1e6:.0f} MB, in process, best of {repeat}:")
    for name, sec in (("memory copy (torch, 1 thread)", copy_s), ("reload_weights (weight_load=repack)", reload_s),
                      (f"  of which oneDNN repacking of {layers} linears", repack_s),
                      ("in-place load_weights (weight_load=in_place)", in_place_s)):
        print(f"  {name:46s} {sec:8.3f} s  {sec / gb:7.2f} s/GB  {sec / copy_s:5.1f}x memory copy")


def _object_store_parts(learner: Any, engine: Any, version: int, repeat: int, copy_s: float, gb: float) -> int:
    """The object-store sync in its two halves, each timed to its end (best of `repeat`): the learner's export
    (gathering the weights into one safetensors blob, which Ray copies into the object store) and the engine's
    call (reading the blob from the object store without a copy, loading it into the model)."""
    import ray

    export, load = [], []
    for _ in range(repeat):
        version += 1
        t0 = time.perf_counter()
        ref = learner.export_blob()
        ray.wait([ref], fetch_local=False)
        t1 = time.perf_counter()
        ray.get(engine.update_weights.remote(version, ref))
        export.append(t1 - t0)
        load.append(time.perf_counter() - t1)
    for part, times in (("export (blob, object store)", export), ("engine call and load", load)):
        sec = min(times)
        print(f"    {'of which ' + part:42s} {sec:8.3f} s  {sec / gb:7.2f} s/GB  {sec / copy_s:5.1f}x memory copy")
    return version


def bench_sync(argv: Sequence[str]) -> int:
    p = argparse.ArgumentParser(prog="rvpo-async bench sync", description=__doc__)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--repeat", type=int, default=3, help="timed syncs per transport, after one warm-up")
    p.add_argument("--weight-load", default="repack,in_place",
                   help="engine load modes to measure (rollout.weight_load), comma-separated")
    p.add_argument("--port", type=int, default=21230, help="learner rendezvous port; the weight group uses the next ones")
    p.add_argument("--breakdown", action="store_true",
                   help="only the engine-side load, in this process: reload vs repacking vs in-place copy")
    a = p.parse_args(list(argv))
    if a.breakdown:
        work = Path(tempfile.mkdtemp(prefix="rvpo-sync-bench-"))
        try:
            nbytes = build_bench_model(work / "model", hidden=a.hidden, layers=a.layers, vocab=a.vocab)
            engine_breakdown(work / "model", nbytes, max(a.repeat, 2))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return 0

    import ray

    from actors.rollout.call import RolloutActor
    from learner.actor import LearnerGroup
    from learner.weight_sync import CollectiveSync, ObjectStoreSync
    from rvpo_async.config import Config

    work = Path(tempfile.mkdtemp(prefix="rvpo-sync-bench-"))
    started_ray = False
    learner: Any = None
    engine: Any = None
    try:
        t0 = time.perf_counter()
        nbytes = build_bench_model(work / "model", hidden=a.hidden, layers=a.layers, vocab=a.vocab)
        gb = nbytes / 1e9
        if not ray.is_initialized():
            ray.init(num_cpus=4, include_dashboard=False, object_store_memory=max(1 << 30, 4 * nbytes),
                     log_to_driver=False,  # the engines' load logs would bury the figures
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}})
            started_ray = True
        cfg = Config().override("learner.num_ranks=1", "learner.zero_stage=0", f"learner.master_port={a.port}",
                                "learner.num_cpus=1")
        learner = LearnerGroup(cfg, str(work / "model"))
        modes = [m.strip() for m in a.weight_load.split(",") if m.strip()]
        print(f"weight sync, learner (DeepSpeed, 1 rank) -> 1 vLLM engine: {nbytes / 1e6:.0f} MB of fp32 weights "
              f"({a.layers} layers, hidden {a.hidden})", flush=True)
        copy_s = memcpy_seconds(nbytes, 5)
        print(f"  {'memory copy (torch, 1 thread)':44s} {copy_s:8.3f} s  {copy_s / gb:7.2f} s/GB   1.0x")
        version, builds = 0, 0
        for mode in modes:
            engine = RolloutActor.options(num_cpus=1).remote("bench", str(work / "model"), group_size=1,
                                                             max_new_tokens=1, max_model_len=128, weight_load=mode)
            ray.get(engine.ready.remote())
            transports = {"object store": ObjectStoreSync(),
                          "collective": CollectiveSync(port=a.port + 1 + 8 * builds, addr=learner.master_addr)}
            for name, sync in transports.items():
                version += 1
                sync.sync(learner, [engine], version)  # warm-up: first export, group set-up, first load
                times = []
                for _ in range(a.repeat):
                    version += 1
                    times.append(sync.sync(learner, [engine], version))
                best, med = min(times), statistics.median(times)
                label = f"{name}, weight_load={mode}"
                print(f"  {label:44s} {best:8.3f} s  {best / gb:7.2f} s/GB  {best / copy_s:5.1f}x memory copy "
                      f"(median {med / gb:.2f} s/GB over {a.repeat})", flush=True)
                if name == "object store":
                    version = _object_store_parts(learner, engine, version, a.repeat, copy_s, gb)
            builds += 1
            ray.kill(engine)
            engine = None
        print(f"  set-up and all syncs: {time.perf_counter() - t0:.0f} s")
        return 0
    finally:
        if learner is not None:
            learner.shutdown()
        if engine is not None:
            ray.kill(engine)
        if started_ray:
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
