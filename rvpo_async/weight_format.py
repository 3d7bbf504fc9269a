"""The weight wire format shared by the learner (learner.weight_sync, learner.actor) and the rollout
engines (actors.rollout.weight_receiver): one module, so both sides agree on every byte.

- A safetensors blob of the full state: `safetensors_array` writes it (one uint8 array, one copy per
  tensor), `read_safetensors` reads one (its own or the reference library's) into views without copying.
  `SAFETENSORS_DTYPES` is the dtype table of both.
- Flat buckets for a broadcast: `plan_buckets` groups tensors by dtype into buckets of capped size,
  `flatten_bucket` packs one, `unflatten` views a received one as its named tensors; `dtype_from_name`
  reads a bucket's dtype back.
- `new_gloo_group`: the side gloo group the collective transport broadcasts over.

Pure: torch and numpy only (torch.distributed is imported when a group is made), so it imports inside a
vLLM worker process as well as in a learner rank.
"""

from __future__ import annotations

import json
import math
import warnings
from datetime import timedelta
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

GROUP_TIMEOUT = timedelta(minutes=5)

SAFETENSORS_DTYPES: dict[torch.dtype, str] = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# ---------------------------------------------------------------- safetensors blobs
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


def read_safetensors(blob: Any) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) views into a safetensors blob (bytes or a uint8 array), without copying the data.

    The views may be read-only (a blob straight from Ray's object store): they are only read, once, by
    the weight loader, which copies them into the model.
    """
    buf = memoryview(blob).cast("B")
    n = int.from_bytes(buf[:8], "little")
    try:
        header = json.loads(bytes(buf[8:8 + n]))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"weights blob of {len(buf)} bytes is not safetensors: bad header ({e})") from e
    header.pop("__metadata__", None)
    data = torch.empty(0, dtype=torch.uint8)
    if len(buf) > 8 + n:
        with warnings.catch_warnings():  # torch warns that a read-only buffer gives a non-writable tensor
            warnings.simplefilter("ignore", UserWarning)
            data = torch.frombuffer(buf, dtype=torch.uint8, offset=8 + n)
    out = []
    for name, info in header.items():
        a, b = info["data_offsets"]
        dtype = _FROM_SAFETENSORS.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"weights blob: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        out.append((name, data[a:b].view(dtype).view(info["shape"])))
    return out


# ---------------------------------------------------------------- flat buckets
def dtype_from_name(name: str) -> torch.dtype:
    """'float32' -> torch.float32; a name torch lacks is refused, naming it."""
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown tensor dtype {name!r} in a weight-sync bucket")
    return dt


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


def unflatten(flat: torch.Tensor, metas: Sequence[Sequence[Any]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views of `flat` as the named tensors its meta list describes (no copies)."""
    for name, _dtype, shape, offset, numel in metas:
        yield str(name), flat[int(offset):int(offset) + int(numel)].view([int(s) for s in shape])


# ---------------------------------------------------------------- the side group
def new_gloo_group(addr: str, port: int, world_size: int, rank: int) -> Any:
    """A gloo process group of its own, outside torch.distributed's default world.

    Learner rank 0 is rank 0 here (it hosts the TCPStore); engines take ranks 1..N. Being separate from
    the default group is what lets DeepSpeed's world and this one coexist in the learner process.
    """
    from torch.distributed import ProcessGroupGloo, TCPStore

    store = TCPStore(addr, int(port), int(world_size), is_master=(int(rank) == 0), timeout=GROUP_TIMEOUT,
                     wait_for_workers=False)
    opts = ProcessGroupGloo._Options()
    opts._timeout = GROUP_TIMEOUT
    # on one machine bind to loopback; across machines each member picks its own interface
    local = addr == "localhost" or addr.startswith("127.")
    opts._devices = [ProcessGroupGloo.create_device(hostname=addr) if local
                     else ProcessGroupGloo.create_default_device()]
    return ProcessGroupGloo(store, int(rank), int(world_size), opts)
