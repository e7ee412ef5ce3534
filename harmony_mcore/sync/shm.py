"""The shm wire: weight buckets in /dev/shm files on one machine (CPU, and the one-machine GPU fallback).

Each stage sender (TP 0 of DP replica 0) writes a bucket into a /dev/shm file with one memcpy per tensor and
hands the engines a small description (`ShmBucket`, in a BucketPayload); every vLLM worker maps the same file
and reads zero-copy views straight into `reload_weights` (harmony_mcore.sync.worker_ext). Tensors never go
through pickling (vLLM's collective_rpc cannot carry them). Two slots: a bucket is written while the engines
load the previous one, and a slot is reused only once every engine has loaded the bucket it held.

vLLM-CPU engines with plain weights take direct writes into their parameters instead, after their first sync
(harmony_mcore.sync.cpu_direct: DirectTargets on this side, DirectPlacement on the engine's).

Limits: one machine (the engines must see the senders' /dev/shm); stage senders push on their own, in any order.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch

from harmony_mcore.sync.cpu_direct import DirectPlacement, DirectTargets
from harmony_mcore.sync.protocol import (
    SHM_ALIGN,
    SHM_DIR,
    BucketPayload,
    Engines,
    Group,
    GroupsFn,
    Receiver,
    RankLayout,
    TensorMeta,
    WeightSender,
    bucket_meta,
    buffer_bytes,
    pack_into,
    unpack,
)
from harmony_mcore.weights import hf_dir


@dataclass(frozen=True)
class ShmBucket:
    path: str
    entries: tuple[TensorMeta, ...]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def to_wire(self) -> tuple[str, list[list]]:
        return self.path, [e.to_wire() for e in self.entries]

    @classmethod
    def from_wire(cls, path: str, entries: list) -> ShmBucket:
        return cls(path, tuple(TensorMeta.from_wire(e) for e in entries))


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
        items = list(tensors.items())
        entries = bucket_meta(items, align=SHM_ALIGN)
        size = buffer_bytes(entries)
        slot = self._next
        self._next = (self._next + 1) % len(self._paths)
        flat = torch.frombuffer(self._mapping(slot, size), dtype=torch.uint8, count=size)  # (size,) shared
        pack_into(flat, items, entries)
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
    return iter(unpack(torch.frombuffer(mm, dtype=torch.uint8), bucket.entries))


class ShmSender(WeightSender):
    """Two ways into an engine, chosen per engine at every sync: direct writes (cpu_direct, engines that
    published a placement), then buckets in two /dev/shm slots for the others (`load_bucket`), and one
    `direct_written` call per direct engine with the names it received."""

    kind = "shm"
    slots = 2

    def __init__(self, layout: RankLayout, *, bucket_bytes: int):
        super().__init__(layout, bucket_bytes=bucket_bytes)
        self._writer: ShmBucketWriter | None = None
        self._direct = DirectTargets()

    def push(self, groups_fn: GroupsFn, engines: Engines, bucket_bytes: int | None = None) -> dict[str, float]:
        start = time.perf_counter()
        groups = self._stage_groups(groups_fn)
        if groups is None:
            return self._idle_stats(start)
        direct = self._direct.refresh(engines)
        bucketed = [i for i in range(len(engines)) if i not in direct]
        names: list[str] = []
        sent = 0

        def written(groups):  # every group goes straight into the direct engines first
            nonlocal sent
            for group in groups:
                if not group:
                    continue
                for name, tensor in group:
                    for target in direct.values():
                        target.write(name, tensor)
                    names.append(name)
                    sent += tensor.nbytes
                yield group

        if bucketed:
            self._push_buckets(written(groups), engines, bucketed, bucket_bytes or self.bucket_bytes)
        else:
            for _ in written(groups):
                pass
        engines.wait(engines.submit("direct_written", names, to=list(direct)))
        return {"sync_bytes": float(sent), "sync_s": time.perf_counter() - start}

    def _push_buckets(self, groups: Iterable[Group], engines: Engines, to: Sequence[int], max_bytes: int) -> None:
        if self._writer is None:
            self._writer = ShmBucketWriter(f"pp{self.layout.pp_rank}", slots=self.slots)
        in_flight: list[list] = []
        for bucket in hf_dir.buckets(groups, max_bytes):
            if len(in_flight) == self.slots:  # the slot about to be reused must have been consumed
                engines.wait(in_flight.pop(0))
            written = self._writer.write(bucket)
            payload = BucketPayload(self.kind, tuple(written.names), written.to_wire())
            in_flight.append(engines.submit("load_bucket", payload, to=to))
        for pending in in_flight:
            engines.wait(pending)

    def close(self) -> None:
        self._direct.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class ShmReceiver(Receiver):
    """Engine side: every worker maps each bucket (`harmony_load_shm_bucket`). direct: the DirectPlacement of a
    vLLM-CPU engine with plain weights (harmony_mcore.sync.cpu_direct), None for every other engine."""

    kind = "shm"

    def __init__(self, direct: DirectPlacement | None = None):
        self.direct = direct

    def _load(self, llm, payload: BucketPayload) -> None:
        llm.collective_rpc("harmony_load_shm_bucket", args=tuple(payload.data))

    def begin(self, llm) -> None:
        if self.direct is not None:
            self.direct.begin(llm)

    def finish(self, llm, version: int | None, complete: bool = True) -> None:
        if self.direct is not None and complete:
            self.direct.finish(llm)

    def direct_target(self, known_token: str | None) -> dict | None:
        """Where a sender may write each HF weight straight into this engine's parameters (cpu_direct)."""
        return None if self.direct is None else self.direct.target(known_token)

    def close(self, llm) -> None:
        if self.direct is not None:
            self.direct.close(llm)


def init_infos(*, endpoints: Sequence[dict], num_engines: int, engine_tp: int) -> list[None]:
    """Nothing to connect."""
    return [None] * num_engines
