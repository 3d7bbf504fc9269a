"""Resumable checkpoints: one directory per step, written whole or not at all.

Layout of `<root>/step_000010/`:
  model.safetensors + config/tokenizer files   loadable by transformers' from_pretrained
  learner_state.json                           policy version, DeepSpeed step counters, world size, ZeRO stage
  scheduler.pt                                 the LR scheduler's state
  optimizer_rank{r}.pt                         rank r's torch optimizer state and fp32 master partition
  rng_rank{r}.pt                               python, numpy and torch RNG states of rank r
  extra.json                                   the driver's own state (buffer counters, persisted files)
  manifest.json                                every other file with its size and sha256
and `<root>/latest` names the newest complete one.

Why it is safe to crash at any point: every file goes into a temporary directory first; the manifest is
written last; the directory is renamed into place (`os.replace`), and only then is `latest` rewritten,
itself through a temporary file and a rename. A reader follows `latest` and checks the manifest, so it
sees the previous checkpoint or the new one, never half of one; anything missing, truncated or altered
raises CheckpointError naming the file.

Nothing is unpickled beyond tensors and plain containers: `.pt` files load with `weights_only=True`.
Optimizer state is saved per rank, so a checkpoint resumes with the same number of ranks and ZeRO stage.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from rvpo_async.fileio import atomic_write

MANIFEST = "manifest.json"
LATEST = "latest"
STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, partial or corrupt; the message names the file."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]  # learner_state.json
    extra: dict[str, Any]  # extra.json


def step_name(step: int) -> str:
    return f"step_{int(step):06d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, data: Any) -> None:
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file missing: {path}") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint file {path} is not valid JSON: {e}") from e


def torch_load(path: Path) -> Any:
    """Tensors and plain containers only (weights_only=True): a checkpoint can never run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file missing: {path}") from e
    except Exception as e:  # truncated zip, refused global, ...
        raise CheckpointError(f"checkpoint file {path} cannot be read: {e}") from e


def begin(root: str | Path, step: int) -> Path:
    """A fresh temporary directory inside `root` (same filesystem, so the final rename is atomic)."""
    tmp = Path(root) / f".tmp-{step_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an earlier crash
    tmp.mkdir(parents=True)
    return tmp


def _write_latest(root: Path, name: str) -> None:
    atomic_write(root / LATEST, name + "\n")
    _fsync(root)


def finalize(root: str | Path, tmp: Path, step: int, keep: int) -> Path:
    """Seal `tmp` with a manifest, move it into place as step_<step>, point `latest` at it, prune."""
    root = Path(root)
    files = {}
    for p in sorted(tmp.rglob("*")):
        if p.is_file():
            _fsync(p)
            files[p.relative_to(tmp).as_posix()] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    write_json(tmp / MANIFEST, {"step": int(step), "files": files})
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    final = root / step_name(step)
    if final.exists():  # saving the same step again (e.g. after a resume): set the old copy aside first
        old = root / f".old-{step_name(step)}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)
    _write_latest(root, final.name)
    prune(root, keep)
    return final


def list_steps(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_RE.match(p.name))]
    return sorted(found)


def prune(root: str | Path, keep: int) -> None:
    """Remove all but the newest `keep` checkpoints; the one `latest` names always stays."""
    latest = (Path(root) / LATEST).read_text().strip() if (Path(root) / LATEST).is_file() else None
    steps = list_steps(root)
    for _, path in steps[:max(0, len(steps) - keep)]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint `<root>/latest` names; None when there is none yet."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    if not STEP_RE.match(name):
        raise CheckpointError(f"{pointer} holds {name!r}, not a checkpoint name like step_000010")
    path = Path(root) / name
    if not path.is_dir():
        raise CheckpointError(f"{pointer} names {name}, but {path} does not exist")
    return path


