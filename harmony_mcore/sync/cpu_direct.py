"""Direct writes into a vLLM-CPU engine's parameters: CPU development only (`rollout.cpu_weight_layout=plain`).

What it buys: on the CPU box, vLLM-CPU repacks every linear layer for oneDNN after each bucket of a sync, which
costs about 12x a memory copy of the weights (tools/bench_weight_sync.py, a ~100M-parameter Qwen3 in fp32).
With plain weights the engine's parameters live in /dev/shm and the trainer copies each HF tensor straight into
them: 1.8x a memory copy, no staging bucket, one RPC per sync (docs/weight_sync.md). The price:
torch GEMMs instead of oneDNN's, which generated 1.1-1.3x slower. GPU engines never come here (their weights
live on the GPU: sync.cuda_ipc, sync.nccl).

How, in three places:

* engine start (RolloutEngine): `set_plain_cpu_gemm` before the LLM makes vLLM keep plain weights, and the
  workers' `harmony_use_plain_cpu_gemm` points the LM head at its live weight.
* the engine's first complete sync (DirectPlacement, in the engine's ShmReceiver) goes through the model's own
  `load_weights` in shm buckets while `CopyRecorder` notes every `copy_` from an HF tensor into a parameter as a
  `Piece`:

      param[dst_offset + sum(i_k * dst_stride_k)] = hf[src_offset + sum(i_k * src_stride_k)]   for i in shape

  (element offsets and strides; HF tensors are contiguous in the bucket, so src strides refer to that layout).
  The layout knowledge (q/k/v fused into qkv_proj, gate/up into gate_up_proj, vocabulary padding, TP shards)
  stays vLLM's. Anything else a loader does with HF data (a cast, arithmetic, a copy into a non-parameter)
  makes the recording `unsupported`, and that engine stays on buckets: the recorder never guesses. Then the
  workers move their parameters into /dev/shm files (`ParamArena`) and hand out the placement.
* every later sync (ShmSender, through DirectTargets): the sender maps those files once per engine
  incarnation and writes each HF tensor into the parameters (`DirectTarget`), then reports the names
  (`direct_written`) for the engine's exactly-once check. A direct write changes the weights in place, so it
  must not overlap a generate call (the trainer syncs between steps; an engine serves one call at a time).
"""

from __future__ import annotations

import logging
import mmap
import os
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harmony_mcore.sync.protocol import (
    SHM_ALIGN,
    SHM_DIR,
    Engines,
    TensorMeta,
    bucket_meta,
    buffer_bytes,
    sweep_stale_shm,
    unpack,
)

logger = logging.getLogger(__name__)

PLAIN_CPU_GEMM_ENV = "HARMONY_VLLM_PLAIN_CPU_GEMM"  # "1": vLLM-CPU linear layers keep plain weights
ARENA_PREFIX = "harmony-engine"  # /dev/shm/harmony-engine-<pid>-<hex>: the parameters of one vLLM worker


def set_plain_cpu_gemm(plain: bool) -> None:
    """Whether vLLM linear layers loaded from now on, in this process and in the vLLM processes it starts, keep
    plain weights: skip the CPU GEMM prepack when their weights are processed after loading
    (UnquantizedLinearMethod.process_weights_after_loading reads `_cpu_skip_gemm_dispatch` off the layer), the
    fallback vLLM itself uses for layers it does not pack. Spawned processes learn it from the environment when
    vLLM imports harmony_mcore.sync.worker_ext; forked ones inherit it."""
    from vllm.model_executor.layers.linear import LinearBase

    if plain:
        os.environ[PLAIN_CPU_GEMM_ENV] = "1"
        LinearBase._cpu_skip_gemm_dispatch = True
    else:
        os.environ.pop(PLAIN_CPU_GEMM_ENV, None)
        if "_cpu_skip_gemm_dispatch" in LinearBase.__dict__:
            del LinearBase._cpu_skip_gemm_dispatch


# --- where each HF weight lands, learnt from vLLM's loaders ------------------------------------------------


