"""One DeepSpeed rank of the learner: train steps with a loss function it is handed, full-weight export.

The learner knows nothing of RVPO (AReaL-lite's split): `train_batch(batch, loss_fn)` computes token
log-probs, hands them with the batch to `loss_fn`, and steps. What it owns is the bookkeeping around that:
- Proximal log-probs (pi_prox of decoupled PPO) are the learner's policy at the start of the step, at the
  temperature the loss function names. A batch takes one optimizer step, so the weights of every
  micro-batch's training forward are still those of the start of the step: its log-probs, detached, ARE the
  proximal ones, and no separate forward is run. `learner.recompute_proximal` runs the separate no-grad
  forward over all micro-batches first (needed only if a batch ever took several optimizer steps).
- A loss function with `needs_reference` (the KL anchor) also gets `ref_logprobs` in its batch: the
  log-probs of a frozen copy of the initial model (loaded from the model path on first use, a plain torch
  module on each rank, outside DeepSpeed, so the same under ZeRO 2 and 3), computed with no grad.
- Log-prob convention: position t holds log p(input_ids[t] | input_ids[<t]) from the logits at t-1 divided
  by the temperature, 0 at position 0; the rollout engine's behaviour log-probs use the same one.
- One optimizer step per batch. The batch is cut into micro-batches of `micro_batch_size`; each micro-batch
  loss (a token mean) is scaled by its share of the whole batch's tokens across all ranks, so the step
  follows the token mean of the whole batch, not a mean of micro-batch means. DeepSpeed's managed
  accumulation is off: the learner owns the accumulation boundary, which is its `step()` call.
- Every rank runs the same number of forward/backward passes (ZeRO-3 gathers parameters in each one,
  ZeRO-2 reduces gradients in each backward): the count is agreed by an all-reduce and a rank short of data
  runs a zero-weighted pass on its first sequence.
- staleness = learner version - policy_version is added to the batch before the loss sees it.
- `learner.shared_prefix` (on by default) runs each distinct prompt of a micro-batch through the model once
  and its G responses after its KV cache (learner/logprobs.py): the same log-probs and gradients, with the
  prompt's G-1 repeats never computed. Micro-batches where no two rows share a prompt take the plain forward.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, nullcontext
from functools import partial
from typing import Any, Iterator, Mapping, Protocol

import torch
import torch.distributed as dist

from learner.checkpoint import load_rank, save_rank
from learner.logprobs import PrefixPlan, masked_token_logprobs, plan_prefix, shared_prefix_logprobs
from rvpo_async.config import LearnerConfig

REQUIRED_KEYS = ("input_ids", "response_mask", "behaviour_logprobs", "advantages", "policy_version")


class LossFn(Protocol):
    """What the learner is handed: the loss, the sampling temperature its log-probs are taken at, and
    whether it reads the reference model's log-probs (batch key `ref_logprobs`)."""

    temperature: float
    needs_reference: bool

    def __call__(self, logprobs: torch.Tensor, proximal_logprobs: torch.Tensor,
                 batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]: ...