def verify(path: str | Path) -> dict[str, Any]:
    """Check every file the manifest lists (presence, size, sha256); returns the manifest."""
    path = Path(path)
    manifest = read_json(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not isinstance(manifest.get("step"), int) or not all(
            isinstance(i, dict) and isinstance(i.get("bytes"), int) and isinstance(i.get("sha256"), str)
            for i in files.values()):
        raise CheckpointError(f"{path / MANIFEST} is not a checkpoint manifest (a step and, per file, its bytes and "
                              f"sha256): damaged or edited")
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file missing: {f}")
        if f.stat().st_size != info["bytes"]:
            raise CheckpointError(f"checkpoint file {f} has {f.stat().st_size} bytes, the manifest says "
                                  f"{info['bytes']}: truncated or replaced")
        if _sha256(f) != info["sha256"]:
            raise CheckpointError(f"checkpoint file {f} does not match its sha256 in {path / MANIFEST}: corrupt")
    return manifest


def load(path: str | Path) -> Checkpoint:
    """Open a checkpoint: a step directory, or a run root whose `latest` names one; verified in full."""
    path = Path(path)
    if not (path / MANIFEST).is_file() and not STEP_RE.match(path.name):
        latest = find_latest(path)
        if latest is None:
            raise CheckpointError(f"no checkpoint in {path}: {path / LATEST} is missing")
        path = latest
    manifest = verify(path)
    state = read_json(path / "learner_state.json")
    extra = read_json(path / "extra.json") if (path / "extra.json").is_file() else {}
    return Checkpoint(path=path, step=int(manifest["step"]), state=state, extra=extra)


# ---------------------------------------------------------------- RNG

def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": [version, list(internal), gauss],
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached": float(cached)},
            "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])


# ---------------------------------------------------------------- one learner rank

class RankLearner(Protocol):
    """What saving and restoring one rank reads and sets: learner.engine.DeepSpeedLearner is one."""

    rank: int
    world_size: int
    version: int
    cfg: Any  # a LearnerConfig: zero_stage is read
    engine: Any  # the DeepSpeed engine: global_steps, global_samples
    scheduler: Any

    def export_state(self, all_ranks: bool = False) -> dict[str, torch.Tensor] | None: ...

    def load_state(self, state: Mapping[str, torch.Tensor], source: str) -> None: ...

    def base_optimizer(self) -> torch.optim.Optimizer: ...


def step_counters(learner: RankLearner) -> dict[str, int]:
    """The policy version and DeepSpeed's own step counters, and the layout the optimizer files assume."""
    return {"version": learner.version, "global_steps": int(learner.engine.global_steps),
            "global_samples": int(learner.engine.global_samples), "world_size": learner.world_size,
            "zero_stage": learner.cfg.zero_stage}


def save_rank(learner: RankLearner, directory: str | Path, model_path: str) -> None:
    """This rank's files; rank 0 adds the weights, config/tokenizer, scheduler and counters."""
    from safetensors.torch import save_file

    d = Path(directory)
    rank = learner.rank
    weights = learner.export_state()  # collective under ZeRO-3: every rank enters
    base = learner.base_optimizer()
    master = [p.detach().clone() for g in base.param_groups for p in g["params"]]
    torch.save({"base": base.state_dict(), "master": master}, d / f"optimizer_rank{rank}.pt")
    torch.save(rng_state(), d / f"rng_rank{rank}.pt")
    if rank != 0:
        return
    assert weights is not None
    save_file({k: v.contiguous() for k, v in weights.items()}, str(d / "model.safetensors"),
              metadata={"format": "pt"})
    for f in Path(model_path).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(f, d / f.name)
    torch.save(learner.scheduler.state_dict(), d / "scheduler.pt")
    write_json(d / "learner_state.json", step_counters(learner))


def load_rank(learner: RankLearner, directory: str | Path) -> None:
    """Restore this rank from a checkpoint directory that `load()` has verified."""
    from safetensors.torch import load_file

    d = Path(directory)
    state = read_json(d / "learner_state.json")
    for key in ("world_size", "zero_stage"):
        mine = step_counters(learner)[key]
        if state.get(key) != mine:
            raise CheckpointError(f"{d / 'learner_state.json'}: saved with {key}={state.get(key)}, this learner "
                                  f"has {key}={mine}; optimizer partitions only resume with the same layout")
    try:
        weights = load_file(str(d / "model.safetensors"))
    except FileNotFoundError as e:
        raise CheckpointError(f"checkpoint file missing: {d / 'model.safetensors'}") from e
    except Exception as e:
        raise CheckpointError(f"checkpoint file {d / 'model.safetensors'} cannot be read: {e}") from e
    learner.load_state(weights, source=str(d / "model.safetensors"))
    opt_file = d / f"optimizer_rank{learner.rank}.pt"
    opt = torch_load(opt_file)
    base = learner.base_optimizer()
    params = [p for g in base.param_groups for p in g["params"]]
    if len(params) != len(opt["master"]) or any(p.shape != m.shape for p, m in zip(params, opt["master"])):
        raise CheckpointError(f"{opt_file}: master partition shapes {[tuple(m.shape) for m in opt['master']]} "
                              f"do not match this optimizer's {[tuple(p.shape) for p in params]}")
    base.load_state_dict(opt["base"])
    with torch.no_grad():
        for p, m in zip(params, opt["master"]):
            p.copy_(m)
    learner.scheduler.load_state_dict(torch_load(d / "scheduler.pt"))
    set_rng_state(torch_load(d / f"rng_rank{learner.rank}.pt"))
    learner.version = int(state["version"])
    learner.engine.global_steps = int(state["global_steps"])
    learner.engine.global_samples = int(state["global_samples"])
