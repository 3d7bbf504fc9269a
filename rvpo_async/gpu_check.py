"""`rvpo-async gpu-check`: a short end-to-end check on one machine with an NVIDIA GPU (under 8 minutes).

1. Builds a ~100M-parameter Qwen2 locally (random init, the tiny model's tokenizer; no download).
2. Bare vLLM (CUDA build) on that model: generated tokens/s, and its sampled tokens' log-probs against a
   transformers forward pass on the same GPU.
3. A few async RVPO steps of the real system with everything on GPU 0: the rollout engine, an LLM judge
   engine and the DeepSpeed learner share it by memory shares (rvpo_async.gpu_share), weights go to the
   engine over the collective transport, and the system's generated tokens/s is set against bare vLLM's.

Engines that share one GPU cannot join one NCCL group (NCCL refuses two ranks on the same device), so the
collective transport's side group runs over host memory here; the learner's own collectives use NCCL.
Without a GPU it says so and exits with status 2.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

NO_GPU_EXIT = 2
MAX_LOGPROB_DIFF = 5e-3  # fp32 on both sides; GPU kernels differ in summation order only

# GPU 0 shared by memory share: rollout engine 0.35, LLM judge engine 0.2, learner (fp32 Adam on ~100M) the rest
SHARED_GPU = ["rollout.num_gpus=0.4", "rollout.gpu_memory_utilization=0.35", "judges.engine.num_gpus=0.25",
              "judges.engine.gpu_memory_utilization=0.2", "learner.num_gpus=0.35", "learner.sync_transport=collective"]


def gpu_available() -> tuple[bool, str]:
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is a dependency
        return False, f"torch is not importable ({e})"
    if not torch.cuda.is_available():
        return False, f"torch {torch.__version__} sees no CUDA device"
    return True, torch.cuda.get_device_name(0)


def build_model(out: Path, seed: int = 0) -> tuple[Path, int]:
    """A Qwen2 of about 100M parameters (16 layers, hidden 768), saved with the tiny model's tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rvpo_async.tiny_model import build_tokenizer

    tok = build_tokenizer(seed)
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=768, intermediate_size=2048, num_hidden_layers=16,
                      num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=1024,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True, torch_dtype="float32",
                      eos_token_id=eos, pad_token_id=pad, bos_token_id=None, use_sliding_window=False)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id, model.generation_config.pad_token_id = eos, pad
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def bare_vllm(model_dir: Path, prompts: list[list[int]], n: int, max_tokens: int) -> dict[str, Any]:
    """Tokens/s of the bare engine, and the largest gap between its log-probs and transformers'."""
    import torch
    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from actors.vllm_engine import make_llm

    llm = make_llm(str(model_dir), max_model_len=512, gpu_memory_utilization=0.35,
                   logprobs_mode="processed_logprobs")
    sp = SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, logprobs=0, seed=0, ignore_eos=True)
    llm.generate([{"prompt_token_ids": p} for p in prompts[:2]], sp, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    wall = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    del llm
    gc.collect()
    torch.cuda.empty_cache()

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).cuda().eval()
    worst = 0.0
    with torch.no_grad():
        for p, o in zip(prompts[:4], outs[:4]):
            c = o.outputs[0]
            ids = torch.tensor([p + list(c.token_ids)], device="cuda")
            logp = torch.log_softmax(hf(ids).logits[0, len(p) - 1:-1].float(), -1)
            ref = logp.gather(-1, ids[0, len(p):, None])[:, 0].cpu()
            got = torch.tensor([next(iter(d.values())).logprob for d in c.logprobs])
            worst = max(worst, float((ref - got).abs().max()))
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return {"tokens": tokens, "seconds": wall, "tokens_per_s": tokens / wall, "max_logprob_diff": worst}