@dataclass(frozen=True)
class Piece:
    """One strided copy of (part of) HF tensor `hf_name` into parameter `param`."""

    hf_name: str
    param: str
    dst_offset: int  # elements from the parameter's first element
    src_offset: int  # elements from the HF tensor's first element
    shape: tuple[int, ...]
    dst_stride: tuple[int, ...]
    src_stride: tuple[int, ...]

    def to_wire(self) -> tuple:
        return (self.hf_name, self.param, self.dst_offset, self.src_offset, list(self.shape),
                list(self.dst_stride), list(self.src_stride))

    @classmethod
    def from_wire(cls, w: Sequence) -> Piece:
        name, param, dst, src, shape, dst_stride, src_stride = w
        return cls(name, param, int(dst), int(src), tuple(shape), tuple(dst_stride), tuple(src_stride))


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def covers_whole(piece: Piece, hf_shape: Sequence[int]) -> bool:
    """Whether the piece reads the entire contiguous HF tensor (the usual case on an unsharded engine)."""
    return (piece.src_offset == 0 and piece.shape == tuple(hf_shape)
            and piece.src_stride == contiguous_strides(hf_shape))


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses a tensor view touches."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Ranges:
    """Named, non-overlapping byte ranges: which tensor a view's memory belongs to."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]):
        self._items = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, name, t) for name, t in named if t.numel())

    def find(self, view: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        lo, hi = _span(view)
        for start, end, name, t in self._items:
            if start <= lo < end:
                if hi > end:
                    raise ValueError(f"a view reaches past the end of {name!r}")
                return name, t
        return None

    def overlaps(self, view: torch.Tensor) -> str | None:
        lo, hi = _span(view)
        for start, end, name, _ in self._items:
            if lo < end and start < hi:
                return name
        return None


class CopyRecorder(TorchDispatchMode):
    """Records how `model.load_weights(sources)` places HF tensors into parameters (run it around that call).

    sources: the HF (name, tensor) pairs being loaded (contiguous, alive for the whole call); params: the model's
    parameters (`named_parameters()`, tied duplicates removed). After the call, `pieces` holds what was placed and
    `unsupported` the first reason the placement cannot be replayed as plain copies (None if it can). `names`
    lists every source, placed or not (a loader may skip one, e.g. the LM head of tied embeddings).
    """

    def __init__(self, sources: Sequence[tuple[str, torch.Tensor]], params: Sequence[tuple[str, torch.Tensor]]):
        super().__init__()
        for name, t in sources:
            if not t.is_contiguous():
                raise ValueError(f"CopyRecorder: source {name!r} must be contiguous")
        self.names = [name for name, _ in sources]
        self._sources = _Ranges(sources)
        self._params = _Ranges(params)
        self.pieces: list[Piece] = []
        self.unsupported: str | None = None

    def _fail(self, reason: str) -> None:
        if self.unsupported is None:
            self.unsupported = reason

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            self._copy(args[0], args[1])
        elif not func.is_view:
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, torch.Tensor) and (name := self._sources.overlaps(arg)) is not None:
                    self._fail(f"the loader applies {func} to {name!r} (only views and copies are replayed)")
        return func(*args, **kwargs)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not isinstance(src, torch.Tensor):
            return
        found = self._sources.find(src)
        if found is None:
            if (name := self._sources.overlaps(src)) is not None:
                self._fail(f"a copy reads {name!r} through an unrecognised view")
            return
        hf_name, hf = found
        target = self._params.find(dst)
        if target is None:
            self._fail(f"the loader copies {hf_name!r} into a tensor that is not a parameter")
            return
        param_name, param = target
        if dst.dtype != src.dtype or dst.shape != src.shape:
            self._fail(f"{hf_name!r} -> {param_name!r} converts {src.dtype}{tuple(src.shape)} to "
                       f"{dst.dtype}{tuple(dst.shape)}")
            return
        size = src.element_size()
        self.pieces.append(Piece(hf_name, param_name, (dst.data_ptr() - param.data_ptr()) // size,
                                 (src.data_ptr() - hf.data_ptr()) // size, tuple(src.shape),
                                 tuple(dst.stride()), tuple(src.stride())))


# --- the engine's parameters in /dev/shm -------------------------------------------------------------------


class ParamArena:
    """Worker side: the worker's parameters moved into one /dev/shm file, so a sender on the same machine can
    write new weights straight into them. Each parameter's storage becomes a view of the file
    (`param.data = view`); the model computes on it as before. The file lives as long as the worker:
    `unlink()` at shutdown, `protocol.sweep_stale_shm` after a crash."""

    def __init__(self, params: Sequence[tuple[str, torch.Tensor]]):
        sweep_stale_shm()
        for name, p in params:
            if not p.is_contiguous():
                raise ValueError(f"ParamArena: parameter {name!r} is not contiguous")
        self.path = SHM_DIR / f"{ARENA_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.meta = bucket_meta([(name, p.data) for name, p in params], align=SHM_ALIGN)
        self.size = max(buffer_bytes(self.meta), 1)
        with open(self.path, "w+b") as f:
            f.truncate(self.size)
            self._mm = mmap.mmap(f.fileno(), self.size)
        views = unpack(torch.frombuffer(self._mm, dtype=torch.uint8), self.meta)
        for (_, p), (_, view) in zip(params, views):
            if p.numel():
                view.copy_(p.data)
                p.data = view

    def to_wire(self) -> dict:
        return {"path": str(self.path), "size": self.size, "params": [m.to_wire() for m in self.meta]}

    def unlink(self) -> None:
        """Remove the file name (the memory stays mapped for as long as the worker and senders use it)."""
        self.path.unlink(missing_ok=True)


class DirectTarget:
    """Sender side: one engine's parameter files mapped once, and a strided destination view per placement
    piece; `write(name, tensor)` copies an HF tensor straight into the engine's parameters.

    wire: what RolloutEngine.direct_target returns, {"token", "workers": [ParamArena.to_wire() + {"pieces",
    "names"}]}, one entry per vLLM worker (TP rank) of the engine.
    """

    def __init__(self, wire: dict):
        self.token = wire["token"]
        self._maps: list[mmap.mmap] = []
        self._plan: dict[str, list[tuple[torch.Tensor, Piece]]] = {}
        for worker in wire["workers"]:
            with open(worker["path"], "r+b") as f:
                mm = mmap.mmap(f.fileno(), worker["size"])
            self._maps.append(mm)
            meta = [TensorMeta.from_wire(w) for w in worker["params"]]
            params = dict(unpack(torch.frombuffer(mm, dtype=torch.uint8), meta))
            for name in worker["names"]:
                self._plan.setdefault(name, [])
            for w in worker["pieces"]:
                piece = Piece.from_wire(w)
                param = params[piece.param]
                dst = param.as_strided(piece.shape, piece.dst_stride, param.storage_offset() + piece.dst_offset)
                self._plan[piece.hf_name].append((dst, piece))

    def write(self, name: str, tensor: torch.Tensor) -> None:
        plan = self._plan.get(name)
        if plan is None:
            raise KeyError(f"{name!r}: the engine's recorded placement has no such weight")
        flat = None
        for dst, piece in plan:
            if covers_whole(piece, tensor.shape):
                dst.copy_(tensor.detach())
            else:  # a slice of the tensor (a TP shard of the engine)
                flat = tensor.detach().contiguous() if flat is None else flat
                dst.copy_(flat.as_strided(piece.shape, piece.src_stride, flat.storage_offset() + piece.src_offset))

    def close(self) -> None:
        self._plan = {}  # drop the views first: a mapping with live exports cannot close
        for mm in self._maps:
            try:
                mm.close()
            except BufferError:  # a view is still referenced somewhere; the mapping goes with it
                pass
        self._maps = []


# --- the worker, the engine and the sender -----------------------------------------------------------------


class PlainWeightsWorker:
    """The vLLM worker's part (mixed into harmony_mcore.sync.worker_ext.WeightReceiver)."""

    _harmony_plain = False  # set by harmony_use_plain_cpu_gemm
    _harmony_arena = None  # ParamArena once the placement is known
    _harmony_wire: dict | None = None  # the arena and placement, as harmony_direct_target hands them out
    _harmony_recorders: list | None = None  # one CopyRecorder per bucket of the sync being recorded

    def harmony_use_plain_cpu_gemm(self) -> int:
        """Point every CPU GEMM of the model at its live weight (torch `F.linear`); returns how many.

        Linear layers were loaded that way already (set_plain_cpu_gemm). Embedding-method layers (the LM head)
        got a oneDNN handle over a packed copy of their weight, which a sync would leave stale; they switch to
        the weight itself. Fails, naming a layer, if vLLM packed a linear layer anyway (its weight was dropped).
        """
        switched = 0
        for name, module in self.model_runner.get_model().named_modules():
            if not hasattr(module, "cpu_linear"):
                continue
            weight = getattr(module, "weight", None)
            if weight is None or weight.numel() == 0:
                raise RuntimeError(
                    f"rollout.cpu_weight_layout=plain: vLLM packed the weights of {name!r} and dropped the "
                    f"originals ({PLAIN_CPU_GEMM_ENV} was not set when this worker imported "
                    "harmony_mcore.sync.worker_ext)")
            module.cpu_linear = torch.nn.functional.linear
            switched += 1
        self._harmony_plain = True
        return switched

    def _harmony_load_plain(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """A bucket through the model's own loaders; watched while the placement is being learnt."""
        model = self.model_runner.get_model()
        if self._harmony_recorders is None:
            model.load_weights(weights)
            return
        sources = list(weights)
        recorder = CopyRecorder(sources, list(model.named_parameters()))
        with torch.no_grad(), recorder:
            model.load_weights(iter(sources))
        self._harmony_recorders.append(recorder)

    def harmony_record_placement(self) -> None:
        """Watch the loaders during this sync's buckets (before the arena exists)."""
        self._harmony_recorders = []

    def harmony_direct_target(self) -> dict:
        """After a complete recorded sync: move the parameters into a ParamArena and return where each HF weight
        goes (DirectTarget's wire), or {"unsupported": reason}."""
        if self._harmony_arena is None:
            recorders, self._harmony_recorders = self._harmony_recorders, None
            if recorders is None:
                return {"unsupported": "no recorded sync"}
            reason = next((r.unsupported for r in recorders if r.unsupported), None)
            if reason:
                return {"unsupported": reason}
            self._harmony_arena = ParamArena(list(self.model_runner.get_model().named_parameters()))
            self._harmony_wire = {**self._harmony_arena.to_wire(),
                                  "pieces": [p.to_wire() for r in recorders for p in r.pieces],
                                  "names": sorted(n for r in recorders for n in r.names)}
        return self._harmony_wire

    def harmony_release_arena(self) -> None:
        if self._harmony_arena is not None:
            self._harmony_arena.unlink()


class DirectPlacement:
    """The engine's part (held by its shm.ShmReceiver): the first complete sync is recorded, then the workers'
    parameters move into arenas and `target` tells the senders where to write."""

    def __init__(self):
        self.wire: dict | None = None  # {"token", "workers"}: DirectTarget's wire
        self.unsupported: str | None = None

    def _learning(self) -> bool:
        return self.wire is None and self.unsupported is None

    def begin(self, llm) -> None:
        if self._learning():
            llm.collective_rpc("harmony_record_placement")

    def finish(self, llm) -> None:
        """After a complete sync (which went through the recorded loaders while learning)."""
        if not self._learning():
            return
        workers = llm.collective_rpc("harmony_direct_target")
        reasons = [w["unsupported"] for w in workers if "unsupported" in w]
        if reasons:
            self.unsupported = reasons[0]
            logger.warning("weight sync stays on shm buckets: %s", reasons[0])
        else:
            self.wire = {"token": uuid.uuid4().hex, "workers": workers}

    def target(self, known_token: str | None) -> dict | None:
        """None (not known yet, or not possible), {"token"} when the caller's copy is current, else the wire."""
        if self.wire is None:
            return None
        return {"token": known_token} if known_token == self.wire["token"] else self.wire

    def close(self, llm) -> None:
        """Unlink the workers' parameter files."""
        if self.wire is not None:
            llm.collective_rpc("harmony_release_arena")
            self.wire = None


class DirectTargets:
    """The sender's part (held by shm.ShmSender): each engine's DirectTarget, mapped once per engine incarnation
    and mapped anew when the engine's token changes (a restarted engine)."""

    def __init__(self):
        self._targets: dict[int, DirectTarget] = {}

    def refresh(self, engines: Engines) -> dict[int, DirectTarget]:
        """One `direct_target` call per engine; the targets of the engines that take direct writes, by index."""
        known = [self._targets[i].token if i in self._targets else None for i in range(len(engines))]
        replies = engines.wait([engines.call(i, "direct_target", token) for i, token in enumerate(known)])
        for i, reply in enumerate(replies):
            current = self._targets.get(i)
            if current is not None and (reply is None or reply["token"] != current.token):
                self._targets.pop(i).close()
                current = None
            if reply is not None and current is None:
                self._targets[i] = DirectTarget(reply)
        return {i: self._targets[i] for i in range(len(engines)) if i in self._targets}

    def close(self) -> None:
        for target in self._targets.values():
            target.close()
        self._targets = {}
