"""In-place weight updates for a running vLLM engine: the receiving end of learner.weight_sync.

vLLM runs model code in a worker that the rollout actor reaches only through `llm.collective_rpc`.
`WeightReceiverExtension` is mixed into that worker (vLLM's `worker_extension_cls`) and adds three
methods: load a safetensors blob, join the side gloo group of the collective transport, and receive one
broadcast. All of them load through the worker's `reload_weights` with an in-memory iterator of
(name, tensor): plain `model.load_weights` is wrong on CPU, where vLLM repacks weights into kernel
layouts after loading, and `reload_weights` redoes that processing.

Arguments cross `collective_rpc` untyped: a multi-process engine's serialiser would turn tensors into
nested lists, so only buffers (the blob), ints, strings and plain lists/dicts of them are sent.

Two ways to load (`rollout.weight_load`):
- `repack` (the default): vLLM's `reload_weights`. On CPU every linear layer's weight is repacked into a
  oneDNN kernel layout after each load; that repacking, not the copy, is most of a sync's time.
- `in_place`: once, at start-up, every linear layer gets its plain weight back (the kernel layout is
  dropped: matmuls go through torch's `F.linear`), and each update is the model's own `load_weights`,
  which copies every tensor into the existing parameters through vLLM's weight loaders (the path of
  vLLM's RLHF examples): about one memory copy's worth of time, at the price of slower matmuls in
  generation where they dominate (larger models). On GPU nothing is repacked and the switch is a no-op.

The module functions `load_blob`, `init_group`, `receive_broadcast` and `set_weight_load` are what
`actors.rollout.call` calls. The bytes on the wire (the safetensors blob, the flat buckets, the gloo group) are
rvpo_async.weight_format's, which the learner writes with.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

import torch

from rvpo_async.weight_format import dtype_from_name, new_gloo_group, read_safetensors, unflatten


def tied_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Modules whose parameter is another module's (a tied lm_head): the checkpoint has no entry of their
    own, so a reload skips them, yet on CPU they hold kernels packed from the old weight."""
    owner: dict[int, str] = {}
    tied: dict[str, torch.nn.Module] = {}
    for mod_name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) in owner and owner[id(p)] != mod_name:
                tied[mod_name] = mod
            owner.setdefault(id(p), mod_name)
    return list(tied.values())


WEIGHT_LOAD_MODES = ("repack", "in_place")


def keep_plain_weights(model: torch.nn.Module, reload: Any) -> int:
    """Give every CPU-dispatched linear layer a plain weight parameter and route its matmul through
    `F.linear`, then fill the weights by `reload()` (an iterator of (name, tensor) of the checkpoint).
    Returns the number of layers switched; 0 where nothing was repacked (GPU)."""
    import torch.nn.functional as F
    from vllm.model_executor.utils import set_weight_attrs

    n = 0
    for mod in model.modules():
        if not hasattr(mod, "cpu_linear"):
            continue
        w = mod.weight
        if w.numel() == 0:  # the kernel layout replaced it: a plain parameter the v1 loader can fill
            shape = (int(mod.output_size_per_partition), int(mod.input_size_per_partition))
            plain = torch.nn.Parameter(torch.empty(shape, dtype=w.dtype, device=w.device), requires_grad=False)
            set_weight_attrs(plain, {"weight_loader": mod.weight_loader, "output_dim": 0, "input_dim": 1})
            mod.weight = plain
        mod.cpu_linear = F.linear
        n += 1
    if n:
        with torch.no_grad():
            model.load_weights(reload())  # type: ignore[operator]
    return n


class WeightReceiverExtension:
    """Methods mixed into vLLM's worker; `self` is the worker (it has `reload_weights`)."""

    def rvpo_set_weight_load(self, mode: str) -> int:
        if mode not in WEIGHT_LOAD_MODES:
            raise ValueError(f"weight load mode {mode!r}: expected one of {WEIGHT_LOAD_MODES}")
        self._rvpo_in_place = mode == "in_place"
        if not self._rvpo_in_place:
            return 0
        from vllm.model_executor.model_loader import get_model_loader

        cfg = self.model_runner.vllm_config  # type: ignore[attr-defined]
        model = self.model_runner.get_model()  # type: ignore[attr-defined]
        return keep_plain_weights(
            model, lambda: get_model_loader(cfg.load_config).get_all_weights(cfg.model_config, model))

    def _rvpo_reload(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        if getattr(self, "_rvpo_in_place", False):
            with torch.no_grad():
                self.model_runner.get_model().load_weights(iter(named))  # type: ignore[attr-defined]
            return
        self.reload_weights(weights_iterator=iter(named))  # type: ignore[attr-defined]
        # a tied layer keeps the kernel packed from its old weight: rebuild it from the new shared one
        for mod in tied_modules(self.model_runner.get_model()):  # type: ignore[attr-defined]
            method = getattr(mod, "quant_method", None)
            if method is not None:
                method.process_weights_after_loading(mod)

    def rvpo_load_blob(self, blob: Any) -> int:
        named = read_safetensors(blob)
        self._rvpo_reload(named)
        return len(named)

    def rvpo_init_group(self, addr: str, port: int, world_size: int, rank: int) -> None:
        self._rvpo_group = new_gloo_group(addr, port, world_size, rank)

    def rvpo_receive_broadcast(self, meta: list[dict[str, Any]]) -> int:
        """Receive every bucket broadcast by rank 0 of the side group, then load them all at once."""
        group = getattr(self, "_rvpo_group", None)
        if group is None:
            raise RuntimeError("receive_broadcast called before init_group: this engine is not in the weight group")
        named: list[tuple[str, torch.Tensor]] = []
        for bucket in meta:
            flat = torch.empty(int(bucket["numel"]), dtype=dtype_from_name(str(bucket["dtype"])))
            group.broadcast(flat, 0).wait()
            named.extend(unflatten(flat, bucket["tensors"]))
        self._rvpo_reload(named)
        return len(named)


def load_blob(llm: Any, blob: Any) -> int:
    """Load a safetensors blob (bytes or a uint8 array) of the model's weights into `llm`; returns the
    number of tensors loaded. An in-process engine gets the buffer itself; a multi-process one gets bytes,
    the one buffer type its RPC serialiser carries intact."""
    in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
    payload = blob if in_process or isinstance(blob, bytes) else bytes(memoryview(blob).cast("B"))
    return int(llm.collective_rpc("rvpo_load_blob", args=(payload,))[0])


def set_weight_load(llm: Any, mode: str) -> int:
    """Choose how later updates load (`repack` or `in_place`, see the module docstring); returns the
    number of linear layers switched to plain weights."""
    return int(llm.collective_rpc("rvpo_set_weight_load", args=(str(mode),))[0])


def init_group(llm: Any, addr: str, port: int, world_size: int, rank: int) -> None:
    """Join the side gloo group (rank >= 1) that learner rank 0 broadcasts weights over."""
    llm.collective_rpc("rvpo_init_group", args=(str(addr), int(port), int(world_size), int(rank)))


def receive_broadcast(llm: Any, meta: list[dict[str, Any]]) -> int:
    """Take part in one broadcast of flat buckets described by `meta`; returns tensors loaded."""
    return int(llm.collective_rpc("rvpo_receive_broadcast", args=(meta,))[0])
