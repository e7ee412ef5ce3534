"""What every wire shares: rank layout, tensor metadata and packing, the bucket payload, how senders call the
engines, and the sender / receiver base classes (the protocol itself: harmony_mcore.sync's docstring)."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

Group = list[tuple[str, torch.Tensor]]  # the HF tensors of one model parameter (q/k/v, gate/up: never split)
GroupsFn = Callable[[], Iterable[Group]]

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")  # shm buckets, cpu_direct arenas


def sweep_stale_shm() -> list[Path]:
    """Unlink our /dev/shm files whose owner process is gone (a killed process cannot unlink its own): every file
    is named harmony-<tag>-<owner pid>-... (shm bucket slots, cpu_direct parameter arenas). Files of live
    processes and of this one are left alone."""
    import os

    import psutil

    removed = []
    for path in SHM_DIR.glob("harmony-*-*-*"):
        pid = path.name.split("-")[2]
        if pid.isdigit() and int(pid) != os.getpid() and not psutil.pid_exists(int(pid)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
SHM_ALIGN = 64  # byte alignment of each tensor inside a /dev/shm file


class TransportError(RuntimeError):
    """A weight transport used outside what it supports (layout, kind, order of calls)."""


@dataclass(frozen=True)
class RankLayout:
    """This policy rank's coordinates. prev/next_stage_rank: global ranks of the same (tp, dp) position in
    pipeline stage pp_rank - 1 / + 1 (None at the ends); the NCCL stage senders pass their turn along them.
    device: where this rank's Megatron runs (harmony_mcore.runtime), so where its process-group tensors live."""

    rank: int = 0
    world: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    pp: int = 1
    dp_rank: int = 0
    prev_stage_rank: int | None = None
    next_stage_rank: int | None = None
    device: str = "cpu"

    @property
    def is_stage_sender(self) -> bool:
        """TP rank 0 of DP replica 0: it holds the stage's full tensors after the TP gather."""
        return self.tp_rank == 0 and self.dp_rank == 0

    @classmethod
    def from_megatron(cls, device: str = "cpu") -> RankLayout:
        from megatron.core import parallel_state as ps

        pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        return cls(
            rank=dist.get_rank(), world=dist.get_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=pp_rank, pp=pp, dp_rank=ps.get_data_parallel_rank(),
            prev_stage_rank=ps.get_pipeline_model_parallel_prev_rank() if pp_rank > 0 else None,
            next_stage_rank=ps.get_pipeline_model_parallel_next_rank() if pp_rank < pp - 1 else None,
            device=device,
        )


# --- tensors in a byte buffer ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorMeta:
    """Where one tensor sits in a byte buffer: a packed bucket, a /dev/shm bucket, an engine's parameter arena."""

    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    nbytes: int
    offset: int  # bytes from the buffer's start

    def to_wire(self) -> list:
        """Plain values: vLLM's RPC (msgspec) does not carry dataclasses."""
        return [self.name, self.dtype, list(self.shape), self.nbytes, self.offset]

    @classmethod
    def from_wire(cls, wire: Sequence) -> TensorMeta:
        name, dtype, shape, nbytes, offset = wire
        return cls(name, dtype, tuple(shape), int(nbytes), int(offset))


