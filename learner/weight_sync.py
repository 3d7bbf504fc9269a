"""Versioned weight broadcast from the learner to every rollout engine, by one of two transports.

- `ObjectStoreSync`: rank 0 serialises the full state to ONE safetensors blob, returned once into Ray's
  object store; every engine's `update_weights(version, ref)` pulls it and loads it. Works across nodes
  with nothing to set up; the latest blob is kept so a restarted engine catches up without a re-export.
- `CollectiveSync`: a side gloo group (a TCPStore + ProcessGroupGloo, outside DeepSpeed's world) of
  learner rank 0 and the engines; rank 0 broadcasts a few flat buckets (one per dtype, capped in size)
  and the engines receive into flat buffers. Flat buckets, not one call per tensor: per-call latency
  dominates for the many small tensors of a transformer.
Under ZeRO-3 every learner rank takes part in the export (the gather is collective); both transports do
that by calling all ranks. `sync` returns the seconds from the start of the export until every engine
serves the new version.
"""

from __future__ import annotations

import json
import math
import time
from typing import TYPE_CHECKING, Any, Mapping, Protocol, Sequence

import numpy as np
import ray
import torch

from actors.weight_receiver import SAFETENSORS_DTYPES, dtype_from_name

if TYPE_CHECKING:
    from learner.actor import LearnerGroup
    from rvpo_async.config import Config

DEFAULT_BUCKET_BYTES = 1 << 30


class WeightSync(Protocol):
    """Push the learner's weights to engines; each engine then reports `version` from get_version()."""

    def sync(self, learner: "LearnerGroup", engines: Sequence[Any], version: int, wait: bool = True) -> float:
        """Bring `engines` to `version`; wait=False may return before they have loaded it."""
        ...

    def catch_up(self, learner: "LearnerGroup", engine: Any, version: int) -> bool:
        """Bring one engine that is behind `version` (e.g. restarted) up to date; True if it was behind."""
        ...

    def landed(self) -> int | None:
        """The version of the last sync once every engine has loaded it (None while one is loading or before
        the first sync); admission control counts from it. May be called from another thread than sync's."""
        ...


def plan_buckets(specs: Sequence[tuple[str, torch.dtype, list[int]]], bucket_bytes: int) -> list[dict[str, Any]]:
    """Group tensors by dtype into flat buckets of at most `bucket_bytes` (a larger tensor gets its own).

    Each bucket: {"dtype": "float32", "numel": N, "tensors": [[name, dtype, shape, offset, numel], ...]}:
    plain lists and strings, so the meta crosses vLLM's untyped collective_rpc intact.
    """
    by_dtype: dict[torch.dtype, list[tuple[str, list[int]]]] = {}
    for name, dtype, shape in specs:
        by_dtype.setdefault(dtype, []).append((name, list(shape)))
    buckets: list[dict[str, Any]] = []
    for dtype, items in by_dtype.items():
        dname = str(dtype).removeprefix("torch.")
        itemsize = torch.empty((), dtype=dtype).element_size()
        cur: dict[str, Any] | None = None
        for name, shape in items:
            numel = math.prod(int(s) for s in shape)
            if cur is None or (cur["numel"] and (cur["numel"] + numel) * itemsize > bucket_bytes):
                cur = {"dtype": dname, "numel": 0, "tensors": []}
                buckets.append(cur)
            cur["tensors"].append([name, dname, shape, cur["numel"], numel])
            cur["numel"] += numel
    return buckets


def flatten_bucket(state: Mapping[str, torch.Tensor], bucket: dict[str, Any]) -> torch.Tensor:
    """One flat tensor holding the bucket's tensors at their offsets."""
    flat = torch.empty(int(bucket["numel"]), dtype=dtype_from_name(bucket["dtype"]))
    for name, _dtype, shape, offset, numel in bucket["tensors"]:
        t = state[name]
        if list(t.shape) != list(shape):
            raise ValueError(f"weight {name!r} has shape {list(t.shape)}, the bucket plan says {shape}")
        flat[offset:offset + numel].copy_(t.reshape(-1))
    return flat


def safetensors_array(state: Mapping[str, torch.Tensor]) -> np.ndarray:
    """The safetensors encoding of `state` as one uint8 array, written with one copy per tensor.

    safetensors' own `save` builds the bytes through several intermediate copies (about 4x slower here).
    Tensors go largest element size first, so every tensor starts aligned to its element size.
    """
    order = sorted(state, key=lambda k: (-state[k].element_size(), k))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in order:
        t = state[name]
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data section starts 8-byte aligned
    out = np.empty(8 + len(head) + offset, dtype=np.uint8)
    out[:8] = np.frombuffer(len(head).to_bytes(8, "little"), dtype=np.uint8)
    out[8:8 + len(head)] = np.frombuffer(head, dtype=np.uint8)
    data = torch.from_numpy(out)[8 + len(head):]
    for name in order:
        a, b = header[name]["data_offsets"]
        data[a:b].copy_(state[name].contiguous().reshape(-1).view(torch.uint8))
    return out


