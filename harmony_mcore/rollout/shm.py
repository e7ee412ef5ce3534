"""Shared-memory weight buckets: the CPU transport of the weight sync (and the GPU fallback on one machine).

The sender packs a bucket of (HF name, tensor) into a file under /dev/shm with one memcpy per tensor and ships a
small `ShmBucket` description through Ray; the vLLM worker maps the same file and reads zero-copy views
(`torch.frombuffer`) straight into `reload_weights`. Tensors themselves never go through pickling (vLLM's
collective_rpc cannot carry them).
"""

from __future__ import annotations

import mmap
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from harmony_mcore.rollout.placement import Piece, covers_whole

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
_ALIGN = 64  # byte alignment of each tensor inside a bucket or an arena


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # torch dtype name, e.g. "float32"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class ShmBucket:
    path: str
    entries: tuple[TensorEntry, ...]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def to_wire(self) -> tuple[str, list[tuple]]:
        """Plain tuples: vLLM's RPC (msgspec) does not carry dataclasses."""
        return self.path, [(e.name, e.dtype, list(e.shape), e.offset, e.nbytes) for e in self.entries]

    @classmethod
    def from_wire(cls, path: str, entries: list) -> ShmBucket:
        return cls(path, tuple(TensorEntry(n, d, tuple(s), o, b) for n, d, s, o, b in entries))


class ShmBucketWriter:
    """Owns one /dev/shm file per slot, reused across buckets and steps. Each slot stays mapped between writes
    and is remapped only when a bucket outgrows it."""

    def __init__(self, tag: str, slots: int = 2):
        self._paths = [SHM_DIR / f"harmony-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}-{i}" for i in range(slots)]
        self._maps: list[mmap.mmap | None] = [None] * slots
        self._next = 0

    def _mapping(self, slot: int, nbytes: int) -> mmap.mmap:
        mm = self._maps[slot]
        if mm is None or len(mm) < nbytes:
            if mm is not None:
                mm.close()
            with open(self._paths[slot], "a+b") as f:
                f.truncate(nbytes)
                mm = self._maps[slot] = mmap.mmap(f.fileno(), nbytes)
        return mm

    def write(self, tensors: dict[str, torch.Tensor]) -> ShmBucket:
        entries, offset = [], 0
        for name, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            entries.append(TensorEntry(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, nbytes))
            offset += _aligned(nbytes)
        slot = self._next
        self._next = (self._next + 1) % len(self._paths)
        flat = torch.frombuffer(self._mapping(slot, offset), dtype=torch.uint8, count=offset)  # (offset,) shared
        for e, t in zip(entries, tensors.values()):
            flat[e.offset:e.offset + e.nbytes].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        del flat  # release the buffer export so the mapping can be closed or regrown
        return ShmBucket(str(self._paths[slot]), tuple(entries))

    def close(self) -> None:
        for slot, p in enumerate(self._paths):
            if self._maps[slot] is not None:
                self._maps[slot].close()
                self._maps[slot] = None
            p.unlink(missing_ok=True)


def read_bucket(bucket: ShmBucket) -> Iterator[tuple[str, torch.Tensor]]:
    """Zero-copy (name, tensor) views of a bucket.

    The mapping is never closed here: vLLM's layer-wise reload holds views until it finalises the layers, after
    this iterator is exhausted. Each view keeps the mapping alive; it is unmapped when the last view is freed.
    """
    with open(bucket.path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private mapping: writable views, no copy on read
    for e in bucket.entries:
        dtype = getattr(torch, e.dtype)
        count = e.nbytes // torch.empty((), dtype=dtype).element_size()
        yield e.name, torch.frombuffer(mm, dtype=dtype, count=count, offset=e.offset).view(e.shape)


# --- direct writes into an engine's parameters (rollout.cpu_weight_layout=plain) -------------------------------

ARENA_PREFIX = "harmony-engine"  # /dev/shm/harmony-engine-<pid>-<hex>: the parameters of one vLLM worker


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


def sweep_stale_arenas() -> list[Path]:
    """Unlink the parameter files of engine workers that no longer exist (a SIGKILLed worker cannot unlink its
    own). Files are named after the owning pid; those of live processes are left alone."""
    removed = []
    for path in SHM_DIR.glob(f"{ARENA_PREFIX}-*"):
        try:
            pid = int(path.name.removeprefix(f"{ARENA_PREFIX}-").split("-")[0])
        except ValueError:
            continue
        if pid != os.getpid() and not _alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


class ParamArena:
    """Engine side: a worker's parameters moved into one /dev/shm file, so a sender on the same machine can write
    new weights straight into them (harmony_mcore.rollout.placement says where each HF tensor goes).

    Each parameter's storage becomes a view of the file (`param.data = view`); the model computes on it as
    before. The file lives as long as the worker: `unlink()` at shutdown, `sweep_stale_arenas` after a crash.
    """

    def __init__(self, params: list[tuple[str, torch.Tensor]]):
        sweep_stale_arenas()
        self.path = SHM_DIR / f"{ARENA_PREFIX}-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        self.layout: dict[str, tuple[int, str, int]] = {}  # name -> (byte offset, dtype, numel)
        size = 0
        for name, p in params:
            if not p.is_contiguous():
                raise ValueError(f"ParamArena: parameter {name!r} is not contiguous")
            self.layout[name] = (size, str(p.dtype).removeprefix("torch."), p.numel())
            size += _aligned(max(p.numel() * p.element_size(), 1))
        self.size = size
        with open(self.path, "w+b") as f:
            f.truncate(size)
            self._mm = mmap.mmap(f.fileno(), size)
        for name, p in params:
            offset, _, numel = self.layout[name]
            if numel:
                view = torch.frombuffer(self._mm, dtype=p.dtype, count=numel, offset=offset).view(p.shape)
                view.copy_(p.data)
                p.data = view

    def to_wire(self) -> dict:
        return {"path": str(self.path), "size": self.size, "params": {k: list(v) for k, v in self.layout.items()}}

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
            for name in worker["names"]:
                self._plan.setdefault(name, [])
            for w in worker["pieces"]:
                piece = Piece.from_wire(w)
                offset, dtype, numel = worker["params"][piece.param]
                base = torch.frombuffer(mm, dtype=getattr(torch, dtype), count=numel, offset=offset)
                dst = base.as_strided(piece.shape, piece.dst_stride, piece.dst_offset)
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
