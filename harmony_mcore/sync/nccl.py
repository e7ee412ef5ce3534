"""The nccl wire: disaggregated GPU engines (other GPUs, other nodes), packed NCCL broadcast per pipeline stage.

One group per pipeline stage s: {the stage s sender, rank 0} + every engine worker, where worker w of engine e is
rank 1 + e * engine_tp + w, and the world size is 1 + engines * engine_tp. Per bucket the sender asks every
engine to receive (`load_bucket`, metadata only), then broadcasts the packed bucket. Stages take turns (a token
from stage s to s + 1 over torch.distributed): two stages broadcasting at once can deadlock, since each engine
serves one RPC at a time and two engines may pick the stages in opposite orders.

Sender: vLLM's `nccl_common.trainer_init` (StatelessProcessGroup TCP rendezvous, then a PyNcclCommunicator on
the current CUDA device) and `packed_tensor.packed_nccl_broadcast_producer` (chunks of chunk_bytes over
num_buffers streams). Engine: vLLM's dense NCCL backend (`packed_nccl_broadcast_consumer`, same chunking, sent
in the init info), subclassed only to hold one communicator per stage: backend "harmony_nccl",
harmony_mcore.sync.nccl_vllm, registered with vLLM's WeightTransferEngineFactory by module path.

Limits: the engines must reach each stage sender on a TCP port (picked free on the sender's node) and by NCCL.
The groups are fixed at connect time (an engine restart reconnects everything). A peer that dies inside a
broadcast hangs the other side (vLLM's PyNccl has no timeout).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from harmony_mcore.sync.protocol import (
    BucketPayload,
    Engines,
    GroupsFn,
    RankLayout,
    TensorMeta,
    TransportError,
    VllmSessionReceiver,
    WeightSender,
    bucket_meta,
)
from harmony_mcore.weights import hf_dir

NCCL_BACKEND = "harmony_nccl"  # vLLM weight-transfer backend name of nccl_vllm.HarmonyNCCLWeightTransferEngine
NCCL_NUM_BUFFERS = 2  # packed broadcast double buffering (vLLM's default)


def nccl_update_info(meta: Sequence[TensorMeta], stage: int) -> dict:
    """Update info of HarmonyNCCLWeightTransferEngine: vLLM's NCCL fields + the stage (which group)."""
    return {"names": [m.name for m in meta], "dtype_names": [m.dtype for m in meta],
            "shapes": [list(m.shape) for m in meta], "stage": stage}


def nccl_world_size(num_engines: int, engine_tp: int) -> int:
    """Size of each stage's NCCL group: the stage sender + every engine worker."""
    return 1 + num_engines * engine_tp


def init_infos(*, endpoints: Sequence[dict], num_engines: int, engine_tp: int) -> list[dict]:
    """Every stage's rendezvous in stage order; engine e's workers at rank_offset + w with
    rank_offset = 1 + e * engine_tp (vLLM's worker_init_process_group adds the worker's rank w); world
    1 + engines * engine_tp; the stage senders' packed chunking."""
    by_stage = sorted(endpoints, key=lambda e: e["stage"])
    if not by_stage or [e["stage"] for e in by_stage] != list(range(len(by_stage))):
        raise TransportError(f"nccl: need one endpoint per pipeline stage 0..pp-1, got {list(endpoints)}")
    chunking = {(e["chunk_bytes"], e["num_buffers"]) for e in by_stage}
    if len(chunking) != 1:
        raise TransportError(f"nccl: the stage senders disagree on the packed chunking {chunking}")
    chunk_bytes, num_buffers = chunking.pop()
    world = nccl_world_size(num_engines, engine_tp)
    return [{"endpoints": [[e["host"], e["port"]] for e in by_stage], "rank_offset": 1 + i * engine_tp,
             "world_size": world, "packed": True, "packed_buffer_size_bytes": chunk_bytes,
             "packed_num_buffers": num_buffers} for i in range(num_engines)]


