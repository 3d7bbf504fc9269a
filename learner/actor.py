"""The learner's Ray side: one `LearnerActor` per DeepSpeed rank, and the driver's `LearnerGroup`.

Each actor hosts one `DeepSpeedLearner`. Every collective (a train step, a ZeRO-3 gather for export, a
checkpoint) is called on all ranks at once by `LearnerGroup`; a rank called alone would wait forever.

The actors are built in two phases: created first (cheap), asked for their node's address, then set up
with the rendezvous address, so that one machine uses loopback and a multi-node group uses rank 0's IP.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import ray
import torch

from learner.engine import DeepSpeedLearner, LossFn, combine_stats
from rvpo_async.config import Config, LearnerConfig
from rvpo_async.placement import actor_options
from rvpo_async.weight_format import flatten_bucket, new_gloo_group, plan_buckets, read_safetensors, safetensors_array

log = logging.getLogger("rvpo_async")

RANK_ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class PreparedBatch(Protocol):
    batch: dict[str, Any]  # the learner tensors, advantages included; rows of group g are [g*G, (g+1)*G)

    def info(self) -> dict[str, Any]:
        """The step's summary (rank 0 returns it)."""
        ...


class StepBuilder(Protocol):
    """Turns a pulled table into a training batch (rvpo_async.step_math.StepContext): the learner is handed
    it, as it is handed the loss, and so knows nothing of the rewards or how they are aggregated."""

    def build(self, table: Any, learner_version: int) -> PreparedBatch:
        ...