def system_run(model_dir: Path, run_dir: Path, steps: int) -> dict[str, Any]:
    from rvpo_async.config import load_config
    from rvpo_async.driver import train
    from rvpo_async.gpu_share import gpu_shares, memory_on_gpu, pack_gpus

    llm_judge = ("{name: on_topic, kind: llm, params: {rubric: 'Is the response one sentence about the topic?', "
                 "mode: yesno}}")
    overrides = SHARED_GPU + [
        f"model.path={model_dir}", "model.build_if_missing=false", "model.max_model_len=512",
        f"run.output_dir={run_dir}", f"run.steps={steps}", "run.overwrite=true", "run.progress=false",
        "rollout.group_size=8", "rollout.groups_per_step=16", "rollout.max_new_tokens=64",
        "metrics.enabled=false", "checkpoint.every=0", "learner.micro_batch_size=32", "learner.master_port=29650",
        "judges.specs=[{name: length, kind: length, params: {min_chars: 10, max_chars: 80, slack: 40}}, "
        "{name: keyword, kind: keywords, params: {words: [safe], mode: any}}, " + llm_judge + "]",
    ]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml", overrides)
    gpus = pack_gpus(gpu_shares(cfg), num_gpus=1)
    report = train(cfg)
    return {"report": report, "gpu_plan": [[(s.name, s.num_gpus, s.memory_share) for s in g] for g in gpus],
            "memory_share_on_gpu0": memory_on_gpu(gpus[0])}


def main(out: str = "runs/gpu-check", steps: int = 4) -> int:
    ok, what = gpu_available()
    if not ok:
        print(f"rvpo-async gpu-check: no NVIDIA GPU here ({what}). Run it on a machine with one, with the gpu "
              f"extra installed (pip install -e '.[gpu]').", file=sys.stderr)
        return NO_GPU_EXIT
    t_start = time.perf_counter()
    out_dir = Path(out)
    print(f"GPU: {what}")
    model_dir, n_params = build_model(out_dir / "model-100m")
    print(f"model: Qwen2, {n_params / 1e6:.1f}M parameters, built at {model_dir}")
    prompts = [[(7 * i + j) % 400 + 10 for j in range(24)] for i in range(64)]
    bare = bare_vllm(model_dir, prompts, n=8, max_tokens=64)
    print(f"bare vLLM: {bare['tokens']} tokens in {bare['seconds']:.2f} s = {bare['tokens_per_s']:.0f} tokens/s; "
          f"log-probs vs transformers: max |diff| {bare['max_logprob_diff']:.2e}")
    sysrun = system_run(model_dir, out_dir / "run", steps)
    rep = sysrun["report"]
    ratio = rep["generated_tokens_per_second"] / bare["tokens_per_s"]
    print(f"system: {rep['steps']} async steps, {rep['generated_tokens_per_second']:.0f} generated tokens/s "
          f"({ratio:.2f} x bare vLLM), staleness max {rep['staleness']['max']}; GPU plan {sysrun['gpu_plan']}")
    elapsed = time.perf_counter() - t_start
    result = {"gpu": what, "parameters": n_params, "bare_vllm": bare, "system_tokens_per_s":
              rep["generated_tokens_per_second"], "system_vs_bare": ratio, "steps": rep["steps"],
              "gpu_plan": sysrun["gpu_plan"], "elapsed_s": elapsed}
    (out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2) + "\n")
    failures = []
    if bare["max_logprob_diff"] > MAX_LOGPROB_DIFF:
        failures.append(f"vLLM log-probs differ from transformers by {bare['max_logprob_diff']:.2e} "
                        f"(> {MAX_LOGPROB_DIFF})")
    if rep["steps"] != steps:
        failures.append(f"ran {rep['steps']} of {steps} steps")
    print(f"gpu-check {'FAILED: ' + '; '.join(failures) if failures else 'passed'} in {elapsed:.0f} s; "
          f"details in {out_dir / 'gpu_check.json'}")
    return 1 if failures else 0
