"""Versioned weight broadcast from the learner to every rollout engine, by one of two transports.

- `ObjectStoreSync`: rank 0 serialises the full state to ONE safetensors blob, returned once into Ray's
  object store; every engine's `update_weights(version, ref)` pulls it and loads it. Works across nodes
  with nothing to set up; the latest blob is kept so a restarted engine catches up without a re-export.
- `CollectiveSync`: a side gloo group (a TCPStore + ProcessGroupGloo, outside DeepSpeed's world) of
  learner rank 0 and the engines; rank 0 broadcasts a few flat buckets (one per dtype, capped in size)
  and the engines receive into flat buffers. Flat buckets, not one call per tensor: per-call latency
  dominates for the many small tensors of a transformer.
The blob and the buckets are written and read by rvpo_async.weight_format, on both sides.
Under ZeRO-3 every learner rank takes part in the export (the gather is collective); both transports do
that by calling all ranks. `sync` returns the seconds from the start of the export until every engine
serves the new version.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any, Sequence

import ray

from rvpo_async.interfaces import WeightSync  # noqa: F401 (the protocol both transports implement)

if TYPE_CHECKING:
    from learner.actor import LearnerGroup
    from rvpo_async.config import Config

DEFAULT_BUCKET_BYTES = 1 << 30


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
        self._sent = threading.Condition()  # notified when an update is sent (wait_landing)

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

    def wait_landing(self, after: int, timeout_s: float) -> None:
        """Block until an update newer than version `after` has landed on every engine, at most `timeout_s`
        (the rollout loop's wait: a landing is what lets it admit more). May be called from another thread."""
        end = time.monotonic() + timeout_s
        with self._sent:
            self._sent.wait_for(lambda: self._loading[0] > after, timeout_s)
            version, refs = self._loading
        if version > after and refs:
            ray.wait(refs, num_returns=len(refs), timeout=max(0.0, end - time.monotonic()))

    def sync(self, learner: "LearnerGroup", engines: Sequence[Any], version: int, wait: bool = True) -> float:
        t0 = time.perf_counter()
        self.wait()
        ref = learner.export_blob()
        self._last = (int(version), ref)  # keeps the blob alive for catch_up; the previous one is freed
        with self._sent:
            self._loading = (int(version), [e.update_weights.remote(int(version), ref) for e in engines])
            self._sent.notify_all()
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
    An engine that dies during a broadcast leaves learner rank 0 waiting in it until GROUP_TIMEOUT
    (rvpo_async.weight_format).
    """

    def __init__(self, port: int, addr: str | None = None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 max_rebuilds: int = 64) -> None:
        self.port, self.addr, self.bucket_bytes, self.max_rebuilds = int(port), addr, int(bucket_bytes), max_rebuilds
        self._members: list[Any] = []
        self._members_version: int | None = None  # what every member served after the last broadcast
        self._builds = 0
        self._meta: list[dict[str, Any]] | None = None
        self._landed: int | None = None
        self._sent = threading.Condition()  # notified when a broadcast ends (wait_landing)

    def landed(self) -> int | None:
        """Every sync waits for the broadcast to end, so the last one has landed once sync returns."""
        return self._landed

    def wait_landing(self, after: int, timeout_s: float) -> None:
        with self._sent:
            self._sent.wait_for(lambda: (self._landed if self._landed is not None else -1) > after, timeout_s)

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
        with self._sent:
            self._landed = max(int(version), self._landed or 0)
            self._sent.notify_all()
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