class LearnerRank:
    """One learner rank. One thread unless learner.num_threads says more: oversubscribed ranks run ~10x
    slower on CPU."""

    def __init__(self, rank: int, world_size: int) -> None:
        os.environ.update(RANK_ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        # the run's Ray env says cpu (CPU is the default platform); a rank that sees a GPU trains on it
        os.environ["DS_ACCELERATOR"] = "cuda" if torch.cuda.is_available() else "cpu"
        torch.set_num_threads(1)
        self.rank, self.world_size = rank, world_size
        self.learner: DeepSpeedLearner | None = None
        self._step_ctx: StepBuilder | None = None
        self.model_path = ""
        self._weight_group: Any = None

    def node_ip(self) -> str:
        return ray.util.get_node_ip_address()

    def niceness(self) -> int:
        """The CPU niceness the rank trains at (learner.nice)."""
        return os.getpriority(os.PRIO_PROCESS, 0)

    def setup(self, master_addr: str, master_port: int, model_path: str, cfg: LearnerConfig,
              total_steps: int, seed: int) -> int:
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        self.model_path = model_path
        torch.set_num_threads(cfg.num_threads)
        if cfg.nice is not None:  # this thread runs every call of the rank; threads it starts inherit its niceness
            try:
                os.setpriority(os.PRIO_PROCESS, 0, cfg.nice)  # Linux: the calling thread
            except PermissionError:  # below the current niceness (Ray's 15) needs CAP_SYS_NICE
                log.warning("learner rank %d: cannot set niceness %d (kept %d): no CAP_SYS_NICE", self.rank,
                            cfg.nice, os.getpriority(os.PRIO_PROCESS, 0))
        self.learner = DeepSpeedLearner(model_path, cfg, total_steps=total_steps, seed=seed)
        return self.learner.version

    def _l(self) -> DeepSpeedLearner:
        if self.learner is None:
            raise RuntimeError(f"learner rank {self.rank} used before setup()")
        return self.learner

    def train_shard(self, batch: Mapping[str, torch.Tensor], loss_fn: LossFn) -> dict[str, float]:
        """This rank's share of LearnerGroup.train_step."""
        return self._l().train_batch(batch, loss_fn)

    def set_step_context(self, ctx: StepBuilder) -> None:
        self._step_ctx = ctx

    def train_table_shard(self, table: Any, loss_fn: LossFn,
                         ctx: StepBuilder | None = None) -> tuple[dict[str, float], dict[str, Any] | None]:
        """One optimizer step on this rank's groups of a pulled table (all ranks together, each given the
        same table: passed as a top-level ObjectRef, Ray maps its Arrow buffers here without a copy).
        Every rank builds the whole batch with the step builder (the same on all ranks), then trains on its
        own shard, as LearnerGroup.train_step splits it. Returns (stats, step summary on rank 0 else None);
        rank 0 computes the summary after the step, so that it does not hold the others at the collective."""
        ctx = ctx if ctx is not None else self._step_ctx
        if ctx is None:
            raise RuntimeError(f"learner rank {self.rank}: train_from_table without a step context "
                               "(LearnerGroup.set_step_context, or pass ctx)")
        learner = self._l()
        step = ctx.build(table, learner.version)
        group_size = int(step.batch["rewards"].shape[1])
        shard = split_by_groups(step.batch, self.world_size, group_size)[self.rank]
        stats = learner.train_batch(shard, loss_fn)
        return stats, (step.info() if self.rank == 0 else None)

    def export_blob(self) -> np.ndarray | None:
        """Rank 0: the full weights as one safetensors blob (returned once into Ray's object store, where a
        numpy array is stored without pickling and read without a copy)."""
        with self._l().full_params() as params:
            return safetensors_array(params) if self.rank == 0 else None

    def state_digest(self) -> str:
        """sha256 of this rank's full weights, gathered where partitioned; all ranks call together."""
        import hashlib

        state = self._l().export_state(all_ranks=True)
        assert state is not None
        h = hashlib.sha256()
        for name in sorted(state):
            h.update(name.encode())
            h.update(state[name].float().numpy().tobytes())
        return h.hexdigest()

    def load_weights(self, blob: Any) -> None:
        """Overwrite the weights from a safetensors blob of the full state (all ranks together)."""
        self._l().load_state(dict(read_safetensors(blob)), "the weights blob handed to load_weights")

    # ------------------------------------------------------------------ collective weight sync
    def weight_meta(self, bucket_bytes: int) -> list[dict[str, Any]]:
        return plan_buckets(self._l().param_specs(), bucket_bytes)

    def init_weight_group(self, addr: str, port: int, world_size: int) -> None:
        self._weight_group = new_gloo_group(addr, port, world_size, 0)

    def broadcast_weights(self, meta: list[dict[str, Any]]) -> None:
        """Every rank enters (ZeRO-3 gathers); rank 0 broadcasts each flat bucket to the engines."""
        with self._l().full_params() as params:
            if self.rank != 0:
                return
            if self._weight_group is None:
                raise RuntimeError("broadcast_weights before init_weight_group on learner rank 0")
            for bucket in meta:
                self._weight_group.broadcast(flatten_bucket(params, bucket), 0).wait()

    # ------------------------------------------------------------------ checkpoints
    def save_shard(self, directory: str) -> None:
        """This rank's part of LearnerGroup.save_checkpoint."""
        self._l().save_rank(directory, self.model_path)

    def load_shard(self, directory: str) -> int:
        """This rank's part of LearnerGroup.load_checkpoint; returns the restored version."""
        self._l().load_rank(directory)
        return self._l().version


# The Ray actor of one rank; LearnerGroup gives it its remote options (rvpo_async.placement).
LearnerActor = ray.remote(LearnerRank)


def split_by_groups(batch: Mapping[str, torch.Tensor], parts: int, group_size: int) -> list[dict[str, torch.Tensor]]:
    """Cut a batch of consecutive groups (rows [g*G, (g+1)*G) form group g) into `parts` shards of whole
    groups, as even as the group count allows."""
    n = int(batch["input_ids"].shape[0])
    if n % group_size:
        raise ValueError(f"batch of {n} rows is not whole groups of rollout.group_size={group_size}")
    groups = n // group_size
    if groups < parts:
        raise ValueError(f"batch holds {groups} groups, fewer than learner.num_ranks={parts}: every rank needs one")
    bounds = [round(i * groups / parts) * group_size for i in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds[:-1], bounds[1:])]


def merge_rank_stats(per_rank: list[dict[str, float]], version: int) -> dict[str, float]:
    """One step's stats over all ranks: grad_norm and lr from rank 0 (the same everywhere), tokens and
    sequences summed, staleness_mean sequence-weighted, the rest as combine_stats merges them."""
    shared = {k: per_rank[0][k] for k in ("grad_norm", "lr")}
    totals = {k: sum(s[k] for s in per_rank) for k in ("tokens_trained", "sequences")}
    stale = sum(s["staleness_mean"] * s["sequences"] for s in per_rank) / max(totals["sequences"], 1.0)
    merged = combine_stats([(s, s["tokens_trained"]) for s in per_rank])
    merged.update(shared, **totals, staleness_mean=stale,
                  step_seconds=max(s["step_seconds"] for s in per_rank), version=float(version))
    return merged


