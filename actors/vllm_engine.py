"""One place that builds a vLLM engine, with the settings the CPU build needs (see README, Limits).

Used by the rollout actors and by the vLLM-served LLM judge. The same code path runs the CUDA build on
GPUs: only the platform-specific defaults differ.
"""

from __future__ import annotations

import operator
import os
from typing import Any, Sequence

# Process-level vLLM settings, applied before vllm is imported in an actor process.
VLLM_ENV: dict[str, str] = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engine: starts in seconds on CPU
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # the default pins every engine to core 0
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # every weight update logs INFO lines and a harmless "failed to load weights" warning for the rotary
    # embedding and tied lm_head; set VLLM_LOGGING_LEVEL in the environment to see them
    "VLLM_LOGGING_LEVEL": "ERROR",
}


MAX_NEW_TOKENS_META = "max_new_tokens"  # Prompt.meta key: a response budget of the prompt's own


def response_budget(prompt: Any, max_new_tokens: int) -> int:
    """The most new tokens a response to `prompt` may have: its meta["max_new_tokens"] when it carries one
    (an int in 1..max_new_tokens, the engine's cap), else the engine's cap."""
    cap = prompt.meta.get(MAX_NEW_TOKENS_META) if prompt.meta else None
    if cap is None:
        return int(max_new_tokens)
    try:
        n = None if isinstance(cap, bool) else operator.index(cap)  # ints, numpy ints; not floats or bools
    except TypeError:
        n = None
    if n is None or not 1 <= n <= max_new_tokens:
        raise ValueError(f"prompt {prompt.prompt_id!r}: meta[{MAX_NEW_TOKENS_META!r}] must be an int in "
                         f"1..{max_new_tokens} (the engine's max_new_tokens), got {cap!r}")
    return int(n)


def check_request(prompts: Sequence[Any], group_ids: Sequence[int], seeds: Sequence[int] | None,
                  max_new_tokens: int) -> tuple[list[int | None], list[int]]:
    """A rollout request's seeds (None each when not given) and response budgets, one per prompt; ValueError,
    naming the prompt, when a prompt's budget is out of range, before anything is generated."""
    if len(prompts) != len(group_ids):
        raise ValueError(f"{len(prompts)} prompts but {len(group_ids)} group ids")
    if seeds is not None and len(seeds) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    budgets = [response_budget(p, max_new_tokens) for p in prompts]
    return (list(seeds) if seeds is not None else [None] * len(prompts)), budgets


def apply_vllm_env() -> None:
    for k, v in VLLM_ENV.items():
        os.environ.setdefault(k, v)


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def engine_kwargs(model_path: str, *, seed: int, max_model_len: int, kv_cache_memory_bytes: int, dtype: str,
                  worker_extension_cls: str | None, gpu_memory_utilization: float,
                  gpu_kv_cache_memory_bytes: int | None, **extra: Any) -> dict[str, Any]:
    """The engine arguments `make_llm` and `make_async_llm` share (platform defaults, see make_llm)."""
    # disable_log_stats: vLLM's own per-request statistics (Prometheus histograms updated for every token)
    # cost a sixth of an engine step on the tiny model (BENCHMARKS.md); the run's metrics come from the actors.
    # vllm.LLM sets it already; AsyncLLM and the in-process engine take EngineArgs' default (on)
    kwargs: dict[str, Any] = dict(model=model_path, seed=seed, max_model_len=max_model_len, dtype=dtype,
                                  enforce_eager=True, trust_remote_code=False, disable_log_stats=True)
    if on_cpu():
        kwargs.update(distributed_executor_backend="uni", kv_cache_memory_bytes=kv_cache_memory_bytes)
        # The CPU sampler cannot rewind a seeded torch.Generator (set_offset) when a chunked prefill
        # discards a sampled token, which crashes seeded sampling. A per-step token budget that holds
        # every sequence's whole prompt means no prompt is ever chunked.
        kwargs.setdefault("max_num_seqs", 256)
        kwargs.setdefault("max_num_batched_tokens", kwargs["max_num_seqs"] * max_model_len)
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        if gpu_kv_cache_memory_bytes is not None:
            kwargs["kv_cache_memory_bytes"] = gpu_kv_cache_memory_bytes
    if worker_extension_cls:
        kwargs["worker_extension_cls"] = worker_extension_cls
    kwargs.update(extra)
    return kwargs


def make_llm(model_path: str, *, seed: int = 0, max_model_len: int = 256,
             kv_cache_memory_bytes: int = 64 * 1024 * 1024, dtype: str = "float32",
             worker_extension_cls: str | None = None, gpu_memory_utilization: float = 0.9,
             gpu_kv_cache_memory_bytes: int | None = None, **extra: Any):
    """Build a vllm.LLM for `model_path`. On CPU: eager mode, one in-process worker, a fixed KV cache
    (left unset, each engine would claim ~11 GiB). On CUDA: the engine's share of its GPU's memory
    (engines sharing a GPU each take their own share), and a KV cache size when one is given."""
    apply_vllm_env()
    from vllm import LLM

    kwargs = engine_kwargs(model_path, seed=seed, max_model_len=max_model_len,
                           kv_cache_memory_bytes=kv_cache_memory_bytes, dtype=dtype,
                           worker_extension_cls=worker_extension_cls, gpu_memory_utilization=gpu_memory_utilization,
                           gpu_kv_cache_memory_bytes=gpu_kv_cache_memory_bytes, **extra)
    return LLM(**kwargs)


def make_async_llm(model_path: str, *, seed: int = 0, max_model_len: int = 256,
                   kv_cache_memory_bytes: int = 64 * 1024 * 1024, dtype: str = "float32",
                   worker_extension_cls: str | None = None, gpu_memory_utilization: float = 0.9,
                   gpu_kv_cache_memory_bytes: int | None = None, engine_core: str = "process", **extra: Any):
    """Build a vllm AsyncLLM (continuous batching over concurrent `generate` streams) with the same settings
    as `make_llm`. Its engine core always runs in a process of its own (spawned: about 9 s to start on CPU),
    so arguments of `collective_rpc` cross a serialiser there: send bytes, ints, strings and lists.
    `engine_core="inproc"` builds actors.rollout.inproc.InprocEngine instead: the same interface, with the
    engine core stepped by a thread of this process."""
    apply_vllm_env()
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    kwargs = engine_kwargs(model_path, seed=seed, max_model_len=max_model_len,
                           kv_cache_memory_bytes=kv_cache_memory_bytes, dtype=dtype,
                           worker_extension_cls=worker_extension_cls, gpu_memory_utilization=gpu_memory_utilization,
                           gpu_kv_cache_memory_bytes=gpu_kv_cache_memory_bytes, **extra)
    if engine_core == "inproc":
        from actors.rollout.inproc import InprocEngine

        return InprocEngine.from_engine_args(kwargs)
    if engine_core != "process":
        raise ValueError(f"rollout.engine_core must be 'process' or 'inproc', got {engine_core!r}")
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