def _node_ip() -> str:
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class NcclSender(WeightSender):
    """Each stage sender is rank 0 of its stage's group (module docstring). group_factory / broadcaster stand
    in for the vLLM calls in CPU tests (the choreography runs on gloo)."""

    kind = "nccl"

    def __init__(self, layout: RankLayout, *, bucket_bytes: int, num_buffers: int = NCCL_NUM_BUFFERS,
                 group_factory: Callable[[str, int, int], Any] | None = None,
                 broadcaster: Callable[[Any, dict[str, torch.Tensor], int, int], None] | None = None):
        super().__init__(layout, bucket_bytes=bucket_bytes)
        self.chunk_bytes = bucket_bytes
        self.num_buffers = num_buffers
        self._group = None
        self._reserved: socket.socket | None = None
        self._address: tuple[str, int] | None = None
        self._group_factory = group_factory or _vllm_trainer_group
        self._broadcaster = broadcaster or _vllm_packed_broadcast

    def endpoint(self) -> dict | None:
        if not self.layout.is_stage_sender:
            return None
        if self._reserved is None:  # hold the port until connect() so that nothing else takes it
            self._reserved = socket.socket()
            self._reserved.bind(("", 0))
            self._address = (_node_ip(), self._reserved.getsockname()[1])
        host, port = self._address
        return {"stage": self.layout.pp_rank, "host": host, "port": port, "chunk_bytes": self.chunk_bytes,
                "num_buffers": self.num_buffers}

    def connect(self, world_size: int) -> None:
        if not self.layout.is_stage_sender:
            return
        if self._group is not None:
            raise TransportError("nccl: already connected (disconnect() first)")
        if self._address is None:
            raise TransportError("nccl: connect() before endpoint() (the engines need the address first)")
        host, port = self._address
        self._reserved.close()  # vLLM's TCPStore binds the port now (SO_REUSEADDR)
        self._reserved, self._address = None, None
        self._group = self._group_factory(host, port, world_size)

    def disconnect(self) -> None:
        if self._group is not None and hasattr(self._group, "destroy"):
            self._group.destroy()
        self._group = None
        if self._reserved is not None:
            self._reserved.close()
        self._reserved, self._address = None, None

    def push(self, groups_fn: GroupsFn, engines: Engines, bucket_bytes: int | None = None) -> dict[str, float]:
        start = time.perf_counter()
        groups = self._stage_groups(groups_fn)
        if groups is None:
            return self._idle_stats(start)
        if self._group is None:
            raise TransportError("nccl: push() before connect() (Cluster.connect_weights at launch)")
        self._wait_turn()
        stage, sent, previous = self.layout.pp_rank, 0, []
        for bucket in hf_dir.buckets((g for g in groups if g), bucket_bytes or self.bucket_bytes):
            meta = bucket_meta(list(bucket.items()))
            engines.wait(previous)  # the previous bucket is loaded: engine errors surface before the next NCCL call
            payload = BucketPayload(self.kind, tuple(bucket), nccl_update_info(meta, stage))
            previous = engines.submit("load_bucket", payload)
            self._broadcaster(self._group, bucket, self.chunk_bytes, self.num_buffers)
            sent += sum(m.nbytes for m in meta)
        engines.wait(previous)
        self._pass_turn()
        return {"sync_bytes": float(sent), "sync_s": time.perf_counter() - start}

    # Stage s sends only after stage s - 1 has finished (the module docstring says which deadlock it avoids).

    def _token(self) -> torch.Tensor:
        on_gpu = self.layout.device == "cuda"
        return torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")

    def _wait_turn(self) -> None:
        if self.layout.prev_stage_rank is None:
            return
        token = self._token()
        dist.recv(token, src=self.layout.prev_stage_rank)
        if token.is_cuda:
            torch.cuda.current_stream().synchronize()  # hold the CPU: the engine RPCs must follow the token

    def _pass_turn(self) -> None:
        if self.layout.next_stage_rank is not None:
            dist.send(self._token(), dst=self.layout.next_stage_rank)


def _vllm_trainer_group(host: str, port: int, world_size: int):
    """Rank 0 of a trainer <-> workers NCCL group, vLLM's way (TCPStore rendezvous at host:port)."""
    from vllm.distributed.weight_transfer.nccl_common import trainer_init

    return trainer_init({"master_address": host, "master_port": port, "world_size": world_size}, rank=0)


def _vllm_packed_broadcast(group, bucket: dict[str, torch.Tensor], chunk_bytes: int, num_buffers: int):
    from vllm.distributed.weight_transfer.packed_tensor import packed_nccl_broadcast_producer

    torch.cuda.current_stream().synchronize()  # gathered on this stream; the producer packs on its own
    packed_nccl_broadcast_producer(iterator=iter(bucket.items()), group=group, src=0,
                                   post_iter_func=lambda item: item[1], buffer_size_bytes=chunk_bytes,
                                   num_buffers=num_buffers)


def register_vllm_backends() -> None:
    """Register "harmony_nccl" with vLLM's WeightTransferEngineFactory (idempotent; vLLM imports
    harmony_mcore.sync.nccl_vllm when it first creates the engine).

    It must run in every process that creates a worker's weight-transfer engine: the engine actor
    (NcclReceiver) and the vLLM workers (harmony_mcore.sync.worker_ext calls it; vLLM imports the worker
    extension before it loads the model and creates the engine).
    """
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(NCCL_BACKEND, "harmony_mcore.sync.nccl_vllm",
                                                    "HarmonyNCCLWeightTransferEngine")
    except ValueError:  # "already registered": this process did it before
        pass


class NcclReceiver(VllmSessionReceiver):
    """Engine side: every worker joins every stage's group at connect (which blocks until the stage senders
    connect too: call both sides concurrently). Registers the "harmony_nccl" backend: build it before the
    LLM."""

    kind = "nccl"
    backend = NCCL_BACKEND

    def __init__(self):
        super().__init__()
        register_vllm_backends()
