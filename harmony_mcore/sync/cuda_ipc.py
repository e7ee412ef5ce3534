"""The cuda_ipc wire: colocated GPU engines, received by vLLM's own "ipc" weight-transfer backend (packed mode).

A CUDA IPC handle opens only on its own GPU, and the engine worker on GPU g needs every tensor of every stage,
so every policy rank (colocated: one per GPU) holds each bucket in its own GPU buffer:

For each pipeline stage s in order, all ranks step together, one step per parameter of stage s:
    stage s, DP 0:  the next parameter (TP gather); the stage sender (TP 0) feeds it to a BucketPlanner
    all ranks:      (done, meta, error) = broadcast_object(header, src=stage s sender)
    bucket closed:  broadcast of the packed bucket into every rank's buffer; each rank exports its buffer
                    (once per buffer: all_gather_object of {GPU uuid: handle}); rank 0 calls
                    engine.load_bucket(payload) on every engine, waits, and broadcasts its status, the
                    barrier before any buffer is refilled (an engine error reaches every rank).
The one small header broadcast per parameter keeps the TP gathers of the sending stage and the world
collectives in the same order on every rank (no deadlock between communicators). On the engine, vLLM's
`packed_ipc_consumer` clones each bucket out of its GPU's buffer into load_weights; its PackedBufferImporter
releases the old mapping when the handle changes and at finish, as with vLLM's own packed_ipc_producer.

Limits: the engine workers must sit on GPUs that host a policy rank. During a sync each GPU holds one buffer of
max(bucket_bytes, largest bucket) bytes, and the engine a clone of one bucket; `release()` frees it after the
update. The handles travel pickled (`ipc_handles_pickled`), so the engine processes run with
VLLM_ALLOW_INSECURE_SERIALIZATION=1 (set by IpcReceiver): trusted clusters only. The allocator must support
CUDA IPC (no `expandable_segments` on old torch).
"""

from __future__ import annotations

import base64
import os
import pickle
import time
from collections.abc import Sequence

import torch
import torch.distributed as dist

from harmony_mcore.sync.protocol import (
    BucketPayload,
    Engines,
    Group,
    GroupsFn,
    RankLayout,
    TensorMeta,
    TransportError,
    VllmSessionReceiver,
    WeightSender,
    bucket_meta,
    pack_into,
)
from harmony_mcore.weights.hf_dir import BucketPlanner


def ipc_update_info(meta: Sequence[TensorMeta], handles_pickled: str) -> dict:
    """vLLM `IPCWeightTransferUpdateInfo` fields of one packed bucket (packed=True at the init handshake)."""
    return {"names": [m.name for m in meta], "dtype_names": [m.dtype for m in meta],
            "shapes": [list(m.shape) for m in meta], "tensor_sizes": [m.nbytes for m in meta],
            "ipc_handles_pickled": handles_pickled}


def encode_ipc_handles(handles: dict[str, tuple]) -> str:
    """{GPU uuid: reduce_tensor args} as vLLM's `ipc_handles_pickled` (standard base64 of a pickle)."""
    return base64.b64encode(pickle.dumps(handles)).decode("ascii")


def decode_ipc_handles(text: str) -> dict[str, tuple]:
    return pickle.loads(base64.b64decode(text))


class _CudaExporter:
    """This GPU's side of CUDA IPC: physical uuid, `reduce_tensor` export, stream sync, ipc_collect."""

    def __init__(self):
        index = torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        self.uuid = str(torch.cuda.get_device_properties(index).uuid)

    def export(self, buf: torch.Tensor) -> tuple:
        from torch.multiprocessing.reductions import reduce_tensor

        return reduce_tensor(buf)[1]  # rebuild_cuda_tensor args (the engine puts its device index in args[6])

    def ready(self, view: torch.Tensor, meta: Sequence[TensorMeta]) -> None:
        torch.cuda.current_stream().synchronize()  # the bytes are in place before another process reads them

    def collect(self) -> None:
        torch.cuda.ipc_collect()  # free the buffers of earlier syncs that the engines have released


