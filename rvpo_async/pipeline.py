"""The composition root: builds every actor of a run from the config, and tears them down.

Nothing here decides what happens when; the driver's loops (rvpo_async.driver) do.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from rvpo_async.config import Config
from actors.control import NAMESPACE, create_control
from rvpo_async.placement import actor_options
from rvpo_async.types import Prompt

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from ray.actor import ActorHandle

    from learner.engine import LossFn
    from rvpo_async.interfaces import Learner, WeightSync
    from rvpo_async.metrics import Metrics

log = logging.getLogger("rvpo_async")

# OMP_WAIT_POLICY=PASSIVE: a learner rank with learner.num_threads > 1 shares its cores with the engines; its
# OpenMP threads sleep at a barrier instead of spinning on a core another actor needs (BENCHMARKS.md, 135M rung)
RAY_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false"}


def init_ray(cfg: Config) -> bool:
    """Connect to cfg.ray.address, or start a local instance. Returns True when this call started Ray."""
    if ray.is_initialized():
        return False
    env = {"env_vars": dict(RAY_ENV)}
    if cfg.ray.address:  # "auto" joins the cluster this process runs in (a RayJob's driver)
        ray.init(address=cfg.ray.address, runtime_env=env, log_to_driver=True, namespace=NAMESPACE)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus or max(8, os.cpu_count() or 2), include_dashboard=False,
                 runtime_env=env, log_to_driver=True, namespace=NAMESPACE)
    return True


def on_driver_node() -> dict[str, Any]:
    """Remote options that keep an actor on the driver's node (the head pod on KubeRay).

    The buffer and the run control request no resources, so Ray may otherwise place them on any node,
    a judge node included, and the autoscaler removes a judge node once its judge workers are gone, taking
    the run down with it. On the driver's node the buffer also writes its persist_dir where --resume reads it.
    """
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}


def resolve_model(cfg: Config) -> str:
    path = Path(cfg.model.path)
    if cfg.model.build_if_missing:
        from rvpo_async.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(path, seed=cfg.model.tiny_seed).resolve())
    return str(path.resolve()) if path.exists() else cfg.model.path


@dataclass
class Pipeline:
    """A run's parts. The actor handles serve the protocols of rvpo_async.interfaces: `engines` are
    RolloutEngines (StreamingRolloutActor), `judges` the judge service (JudgeServiceActor, hosting the pool
    of JudgeWorkers), `buffer` the BufferActor, `judge_engines` the LLM judges' vLLM engines by name."""

    cfg: Config
    model_path: str
    prompts: list[Prompt]
    pad_id: int
    engines: "list[ActorHandle]"
    engine_names: list[str]
    buffer: "ActorHandle"
    judges: "ActorHandle"
    judge_engines: "dict[str, ActorHandle]"
    learner: "Learner"
    sync: "WeightSync"
    loss_fn: "LossFn"
    run_id: str = ""
    control: "ActorHandle | None" = None
    metrics: "Metrics | None" = None
    metrics_server: "WSGIServer | None" = None
    eval_prompts: list[Prompt] = field(default_factory=list)  # held out: never trained on

    def shutdown(self) -> None:
        for fn in (lambda: ray.get(self.judges.shutdown.remote(), timeout=30), lambda: self.learner.shutdown()):
            try:
                fn()
            except Exception as e:  # shutting down: report, keep going
                log.warning("shutdown: %s", e)
        for h in list(self.engines) + list(self.judge_engines.values()) + [self.judges, self.buffer, self.control]:
            try:
                ray.kill(h)
            except Exception:
                pass
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()


def build_pipeline(cfg: Config, run_dir: Path) -> Pipeline:
    from transformers import AutoTokenizer

    from actors.buffer import create_buffer_actor
    from actors.judges.pool import create_judge_engines
    from actors.judges.service import JudgeServiceActor
    from actors.rollout.streaming import StreamingRolloutActor
    from learner.actor import LearnerGroup
    from rvpo_async.loss import make_loss_fn
    from learner.weight_sync import make_weight_sync
    from rvpo_async.metrics import Metrics
    from rvpo_async.evaluate import load_split

    model_path = resolve_model(cfg)
    tok = AutoTokenizer.from_pretrained(model_path)
    prompts, eval_prompts = load_split(cfg, tok)
    too_long = [p.prompt_id for p in prompts + eval_prompts if len(p.token_ids) + cfg.rollout.max_new_tokens > cfg.model.max_model_len]
    if too_long:
        raise ValueError(f"{len(too_long)} prompt(s) (first: {too_long[0]}) plus rollout.max_new_tokens exceed "
                         f"model.max_model_len={cfg.model.max_model_len}")
    names = cfg.reward_names
    if not names:
        raise ValueError("config key 'judges.specs': at least one judge is needed")

    metrics = server = None
    if cfg.metrics.enabled:
        metrics = Metrics.from_config(cfg)
        server = metrics.start_http_server(cfg.metrics.host, cfg.metrics.port)

    persist = cfg.buffer.persist_dir or str(run_dir / "buffer")
    buffer = create_buffer_actor(cfg, names, persist, restore=cfg.run.resume, **on_driver_node())
    judge_engines = create_judge_engines(cfg, model_path)
    # on the driver's node, like the buffer: it requests no resources (see on_driver_node)
    judges = JudgeServiceActor.options(**actor_options("judge_service", cfg, **on_driver_node())).remote(
        cfg, judge_engines, buffer)
    engines, engine_names = [], []
    run_id = f"rvpo-{uuid.uuid4().hex[:8]}"  # Ray actor names: unique per run, readable in `ray list actors`
    for i in range(cfg.rollout.num_engines):
        name = f"rollout-{i}"
        h = StreamingRolloutActor.options(name=f"{run_id}-{name}", **actor_options("rollout", cfg)).remote(
            name, model_path, group_size=cfg.rollout.group_size, max_new_tokens=cfg.rollout.max_new_tokens,
            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, seed=cfg.run.seed + i,
            max_model_len=cfg.model.max_model_len, kv_cache_memory_bytes=cfg.rollout.kv_cache_memory_bytes,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            gpu_kv_cache_memory_bytes=cfg.rollout.gpu_kv_cache_memory_bytes, weight_load=cfg.rollout.weight_load,
            weight_update=cfg.rollout.weight_update, engine_core=cfg.rollout.engine_core,
            min_new_tokens=cfg.rollout.min_new_tokens, compile_model=cfg.rollout.compile)
        engines.append(h)
        engine_names.append(name)
    learner = LearnerGroup(cfg, model_path)
    ray.get([h.ready.remote() for h in engines] + [judges.ready.remote()])
    # sent, not constructor arguments: handles among those make Ray keep them in the object store, which a
    # restart needs (a restarted engine is connected again when it is caught up: Stepper._wait_available)
    ray.get([h.connect.remote(buffer, judges) for h in engines])
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return Pipeline(cfg=cfg, model_path=model_path, prompts=prompts, pad_id=int(pad_id), engines=engines,
                    engine_names=engine_names, buffer=buffer, judges=judges, judge_engines=judge_engines,
                    learner=learner, sync=make_weight_sync(cfg), loss_fn=make_loss_fn(cfg.algo, cfg.rollout.temperature),
                    run_id=run_id, control=create_control(run_id, cfg, **on_driver_node()), metrics=metrics,
                    metrics_server=server, eval_prompts=eval_prompts)