class LearnerGroup:
    """The driver's handle on all learner ranks: every call fans out to all of them together."""

    def __init__(self, cfg: Config, model_path: str, *, master_addr: str | None = None) -> None:
        n = cfg.learner.num_ranks
        self.cfg = cfg
        self.model_path = str(model_path)
        opts = actor_options("learner", cfg)
        self.actors = [LearnerActor.options(**opts).remote(rank, n) for rank in range(n)]
        if master_addr is None:
            ips = ray.get([a.node_ip.remote() for a in self.actors])
            master_addr = "127.0.0.1" if len(set(ips)) == 1 else ips[0]
        self.master_addr = master_addr
        versions = ray.get([a.setup.remote(master_addr, cfg.learner.master_port, self.model_path, cfg.learner,
                                           cfg.run.steps, cfg.run.seed) for a in self.actors])
        self._version = int(versions[0])
        self._has_step_context = False

    @property
    def version(self) -> int:
        return self._version

    @property
    def rank0(self) -> Any:
        return self.actors[0]

    def train_step(self, batch: Mapping[str, torch.Tensor], loss_fn: LossFn) -> dict[str, float]:
        """One optimizer step over the whole batch, split across ranks by groups; stats merged over ranks."""
        shards = split_by_groups(batch, len(self.actors), self.cfg.rollout.group_size)
        per_rank = ray.get([a.train_shard.remote(s, loss_fn) for a, s in zip(self.actors, shards)])
        self._version += 1
        return merge_rank_stats(per_rank, self._version)

    def set_step_context(self, ctx: StepBuilder) -> None:
        """Hand every rank the step builder train_from_table turns a table into a batch with (the core's
        rvpo_async.step_math.StepContext); once per run, so a step's call carries only the table's ref."""
        ref = ray.put(ctx)
        ray.get([a.set_step_context.remote(ref) for a in self.actors])
        self._has_step_context = True

    def train_from_table(self, table_ref: Any, loss_fn: LossFn,
                         ctx: StepBuilder | None = None) -> tuple[dict[str, float], dict[str, Any]]:
        """One optimizer step on a pulled table that the driver never reads: every rank gets the same
        ObjectRef (e.g. the second return of BufferActor.pull_split), builds the batch with the step builder
        and trains on its groups. Returns the stats merged as train_step merges them, and the step summary
        (PreparedBatch.info) from rank 0. `ctx` defaults to the one set_step_context
        gave the ranks. A table (not a ref) is put into the object store first."""
        if ctx is None and not self._has_step_context:
            raise RuntimeError("train_from_table without a step context: call set_step_context first, or pass ctx")
        ref = table_ref if isinstance(table_ref, ray.ObjectRef) else ray.put(table_ref)
        ctx_ref = None if ctx is None else ray.put(ctx)  # pickled once, not once per rank
        out = ray.get([a.train_table_shard.remote(ref, loss_fn, ctx_ref) for a in self.actors])
        self._version += 1
        info = out[0][1]
        assert info is not None, "learner rank 0 returned no step summary"
        return merge_rank_stats([s for s, _ in out], self._version), info

    def export_blob(self) -> ray.ObjectRef:
        """The full weights as one safetensors blob in the object store (put once by rank 0)."""
        refs = [a.export_blob.remote() for a in self.actors]
        ray.get(refs[1:])
        return refs[0]

    def state_digests(self) -> list[str]:
        return ray.get([a.state_digest.remote() for a in self.actors])

    def load_weights(self, blob: bytes | ray.ObjectRef) -> None:
        """Replace the weights (not the optimizer state) with a full safetensors blob, e.g. a warm start."""
        ref = blob if isinstance(blob, ray.ObjectRef) else ray.put(blob)
        ray.get([a.load_weights.remote(ref) for a in self.actors])

    def save_checkpoint(self, root: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Write `<root>/step_<version>/` atomically and point `<root>/latest` at it; returns its path.
        Every rank writes its own files there: across machines `root` must be on shared storage."""
        from learner import checkpoint

        tmp = checkpoint.begin(root, self._version)
        ray.get([a.save_shard.remote(str(tmp)) for a in self.actors])
        checkpoint.write_json(tmp / "extra.json", dict(extra or {}))
        return checkpoint.finalize(root, tmp, self._version, self.cfg.checkpoint.keep)

    def load_checkpoint(self, path: str | Path) -> dict[str, Any]:
        """Resume from a step directory or a run root's `latest`; returns the saved `extra` state."""
        from learner import checkpoint

        ckpt = checkpoint.load(path)
        versions = ray.get([a.load_shard.remote(str(ckpt.path)) for a in self.actors])
        self._version = int(versions[0])
        return ckpt.extra

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)
        self.actors = []