class CudaIpcSender(WeightSender):
    """Every policy rank's end (module docstring). The buffer is allocated per sync and replaced, with a new
    export, for a larger bucket. exporter stands in for the CUDA pieces in CPU tests (the choreography runs on
    gloo)."""

    kind = "cuda_ipc"

    def __init__(self, layout: RankLayout, *, bucket_bytes: int, exporter=None):
        super().__init__(layout, bucket_bytes=bucket_bytes)
        self._exporter = exporter
        self._stage_src: list[int] | None = None
        self._buf: torch.Tensor | None = None
        self._handles = ""

    def _bcast_obj(self, obj, src: int):
        if self.layout.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def _stage_sources(self) -> list[int]:
        """Global rank of each stage's sender (TP 0, DP 0), from every rank's coordinates."""
        me = (self.layout.pp_rank, self.layout.dp_rank, self.layout.tp_rank)
        coords = [me]
        if self.layout.world > 1:
            coords = [None] * self.layout.world
            dist.all_gather_object(coords, me)
        src = {pp: rank for rank, (pp, dp, tp) in enumerate(coords) if dp == 0 and tp == 0}
        if sorted(src) != list(range(self.layout.pp)):
            raise TransportError(f"cuda_ipc: no single sender per pipeline stage in {coords}")
        return [src[s] for s in range(self.layout.pp)]

    def push(self, groups_fn: GroupsFn, engines: Engines, bucket_bytes: int | None = None) -> dict[str, float]:
        start = time.perf_counter()
        if self._exporter is None:
            self._exporter = _CudaExporter()
        if self._stage_src is None:
            self._stage_src = self._stage_sources()
        self._exporter.collect()
        max_bytes = bucket_bytes or self.bucket_bytes
        sent = 0
        try:
            for stage, src in enumerate(self._stage_src):
                sent += self._push_stage(stage, src, groups_fn, engines, max_bytes)
        finally:
            self._buf = None  # its block stays mapped by the engines until they finish; release() collects it
        return {"sync_bytes": float(sent), "sync_s": time.perf_counter() - start}

    def _push_stage(self, stage: int, src: int, groups_fn: GroupsFn, engines: Engines, max_bytes: int) -> int:
        """Every rank: the buckets of one pipeline stage, one header per parameter. A failure on the sender
        travels in the header and an engine's in rank 0's status, so no rank is left inside a collective."""
        mine = self.layout.pp_rank == stage and self.layout.dp_rank == 0
        steps = iter(groups_fn()) if mine else None
        planner = BucketPlanner(max_bytes) if self.layout.rank == src else None
        sent = 0
        while True:
            header, ready = None, None
            if planner is not None:
                try:
                    group = next(steps, None)
                    ready = planner.add(group)
                    header = (group is None, bucket_meta(ready) if ready else None, None)
                except Exception as exc:  # noqa: BLE001 - every rank raises it below
                    header = (True, None, f"stage {stage} sender (rank {src}): {exc!r}")
            elif steps is not None:
                next(steps, None)  # this parameter's TP gather, in step with the sender
            done, meta, error = self._bcast_obj(header, src)
            if error:
                raise TransportError(f"cuda_ipc weight push failed: {error}")
            if meta:
                sent += self._exchange(meta, ready, src, engines, max_bytes)
            if done:
                return sent

    def _exchange(self, meta: list[TensorMeta], tensors: Group | None, src: int, engines: Engines,
                  max_bytes: int) -> int:
        total = sum(m.nbytes for m in meta)
        if self._buf is None or self._buf.numel() < total:  # the same decision on every rank (same meta)
            device = getattr(self._exporter, "device", torch.device("cpu"))
            self._buf = torch.empty(max(total, max_bytes), dtype=torch.uint8, device=device)
            mine = {self._exporter.uuid: self._exporter.export(self._buf)}
            merged = mine
            if self.layout.world > 1:
                every = [None] * self.layout.world
                dist.all_gather_object(every, mine)
                merged = {uuid: args for handles in every for uuid, args in handles.items()}
            self._handles = encode_ipc_handles(merged)
        view = self._buf[:total]
        if self.layout.rank == src:
            pack_into(view, tensors, meta)
        if self.layout.world > 1:
            dist.broadcast(view, src=src)
        self._exporter.ready(view, meta)
        status, failure = None, None
        if self.layout.rank == 0 and len(engines):
            payload = BucketPayload(self.kind, tuple(m.name for m in meta), ipc_update_info(meta, self._handles))
            try:
                engines.wait(engines.submit("load_bucket", payload))
            except Exception as exc:  # noqa: BLE001 - re-raised below, once the other ranks know
                status, failure = f"engine load_bucket: {exc!r}", exc
        # Rank 0's status doubles as the barrier: no rank refills its buffer before every engine has read it.
        status = self._bcast_obj(status, 0)
        if failure is not None:
            raise failure
        if status:
            raise TransportError(f"cuda_ipc weight push failed: {status}")
        return total if self.layout.rank == src else 0

    def release(self) -> None:
        """After the engines finished the update (and closed their mappings): free the last bucket now, not at
        the next push."""
        self._buf = None
        if self._exporter is not None:
            self._exporter.collect()

    def close(self) -> None:
        self._buf = None


class IpcReceiver(VllmSessionReceiver):
    """Engine side: vLLM's "ipc" backend in packed mode. Sets VLLM_ALLOW_INSECURE_SERIALIZATION=1 on
    construction, which the engine-core and worker processes inherit (vLLM decodes `ipc_handles_pickled` only
    then): build it before the LLM."""

    kind = "cuda_ipc"
    backend = "ipc"

    def __init__(self):
        super().__init__()
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


def init_infos(*, endpoints: Sequence[dict], num_engines: int, engine_tp: int) -> list[dict]:
    """vLLM's IPCWeightTransferInitInfo: packed mode."""
    return [{"packed": True} for _ in range(num_engines)]
