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

SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path("/tmp")
_ALIGN = 64  # byte alignment of each tensor inside the bucket


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
            offset += -(-nbytes // _ALIGN) * _ALIGN
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