def lr_factor(step: int, *, schedule: str, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the base learning rate after `step` optimizer steps (linear warmup, then the schedule)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"learner.lr_schedule must be constant, linear or cosine, got {schedule!r}")


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: LearnerConfig,
                   total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    fn = partial(lr_factor, schedule=cfg.lr_schedule, warmup_steps=cfg.warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def plain_optimizer(cfg: LearnerConfig) -> bool:
    """Whether DeepSpeed runs the torch optimizer unwrapped (no ZeRO, no bf16 master weights)."""
    return cfg.zero_stage == 0 and cfg.dtype == "fp32"


def ds_config(cfg: LearnerConfig, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config for one learner rank. torch's AdamW: DeepSpeedCPUAdam needs a ~75 s JIT build."""
    return {
        "train_micro_batch_size_per_gpu": cfg.micro_batch_size,
        # the learner accumulates micro-batches itself (one optimizer step per train_batch); these two
        # entries only fill DeepSpeed's batch-size bookkeeping
        "gradient_accumulation_steps": 1,
        "train_batch_size": cfg.micro_batch_size * world_size,
        "managed_gradient_accumulation": False,
        # a bare torch optimizer (ZeRO-0, fp32) reports no gradient norm: the learner clips it itself
        "gradient_clipping": 0.0 if plain_optimizer(cfg) else cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.dtype == "bf16"},
        "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay,
                                                  "torch_adam": True, "betas": [0.9, 0.999], "eps": 1e-8}},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def derive_attention_mask(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Right-padded rows: every position up to the row's last response token is real."""
    if "attention_mask" in batch:
        return batch["attention_mask"].long()
    ids = batch["input_ids"]
    pos = torch.arange(ids.shape[1]).unsqueeze(0)  # [1, L]
    resp = batch["response_mask"] > 0
    last = torch.where(resp, pos, torch.full_like(pos, -1)).amax(dim=1, keepdim=True)  # [N, 1]
    return (pos <= last).long()


def combine_stats(parts: list[tuple[dict[str, float], float]]) -> dict[str, float]:
    """Merge (stats, tokens) pairs: `*_max` keys by max, `*_min` by min, the rest token-weighted over the
    parts that carry the key (a key missing from a part is not diluted by that part's tokens)."""
    out: dict[str, float] = {}
    for key in dict.fromkeys(k for s, _ in parts for k in s):  # every key, in first-seen order
        vals = [(float(s[key]), w) for s, w in parts if key in s]
        total = sum(w for _, w in vals)
        if key.endswith("_max"):
            out[key] = max(v for v, _ in vals)
        elif key.endswith("_min"):
            out[key] = min(v for v, _ in vals)
        elif total > 0:
            out[key] = sum(v * w for v, w in vals) / total
        else:
            out[key] = sum(v for v, _ in vals) / len(vals)
    return out


class DeepSpeedLearner:
    """One rank. torch.distributed must be reachable through MASTER_ADDR/PORT, RANK, WORLD_SIZE."""

    def __init__(self, model_path: str, cfg: LearnerConfig, *, total_steps: int = 0, seed: int = 0) -> None:
        import deepspeed
        from transformers import AutoModelForCausalLM

        self.cfg = cfg
        self.model_path = model_path
        self._reference: torch.nn.Module | None = None
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        torch.manual_seed(seed)
        try:
            model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        except OSError as e:
            raise FileNotFoundError(f"learner cannot load the model at {model_path!r}: {e}") from e
        model.config.use_cache = False
        self._pad_id = int(model.config.pad_token_id or 0)  # fills the shared-prefix path's padding (never attended)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config(cfg, self.world_size),
            lr_scheduler=partial(make_scheduler, cfg=cfg, total_steps=total_steps))
        self.version = 0
        self._grad_norm: float | None = None
        if plain_optimizer(cfg):
            # runs inside engine.step(), after DeepSpeed's all-reduce: the norm of the averaged gradient
            self.engine.optimizer.register_step_pre_hook(self._clip_hook)

    def _clip_hook(self, optimizer: torch.optim.Optimizer, *_: Any) -> None:
        params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        clip = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))

    # ------------------------------------------------------------------ training
    def _prepare(self, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        missing = [k for k in REQUIRED_KEYS if k not in batch]
        if missing:
            raise KeyError(f"training batch lacks {missing}; required keys: {list(REQUIRED_KEYS)} "
                           "(attention_mask optional)")
        n, length = batch["input_ids"].shape
        if n == 0:
            raise ValueError(f"learner rank {self.rank} was given an empty batch; every rank needs >= 1 sequence")
        for k in ("response_mask", "behaviour_logprobs"):
            if tuple(batch[k].shape) != (n, length):
                raise ValueError(f"batch[{k!r}] has shape {tuple(batch[k].shape)}, expected {(n, length)}")
        if bool((batch["policy_version"] > self.version).any()):
            raise ValueError(f"batch rows carry policy_version {int(batch['policy_version'].max())}, newer than "
                             f"the learner's version {self.version}")
        out = dict(batch, input_ids=batch["input_ids"].long(), attention_mask=derive_attention_mask(batch),
                   response_mask=batch["response_mask"].float(), advantages=batch["advantages"].float(),
                   behaviour_logprobs=batch["behaviour_logprobs"].float(),
                   staleness=(self.version - batch["policy_version"]).long())
        return {k: v.to(self.engine.device) for k, v in out.items()}

    def _micro_slices(self, n: int) -> list[slice | None]:
        """Slices of this rank's rows, as many on every rank; None marks a zero-weighted filler pass."""
        count = torch.tensor([math.ceil(n / self.cfg.micro_batch_size)], device=self.engine.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        bounds = torch.linspace(0, n, int(count) + 1).round().long().tolist()
        return [slice(a, b) if b > a else None for a, b in zip(bounds[:-1], bounds[1:])]

    def _plan(self, mb: Mapping[str, torch.Tensor]) -> PrefixPlan | None:
        if not self.cfg.shared_prefix:
            return None
        return plan_prefix(mb["input_ids"], mb["attention_mask"], mb["response_mask"])

    def _logprobs(self, model: Any, mb: Mapping[str, torch.Tensor], plan: PrefixPlan | None,
                  temperature: float) -> torch.Tensor:
        """Token log-probs of `model` (the DeepSpeed engine or the frozen reference) on a micro-batch."""
        if plan is not None:
            return shared_prefix_logprobs(model, mb["input_ids"], mb["attention_mask"], plan, temperature,
                                          self._pad_id, need=mb["response_mask"],
                                          max_buckets=self.cfg.length_buckets)
        return masked_token_logprobs(model, mb["input_ids"], mb["attention_mask"], mb["response_mask"], temperature)

    def _reference_logprobs(self, mb: Mapping[str, torch.Tensor], plan: PrefixPlan | None,
                            temperature: float) -> torch.Tensor:
        if self._reference is None:
            from transformers import AutoModelForCausalLM

            dtype = torch.bfloat16 if self.cfg.dtype == "bf16" else torch.float32
            ref = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=dtype)
            ref.config.use_cache = False
            self._reference = ref.requires_grad_(False).eval().to(self.engine.device)
        with torch.no_grad():
            return self._logprobs(self._reference, mb, plan, temperature)

    def train_batch(self, batch: Mapping[str, torch.Tensor], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step on this rank's share of the batch; call on all ranks together."""
        t0 = time.perf_counter()
        b = self._prepare(batch)
        n = b["input_ids"].shape[0]
        tokens = b["response_mask"].sum()
        global_tokens = tokens.clone()
        dist.all_reduce(global_tokens)
        slices = self._micro_slices(n)
        micro = [{k: v[s if s is not None else slice(0, 1)] for k, v in b.items()} for s in slices]
        plans = [self._plan(mb) for mb in micro]
        temperature = loss_fn.temperature
        if getattr(loss_fn, "needs_reference", False):
            micro = [dict(mb, ref_logprobs=self._reference_logprobs(mb, plan, temperature))
                     for mb, plan in zip(micro, plans)]

        self.engine.train()
        proximal: list[torch.Tensor | None] = [None] * len(micro)
        if self.cfg.recompute_proximal:
            with torch.no_grad():
                proximal = [self._logprobs(self.engine, mb, plan, temperature) for mb, plan in zip(micro, plans)]
        parts: list[tuple[dict[str, float], float]] = []
        for s, mb, plan, prox in zip(slices, micro, plans, proximal):
            logprobs = self._logprobs(self.engine, mb, plan, temperature)
            # no optimizer step between micro-batches: this forward's weights are the proximal policy's
            loss, stats = loss_fn(logprobs, logprobs.detach() if prox is None else prox, mb)
            mb_tokens = float(mb["response_mask"].sum()) if s is not None else 0.0
            share = mb_tokens / max(float(global_tokens), 1.0) * self.world_size  # gradients are rank-averaged
            self.engine.backward(loss * share, scale_wrt_gas=False)
            if s is not None:
                parts.append((stats, mb_tokens))
        self.engine.step()
        self.version += 1

        out = combine_stats(parts)
        out.pop("tokens", None)
        grad_norm = self._grad_norm if plain_optimizer(self.cfg) else self.engine.get_global_grad_norm()
        stale = b["staleness"].float()
        out.update(grad_norm=float(grad_norm) if grad_norm is not None else float("nan"),
                   staleness_mean=float(stale.mean()), staleness_max=float(stale.max()),
                   tokens_trained=float(tokens), sequences=float(n), lr=float(self.scheduler.get_last_lr()[0]),
                   step_seconds=time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------------ weights
    def named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Trainable tensors by name, each once (a tied lm_head appears only as the embedding)."""
        return list(self.engine.module.named_parameters())

    def param_specs(self) -> list[tuple[str, torch.dtype, list[int]]]:
        """(name, dtype, full shape) of every exported tensor, without gathering ZeRO-3 partitions."""
        return [(n, p.dtype, list(getattr(p, "ds_shape", p.shape))) for n, p in self.named_params()]

    @contextmanager
    def full_params(self) -> Iterator[dict[str, torch.Tensor]]:
        """The full weights by name, gathered for the duration under ZeRO-3 (all ranks enter together).
        The tensors are the live parameters: copy what must outlive the block."""
        import deepspeed

        named = self.named_params()
        gather = (deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
                  if self.cfg.zero_stage == 3 else nullcontext())
        with gather, torch.no_grad():
            yield {n: p.detach() for n, p in named}

    def export_state(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None:
        """Full weights (copies). All ranks must call together; rank 0 (or every rank) gets them."""
        with self.full_params() as params:
            return {n: p.clone() for n, p in params.items()} if all_ranks or self.rank == 0 else None

    def load_state(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Overwrite the weights with `state` (full tensors, same names); all ranks call together."""
        import deepspeed

        named = self.named_params()
        missing = [n for n, _ in named if n not in state]
        if missing:
            raise KeyError(f"{source} lacks weights {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if self.cfg.zero_stage == 3:
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
                if self.rank == 0:
                    with torch.no_grad():
                        for n, p in named:
                            p.copy_(state[n])
        else:
            with torch.no_grad():
                for n, p in named:
                    p.copy_(state[n])
        # ZeRO and bf16 keep fp32 master copies apart from the module's weights: the next step would
        # otherwise start from the old master and undo the load
        refresh = getattr(self.engine.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def base_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer under DeepSpeed's wrapper; its params are this rank's fp32 master copies."""
        opt = self.engine.optimizer
        base = getattr(opt, "optimizer", opt)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"unexpected optimizer {type(base).__name__} under DeepSpeed's {type(opt).__name__}")
        return base

    # ------------------------------------------------------------------ checkpoints
    def save_rank(self, directory: str, model_path: str) -> None:
        """Write this rank's part of a checkpoint into `directory` (all ranks call together)."""
        save_rank(self, directory, model_path)

    def load_rank(self, directory: str) -> None:
        """Restore weights, optimizer, scheduler, counters and RNG from a verified checkpoint directory."""
        load_rank(self, directory)