def bucket_meta(tensors: Sequence[tuple[str, torch.Tensor]], align: int = 1) -> list[TensorMeta]:
    """Metadata of the tensors laid out in one buffer, each starting at a multiple of `align` bytes. align=1 is
    vLLM's packed layout (back to back); there every tensor must start at a multiple of its element size
    (vLLM's unpack views each byte slice as its dtype), which holds when a bucket has one dtype: checked."""
    meta, offset = [], 0
    for name, t in tensors:
        if offset % t.element_size():
            raise TransportError(f"{name}: byte offset {offset} in its bucket is not a multiple of its "
                                 f"element size {t.element_size()} (mixed dtypes in one bucket)")
        meta.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), t.nbytes, offset))
        offset += -(-t.nbytes // align) * align
    return meta


def buffer_bytes(meta: Sequence[TensorMeta]) -> int:
    return max((m.offset + m.nbytes for m in meta), default=0)


def pack_into(out: torch.Tensor, tensors: Sequence[tuple[str, torch.Tensor]],
              meta: Sequence[TensorMeta] | None = None) -> int:
    """Copy the tensors into the uint8 buffer `out` where `meta` says (default: back to back); any devices,
    non-contiguous inputs are fine. Returns the bytes copied."""
    meta = bucket_meta(tensors) if meta is None else meta
    for (_, t), m in zip(tensors, meta):
        out[m.offset:m.offset + m.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
    return sum(m.nbytes for m in meta)


def unpack(buf: torch.Tensor, meta: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into a uint8 buffer: the inverse of pack_into, like vLLM's `unpack_tensor`."""
    return [(m.name, buf[m.offset:m.offset + m.nbytes].view(getattr(torch, m.dtype)).view(m.shape)) for m in meta]


@dataclass(frozen=True)
class BucketPayload:
    """One bucket for `RolloutEngine.load_bucket`. Plain data: Ray pickles it, and the engine forwards `data`
    through vLLM's msgspec RPC, so `data` holds only str/int/float/bool/list/dict/tuple.

    names: the HF names it carries (the engine's exactly-once check). data: shm -> ShmBucket.to_wire();
    cuda_ipc -> vLLM IPCWeightTransferUpdateInfo fields; nccl -> NCCLWeightTransferUpdateInfo fields + "stage".
    """

    kind: str
    names: tuple[str, ...]
    data: Any


# --- how a sender calls the engines ------------------------------------------------------------------------


class Engines(ABC):
    """The rollout engines as a sender sees them: RolloutEngine methods called by name. `call` starts one call
    and returns it pending; `wait` gives the results of pending calls in order (an engine's error raises)."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def call(self, index: int, method: str, *args) -> Any: ...

    @abstractmethod
    def wait(self, pending: Sequence) -> list: ...

    def submit(self, method: str, *args, to: Iterable[int] | None = None) -> list:
        """The same call on every engine (or on the engines numbered in `to`), all pending."""
        return [self.call(i, method, *args) for i in (range(len(self)) if to is None else to)]


class RayEngines(Engines):
    """RolloutEngine Ray actors (Policy.push_weights): the calls run concurrently; wait is ray.get."""

    def __init__(self, handles: Sequence):
        self.handles = list(handles)

    def __len__(self) -> int:
        return len(self.handles)

    def call(self, index: int, method: str, *args):
        return getattr(self.handles[index], method).remote(*args)

    def wait(self, pending: Sequence) -> list:
        import ray

        return ray.get(list(pending))


class LocalEngines(Engines):
    """Engine objects in this process (tests, in-process callers): a call runs at once. A method may return a
    concurrent.futures.Future instead (an engine served by another process); wait blocks on it."""

    def __init__(self, objects: Sequence):
        self.objects = list(objects)

    def __len__(self) -> int:
        return len(self.objects)

    def call(self, index: int, method: str, *args):
        return getattr(self.objects[index], method)(*args)

    def wait(self, pending: Sequence) -> list:
        return [p.result() if isinstance(p, Future) else p for p in pending]


# --- the two sides -----------------------------------------------------------------------------------------


class WeightSender(ABC):
    """The sending side of a wire: one per policy rank, reused across syncs."""

    kind: str

    def __init__(self, layout: RankLayout, *, bucket_bytes: int):
        self.layout = layout
        self.bucket_bytes = bucket_bytes

    def endpoint(self) -> dict | None:
        """NCCL rendezvous of a stage sender; None for the other ranks and kinds."""
        return None

    def connect(self, world_size: int) -> None:
        """Join the transfer group (NCCL stage senders); a no-op for the other ranks and kinds."""

    def disconnect(self) -> None:
        """Leave the transfer group, e.g. before reconnecting after an engine restart."""

    @abstractmethod
    def push(self, groups_fn: GroupsFn, engines: Engines, bucket_bytes: int | None = None) -> dict[str, float]:
        """Send this rank's part of the weights into every engine (inside the engines' weight update).

        Called on every policy rank at the same time. Returns {"sync_bytes", "sync_s"} on the ranks that took
        part, {} on the others.
        """

    def release(self) -> None:
        """Free what a finished update no longer needs (CUDA IPC: the last bucket); a no-op for the others."""

    def close(self) -> None:
        self.disconnect()

    def _stage_groups(self, groups_fn: GroupsFn):
        """The HF groups this rank sends (shm and NCCL: each stage's TP rank 0 of DP replica 0), or None: other
        TP ranks of replica 0 only take part in the TP gathers; other replicas do nothing."""
        if self.layout.dp_rank != 0:
            return None
        groups = groups_fn()
        if self.layout.is_stage_sender:
            return groups
        for _ in groups:  # the TP gathers
            pass
        return None

    def _idle_stats(self, start: float) -> dict[str, float]:
        """push's result on a rank that sent nothing: zero bytes in replica 0 (it joined the gathers), {} else."""
        return {} if self.layout.dp_rank != 0 else {"sync_bytes": 0.0, "sync_s": time.perf_counter() - start}


class Receiver(ABC):
    """The engine side of a wire, owned by the RolloutEngine actor (the process that holds the LLM). Built
    BEFORE the LLM (the GPU wires set up what vLLM's processes inherit). A sync is begin, load per bucket,
    finish; `complete` tells finish whether the engine counted every weight exactly once."""

    kind: str

    def llm_kwargs(self) -> dict:
        """Extra vllm.LLM arguments (the GPU wires' weight_transfer_config)."""
        return {}

    def connect(self, llm, init_info: dict | None) -> None:
        """Join the wire with this engine's `engine_init_infos` entry."""

    def disconnect(self, llm) -> None:
        """Leave the wire (before a reconnect)."""

    def begin(self, llm) -> None:
        """A sync starts."""

    def load(self, llm, payload: BucketPayload) -> int:
        """One bucket into the model; returns how many tensors it carried."""
        if payload.kind != self.kind:
            raise TransportError(f"a {payload.kind} bucket sent to an engine set up for {self.kind}")
        self._load(llm, payload)
        return len(payload.names)

    @abstractmethod
    def _load(self, llm, payload: BucketPayload) -> None: ...

    def finish(self, llm, version: int | None, complete: bool = True) -> None:
        """The sync ended (tag the engine's weight version)."""

    def close(self, llm) -> None:
        """The engine shuts down."""


class VllmSessionReceiver(Receiver):
    """The GPU wires' engine side: vLLM's own weight-transfer engine in every worker, driven through LLM's RL
    API (LLM(weight_transfer_config=...), init_weight_transfer_engine, start_weight_update, update_weights,
    finish_weight_update(weight_version), shutdown_weight_transfer_engine), which collective_rpc the workers.
    One vLLM update session per sync: begin -> initialize_layerwise_reload, each bucket -> receive_weights ->
    model.load_weights, finish -> finalize_layerwise_reload."""

    backend: str  # WeightTransferConfig.backend

    def __init__(self):
        self.connected = False
        self.in_update = False

    def llm_kwargs(self) -> dict:
        return {"weight_transfer_config": {"backend": self.backend}}

    def connect(self, llm, init_info: dict | None) -> None:
        if init_info is None:
            raise TransportError(f"{self.kind}: connect needs the init info (sync.engine_init_infos)")
        llm.init_weight_transfer_engine({"init_info": dict(init_info)})
        self.connected = True

    def disconnect(self, llm) -> None:
        if self.connected:
            llm.shutdown_weight_transfer_engine()
            self.connected = False

    def begin(self, llm) -> None:
        if not self.connected:
            raise TransportError(f"{self.kind}: weight update before connect_weights()")
        llm.start_weight_update()
        self.in_update = True

    def _load(self, llm, payload: BucketPayload) -> None:
        if not self.in_update:
            raise TransportError(f"{self.kind}: bucket outside begin()/finish()")
        try:
            llm.update_weights({"update_info": payload.data})
        except BaseException:
            self.in_update = False  # the worker ended its session on the failure
            raise

    def finish(self, llm, version: int | None, complete: bool = True) -> None:
        """Close the session, complete or not (IPC also releases the buffer mapping)."""
        if self.in_update:
            self.in_update = False
            llm.finish_weight_update(weight_version=None if version is None else str(version))
