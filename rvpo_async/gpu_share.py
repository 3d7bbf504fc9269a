"""GPU sharing between engines: the memory-share rules and the packing they imply. Pure: no Ray, no vLLM.

An actor that asks Ray for a fraction of a GPU (`num_gpus` in (0, 1)) may be packed beside other fractional
actors on the same GPU; Ray keeps the fractions on one GPU at or below 1. A vLLM engine's memory is bounded
by its own `gpu_memory_utilization` (weights, activations and KV cache), so an engine whose memory share
never exceeds its Ray fraction keeps every GPU's shares at or below 1, whatever Ray packs beside it. That
is the rule checked at load time; `pack_gpus` predicts where Ray's packing puts each actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

_TOL = 1e-9


@dataclass(frozen=True)
class GpuShare:
    name: str  # e.g. "rollout-0", "judge-engine-default", "learner-1"
    key: str  # the config section that sets it, e.g. "rollout", "judges.engine", "learner"
    num_gpus: float  # the Ray fraction it requests
    memory_share: float | None  # vLLM's gpu_memory_utilization; None for the learner (not bounded by vLLM)


def gpu_shares(cfg: Any) -> list[GpuShare]:
    """Every GPU-holding actor of a run with its Ray fraction and its memory share."""
    out = [GpuShare(f"rollout-{i}", "rollout", cfg.rollout.num_gpus, cfg.rollout.gpu_memory_utilization)
           for i in range(cfg.rollout.num_engines)]
    e = cfg.judges.engine
    out += [GpuShare(f"judge-engine-{n}", "judges.engine", e.num_gpus, e.gpu_memory_utilization)
            for n in cfg.judges.engine_names]
    out += [GpuShare(f"learner-{i}", "learner", cfg.learner.num_gpus, None) for i in range(cfg.learner.num_ranks)]
    return [s for s in out if s.num_gpus > 0]


def check_gpu_shares(cfg: Any) -> Iterator[tuple[str, str]]:
    """(dotted key, problem) for each GPU-share rule the config breaks."""
    sections = {"rollout": cfg.rollout, "judges.engine": cfg.judges.engine, "learner": cfg.learner}
    for key, sec in sections.items():
        f = float(sec.num_gpus)
        if f > 1 and abs(f - round(f)) > _TOL:
            yield f"{key}.num_gpus", f"must be a fraction of one GPU (<= 1) or a whole number, got {f}"
    for key in ("rollout", "judges.engine"):
        sec = sections[key]
        f, u = float(sec.num_gpus), float(sec.gpu_memory_utilization)
        if 0 < f < 1 and u > f + _TOL:
            yield f"{key}.gpu_memory_utilization", (
                f"is {u:g} but {key}.num_gpus is {f:g}: an engine on a fraction of a GPU may use at most that "
                f"share of its memory, or the actors Ray packs beside it would need more than the whole GPU "
                f"(set {key}.gpu_memory_utilization <= {f:g})")


def pack_gpus(shares: list[GpuShare], num_gpus: int | None = None) -> list[list[GpuShare]]:
    """First-fit decreasing: fractional actors packed onto as few GPUs as their fractions allow, whole-GPU
    actors on GPUs of their own. With `num_gpus`, a plan needing more GPUs raises ValueError naming them."""
    gpus: list[list[GpuShare]] = []
    load: list[float] = []
    for s in sorted(shares, key=lambda s: -s.num_gpus):
        if s.num_gpus >= 1:
            for _ in range(int(round(s.num_gpus))):
                gpus.append([s])
                load.append(1.0)
            continue
        for i, used in enumerate(load):
            if used + s.num_gpus <= 1 + _TOL:
                gpus[i].append(s)
                load[i] += s.num_gpus
                break
        else:
            gpus.append([s])
            load.append(s.num_gpus)
    if num_gpus is not None and len(gpus) > num_gpus:
        plan = "; ".join(f"GPU {i}: " + ", ".join(f"{s.name} {s.num_gpus:g}" for s in g) for i, g in enumerate(gpus))
        raise ValueError(f"the configured GPU fractions need {len(gpus)} GPUs, {num_gpus} available ({plan}); "
                         f"lower rollout.num_gpus, judges.engine.num_gpus or learner.num_gpus")
    return gpus


def memory_on_gpu(gpu: list[GpuShare]) -> float:
    """The vLLM memory shares on one packed GPU, plus each learner's Ray fraction."""
    return sum(s.memory_share if s.memory_share is not None else s.num_gpus for s in gpu)