class ObjectStoreSync:
    """One safetensors blob through Ray's object store.

    With wait=False the learner does not wait for the engines to load it: an engine that is draining its
    responses (rollout.weight_update=drain) loads the blob once they are done, while the learner already
    trains the next step. An engine admits no new request from the moment the update reaches it until it is
    loaded, so requests submitted after the update get the new weights. The next sync first waits for the
    previous one (one update in flight per engine), and raises its error if an engine failed it."""

    def __init__(self) -> None:
        self._last: tuple[int, ray.ObjectRef] | None = None
        self._loading: tuple[int, list[ray.ObjectRef]] = (-1, [])  # the last update: version, engines' calls

    def wait(self) -> None:
        """Until the engines have loaded the last update; raises an engine's failure of it."""
        version, refs = self._loading
        self._loading = (version, [])
        ray.get(refs)

    def landed(self) -> int | None:
        """The version of the last update once every engine has loaded it, None while one is loading (may be
        called from another thread than sync's); raises an engine's failure of it."""
        version, refs = self._loading
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            if len(ready) < len(refs):
                return None
            ray.get(refs)
        return version

    def sync(self, learner: "LearnerGroup", engines: Sequence[Any], version: int, wait: bool = True) -> float:
        t0 = time.perf_counter()
        self.wait()
        ref = learner.export_blob()
        self._last = (int(version), ref)  # keeps the blob alive for catch_up; the previous one is freed
        self._loading = (int(version), [e.update_weights.remote(int(version), ref) for e in engines])
        if wait:
            self.wait()
        return time.perf_counter() - t0

    def catch_up(self, learner: "LearnerGroup", engine: Any, version: int) -> bool:
        if int(ray.get(engine.get_version.remote())) >= version:
            return False
        if self._last is not None and self._last[0] == version:
            ray.get(engine.update_weights.remote(int(version), self._last[1]))
        else:
            self.sync(learner, [engine], version)
        return True


class CollectiveSync:
    """Flat buckets broadcast over a gloo group of learner rank 0 (rank 0 there) and the engines.

    The group is (re)built whenever the set of engines changes or one of them no longer reports the
    version last broadcast (it restarted, and a restarted actor keeps its handle but not its place in the
    group): broadcasting to a group with a dead member would stall until the gloo timeout. Each build
    uses the next port from `port` (port, port+1, ...), so a new TCPStore never races an old one's socket.
    An engine that dies during a broadcast leaves learner rank 0 waiting in it until GROUP_TIMEOUT.
    """

    def __init__(self, port: int, addr: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 max_rebuilds: int = 64) -> None:
        self.port, self.addr, self.bucket_bytes, self.max_rebuilds = int(port), addr, int(bucket_bytes), max_rebuilds
        self._members: list[Any] = []
        self._members_version: int | None = None  # what every member served after the last broadcast
        self._builds = 0
        self._meta: list[dict[str, Any]] | None = None
        self._landed: int | None = None

    def landed(self) -> int | None:
        """Every sync waits for the broadcast to end, so the last one has landed once sync returns."""
        return self._landed

    def _ensure_group(self, learner: "LearnerGroup", engines: Sequence[Any]) -> None:
        if list(engines) == self._members:  # actor handles compare by actor id
            versions = ray.get([e.get_version.remote() for e in engines])
            if all(v == self._members_version for v in versions):
                return
        if self._builds >= self.max_rebuilds:
            raise RuntimeError(f"weight group rebuilt {self._builds} times (ports {self.port}.."
                               f"{self.port + self._builds - 1}); raise max_rebuilds or check engine restarts")
        addr = self.addr or learner.master_addr
        port = self.port + self._builds
        world = 1 + len(engines)
        refs = [learner.rank0.init_weight_group.remote(addr, port, world)]
        refs += [e.init_weight_group.remote(addr, port, world, i + 1) for i, e in enumerate(engines)]
        ray.get(refs)
        self._builds += 1
        self._members = list(engines)

    def _broadcast(self, learner: "LearnerGroup", engines: Sequence[Any], version: int) -> None:
        if self._meta is None:
            self._meta = ray.get(learner.rank0.weight_meta.remote(self.bucket_bytes))
        refs = [a.broadcast_weights.remote(self._meta) for a in learner.actors]
        refs += [e.receive_weights.remote(int(version), self._meta) for e in engines]
        ray.get(refs)

    def sync(self, learner: "LearnerGroup", engines: Sequence[Any], version: int, wait: bool = True) -> float:
        """Always waits: learner rank 0 and the engines take part in the broadcast together."""
        t0 = time.perf_counter()
        self._ensure_group(learner, engines)
        self._members_version = None
        self._broadcast(learner, engines, version)
        self._members_version = int(version)
        self._landed = max(int(version), self._landed or 0)
        return time.perf_counter() - t0

    def catch_up(self, learner: "LearnerGroup", engine: Any, version: int) -> bool:
        if int(ray.get(engine.get_version.remote())) >= version:
            return False
        self.sync(learner, [engine], version)
        return True


def make_weight_sync(cfg: "Config") -> WeightSync:
    """The transport `learner.sync_transport` names; the collective group listens from master_port + 1."""
    if cfg.learner.sync_transport == "collective":
        return CollectiveSync(port=cfg.learner.master_port + 1)
    return ObjectStoreSync()
