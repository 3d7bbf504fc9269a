"""Rollout: a vLLM engine that samples G responses per prompt and records behaviour log-probs.

`CallRollout` is a plain class (testable without Ray); `RolloutActor` is its Ray actor. The actor
runs one call at a time, so a weight update always lands between generate calls and no response ever
mixes two policy versions. Inside one generate call all prompts are in flight together (continuous
batching), and a call returns when its longest response ends. A prompt may cap its own responses with
meta["max_new_tokens"] (at most the engine's max_new_tokens).

Weight updates arrive through `actors.rollout.weight_receiver` (a vLLM worker extension): a safetensors blob
through Ray's object store, or flat buffers broadcast over a collective group. After each update the
prefix cache is reset, or prompts longer than one KV block would reuse KV computed by the old weights.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import ray

from actors.vllm_engine import apply_vllm_env, check_request, make_llm
from rvpo_async.types import Prompt, RolloutGroup, Sample

WORKER_EXTENSION = "actors.rollout.weight_receiver.WeightReceiverExtension"


class CallRollout:
    def __init__(self, name: str, model_path: str, *, group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, max_model_len: int = 256,
                 kv_cache_memory_bytes: int = 64 * 1024 * 1024, version: int = 0,
                 gpu_memory_utilization: float = 0.9, gpu_kv_cache_memory_bytes: int | None = None,
                 weight_load: str = "repack", ignore_eos: bool = False) -> None:
        apply_vllm_env()
        self.name = name
        self.ignore_eos = ignore_eos  # benchmarks: responses run to their budget
        self.group_size = group_size
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.top_p = top_p
        self.seed = seed
        self.version = version
        # processed log-probs: after temperature/top-p, i.e. the distribution actually sampled from
        self.llm = make_llm(model_path, seed=seed, max_model_len=max_model_len,
                            kv_cache_memory_bytes=kv_cache_memory_bytes, worker_extension_cls=WORKER_EXTENSION,
                            logprobs_mode="processed_logprobs", gpu_memory_utilization=gpu_memory_utilization,
                            gpu_kv_cache_memory_bytes=gpu_kv_cache_memory_bytes)
        self.tokenizer = self.llm.get_tokenizer()
        if weight_load != "repack":
            from actors.rollout.weight_receiver import set_weight_load

            set_weight_load(self.llm, weight_load)
        self.generated_tokens = 0

    def _params(self, n: int, seed: int | None, max_tokens: int | None = None):
        from vllm import SamplingParams

        return SamplingParams(n=n, max_tokens=max_tokens or self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, logprobs=0, seed=seed, detokenize=False,
                              ignore_eos=self.ignore_eos)

    def generate(self, prompts: Sequence[Prompt], group_ids: Sequence[int],
                 seeds: Sequence[int] | None = None) -> list[RolloutGroup]:
        """G samples for each prompt, as one RolloutGroup per prompt at the current policy version.

        `seeds`, one per prompt, make sampling reproducible (vLLM gives sample j the seed seed + j). A prompt
        with meta["max_new_tokens"] caps its own responses (`response_budget`).
        """
        seeds, budgets = check_request(prompts, group_ids, seeds, self.max_new_tokens)
        inputs = [{"prompt_token_ids": list(p.token_ids)} for p in prompts]
        params = [self._params(self.group_size, s, b) for s, b in zip(seeds, budgets)]
        outs = self.llm.generate(inputs, params, use_tqdm=False)
        version = self.version
        now = time.time()
        groups = []
        for prompt, gid, out in zip(prompts, group_ids, outs):
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                ids = tuple(int(t) for t in c.token_ids)
                lps = tuple(float(next(iter(d.values())).logprob) if d else 0.0 for d in (c.logprobs or []))
                if len(lps) != len(ids):
                    raise RuntimeError(f"engine {self.name}: {len(ids)} tokens but {len(lps)} log-probs")
                text = self.tokenizer.decode(ids, skip_special_tokens=True)
                samples.append(Sample(token_ids=ids, logprobs=lps, finish_reason=str(c.finish_reason), text=text))
                self.generated_tokens += len(ids)
            groups.append(RolloutGroup(group_id=int(gid), prompt=prompt, samples=tuple(samples),
                                       policy_version=version, engine=self.name, created_at=now))
        return groups

    def sample_texts(self, prompts: Sequence[Prompt], n: int, temperature: float, max_tokens: int,
                     seed: int = 0) -> tuple[list[list[str]], int, int]:
        """Evaluation: n decoded responses per prompt (temperature 0 = greedy), the policy version that
        wrote them and the tokens generated. Nothing here feeds training."""
        from vllm import SamplingParams

        params = SamplingParams(n=n, max_tokens=max_tokens, temperature=temperature, seed=seed, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": list(p.token_ids)} for p in prompts], params, use_tqdm=False)
        texts = [[self.tokenizer.decode(c.token_ids, skip_special_tokens=True)
                  for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]
        return texts, self.version, sum(len(c.token_ids) for o in outs for c in o.outputs)

    def score_tokens(self, prompt_ids: Sequence[int], response_ids: Sequence[int]) -> list[float]:
        """Log-prob of each of `response_ids` after `prompt_ids` under the engine's current weights."""
        from vllm import SamplingParams

        sp = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        full = list(prompt_ids) + list(response_ids)
        out = self.llm.generate([{"prompt_token_ids": full}], sp, use_tqdm=False)[0]
        plp = out.prompt_logprobs
        return [float(plp[i][full[i]].logprob) for i in range(len(prompt_ids), len(full))]

    # ------------------------------------------------------------------ weights
    def update_weights(self, version: int, blob: bytes) -> int:
        """Load a safetensors blob of the full state dict; the engine then serves `version`."""
        from actors.rollout.weight_receiver import load_blob

        load_blob(self.llm, blob)
        self.llm.reset_prefix_cache()
        self.version = int(version)
        return self.version

    def init_weight_group(self, master_addr: str, master_port: int, world_size: int, rank: int) -> None:
        from actors.rollout.weight_receiver import init_group

        init_group(self.llm, master_addr, master_port, world_size, rank)

    def receive_weights(self, version: int, meta: Any) -> int:
        """Receive a broadcast from learner rank 0 over the collective group (all members call together)."""
        from actors.rollout.weight_receiver import receive_broadcast

        receive_broadcast(self.llm, meta)
        self.llm.reset_prefix_cache()
        self.version = int(version)
        return self.version

    def ready(self) -> str:
        return self.name

    def get_version(self) -> int:
        return self.version

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "generated_tokens": self.generated_tokens}


# The Ray actor hosting one engine: one call at a time (max_concurrency=1).
RolloutActor = ray.remote(CallRollout)
