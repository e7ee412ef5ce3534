"""Weight transports of the per-step sync (policy ranks -> vLLM engines): one interface, three wires.

Kinds (`rollout.transport`, resolved by `resolve_kind`):

    shm       /dev/shm files (harmony_mcore.rollout.shm): CPU, and the one-machine GPU fallback. vLLM-CPU
              engines with plain weights get each HF tensor copied straight into their parameters (which live
              in /dev/shm; placement recorded from vLLM's loaders on the engine's first sync); other engines
              get buckets that their workers map into `load_weights` / `reload_weights` (ShmSender).
    cuda_ipc  colocated GPU engines. Received by vLLM's own "ipc" weight-transfer backend in packed mode: one
              CUDA IPC buffer per GPU, `packed_ipc_consumer` clones each bucket out of it into load_weights.
    nccl      disaggregated GPU engines (other GPUs, other nodes). Received by vLLM's own dense NCCL backend
              (`packed_nccl_broadcast_consumer`), subclassed only to hold one communicator per pipeline stage
              (backend "harmony_nccl", `HarmonyNCCLWeightTransferEngine` below).

Sender side: one object per policy rank (`make_sender`), the same calls whatever the kind:

    endpoint()           NCCL rendezvous {"stage", "host", "port", ...} of a stage sender; None elsewhere
    connect(world_size)  NCCL stage senders: open the stage's group as its rank 0 (concurrently with the
                         engines' connect); a no-op otherwise
    push(groups_fn, engines, bucket_bytes) -> {"sync_bytes", "sync_s"} | {}
                         on EVERY policy rank at every sync, inside the engines' begin/finish_weight_update
    disconnect(), close()

`groups_fn()` gives this stage's weights as `iter_hf_groups(..., lockstep=True)` does: one item per model parameter on every
TP rank, the HF (name, full tensor) pairs on TP rank 0 and [] on the others (they only join the TP gather).
Buckets are cut exactly like `hf_dir.buckets` (`BucketPlanner`), never splitting a group (q/k/v, gate/up), so
vLLM's layer-wise reload always receives whole layers.

Engine side: `EngineReceiver`, owned by the RolloutEngine actor (the process that holds the LLM):

    llm_kwargs()          LLM(weight_transfer_config={"backend": "ipc" | "harmony_nccl"}) for the GPU kinds
    connect(llm, info)    llm.init_weight_transfer_engine: IPC the packed flag, NCCL the stage groups
    begin(llm)            llm.start_weight_update()  -> initialize_layerwise_reload, once per sync
    load(llm, payload)    llm.update_weights(...)    -> worker receive_weights -> model.load_weights
    finish(llm, version)  llm.finish_weight_update(weight_version=str(version)) -> finalize_layerwise_reload

Why not vLLM's trainer side (`IPCTrainerWeightTransferEngine`, `NCCLTrainerWeightTransferEngine`) as it is: it
assumes ONE sender that iterates the whole model (rank 0 of an FSDP or Megatron-Bridge export, which
materialises every tensor on every rank) and it opens and closes a vLLM update session per `send_weights`.
Here each pipeline stage streams only its own layers (full tensors on its TP rank 0), several stages feed one
session that the engine opens in begin_weight_update, and IPC needs a copy on every GPU. So the trainer side
below drives vLLM's wire protocol itself, with vLLM's pieces: `reduce_tensor` handles in the packed
`IPCWeightTransferUpdateInfo` layout, `nccl_common.trainer_init` for the rendezvous, and
`packed_nccl_broadcast_producer` for the data. Everything on the receiving side is vLLM's code.

Choreographies:

* shm: every stage sender (TP 0 of DP replica 0) on its own: direct writes into the engines that published a
  placement, then one `direct_written` RPC; two buckets in flight (two /dev/shm slots) for the others.
* nccl: one group per pipeline stage s: {the stage s sender, rank 0} + every engine worker, where worker w of
  engine e is rank 1 + e * engine_tp + w, and the world size is 1 + engines * engine_tp. Per bucket the sender
  asks every engine to receive (`load_bucket`, metadata only), then broadcasts the packed bucket. Stages take
  turns (a token from stage s to s + 1 over torch.distributed): two stages broadcasting at once can deadlock,
  since each engine serves one RPC at a time and two engines may pick the stages in opposite orders.
* cuda_ipc: a CUDA IPC handle opens only on its own GPU and the engine worker on GPU g needs every tensor of
  every stage, so each bucket is first broadcast from its stage's sender to every policy rank (the
  torch.distributed world; colocated means one policy rank per GPU). Every rank exports its buffer once
  (`reduce_tensor`), the handles are all-gathered into {GPU uuid: handle}, global rank 0 hands them to every
  engine (each worker picks its own GPU's handle) and broadcasts its status, after which the buffers may be
  refilled. All ranks step together, with one small header broadcast per parameter, so the TP gathers of the
  sending stage and the world collectives interleave in the same order on every rank (no deadlock between
  communicators).

Limits and assumptions:

* cuda_ipc: engine workers must sit on GPUs that host a policy rank (colocated placement). During a sync each
  GPU holds one buffer of max(bucket_bytes, largest bucket) bytes, and the engine a clone of one bucket. The
  handles travel pickled (`ipc_handles_pickled`), so the engine processes run with
  VLLM_ALLOW_INSECURE_SERIALIZATION=1 (set by EngineReceiver): trusted clusters only. The allocator must
  support CUDA IPC (no `expandable_segments` on old torch).
* nccl: the engines must reach each stage sender on a TCP port (picked free on the sender's node) and by NCCL.
  The groups are fixed at connect time (an engine restart reconnects everything). A peer that dies inside a
  broadcast hangs the other side (vLLM's PyNccl has no timeout).
* Tensors are packed back to back inside a bucket (vLLM's packed layout), so each one's byte offset must be a
  multiple of its element size; that holds when a bucket has one dtype (checked, else TransportError).
* shm: one machine (the engines must see the senders' /dev/shm). A direct write changes an engine's weights in
  place, so it must not overlap a generate call (the trainer syncs between steps; RolloutEngine serves one call
  at a time).

vLLM, Ray, Megatron and CUDA-only code are imported lazily: this module imports on a CPU-only machine.
"""

from __future__ import annotations

import base64
import os
import pickle
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from harmony_mcore.weights import hf_dir

KINDS = ("shm", "cuda_ipc", "nccl")
NCCL_BACKEND = "harmony_nccl"  # vLLM weight-transfer backend name of HarmonyNCCLWeightTransferEngine
VLLM_BACKENDS = {"cuda_ipc": "ipc", "nccl": NCCL_BACKEND}  # rollout.transport -> WeightTransferConfig.backend
NCCL_NUM_BUFFERS = 2  # packed broadcast double buffering (vLLM's default)

Group = list[tuple[str, torch.Tensor]]
GroupsFn = Callable[[], Iterable[Group]]


class TransportError(RuntimeError):
    """A weight transport used outside what it supports (layout, kind, order of calls)."""


def resolve_kind(requested: str, *, on_gpu: bool, placement: str) -> str:
    """`rollout.transport` -> the wire to use. auto: cuda_ipc when colocated on GPU, nccl when disaggregated
    on GPU, shm on CPU. cuda_ipc and nccl need CUDA; cuda_ipc needs the engines on the policy's GPUs."""
    if requested == "auto":
        if not on_gpu:
            return "shm"
        return "cuda_ipc" if placement == "colocated" else "nccl"
    if requested not in KINDS:
        raise TransportError(f"rollout.transport={requested!r}: expected auto, {', '.join(KINDS)}")
    if requested != "shm" and not on_gpu:
        raise TransportError(f"rollout.transport={requested}: needs GPUs (use shm or auto on CPU)")
    if requested == "cuda_ipc" and placement != "colocated":
        raise TransportError("rollout.transport=cuda_ipc: a CUDA IPC handle opens only on its own GPU; "
                             "disaggregated engines use nccl")
    if requested == "nccl" and placement == "colocated":
        raise TransportError("rollout.transport=nccl: NCCL cannot put two ranks on one GPU; colocated "
                             "engines use cuda_ipc")
    return requested


# --- where this rank sits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankLayout:
    """This policy rank's coordinates. prev/next_stage_rank: global ranks of the same (tp, dp) position in
    pipeline stage pp_rank - 1 / + 1 (None at the ends); the NCCL stage senders pass their turn along them."""

    rank: int = 0
    world: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    pp: int = 1
    dp_rank: int = 0
    prev_stage_rank: int | None = None
    next_stage_rank: int | None = None

    @property
    def is_stage_sender(self) -> bool:
        """TP rank 0 of DP replica 0: it holds the stage's full tensors after the TP gather."""
        return self.tp_rank == 0 and self.dp_rank == 0

    @classmethod
    def from_megatron(cls) -> RankLayout:
        from megatron.core import parallel_state as ps

        pp_rank, pp = ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size()
        return cls(
            rank=dist.get_rank(), world=dist.get_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
            pp_rank=pp_rank, pp=pp, dp_rank=ps.get_data_parallel_rank(),
            prev_stage_rank=ps.get_pipeline_model_parallel_prev_rank() if pp_rank > 0 else None,
            next_stage_rank=ps.get_pipeline_model_parallel_next_rank() if pp_rank < pp - 1 else None,
        )


class BucketPlanner:
    """`hf_dir.buckets` as a push-style state machine (the IPC sender decides step by step when to flush).

    add(group) returns the bucket to send now (a list of (name, tensor)) or None; add(None) ends the stream
    and returns the last bucket. A bucket closes when the next group would take it over max_bytes; a group is
    never split (a larger group gets a bucket of its own).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._pending: Group = []
        self._size = 0

    def add(self, group: Group | None) -> Group | None:
        if group is None:
            out, self._pending, self._size = self._pending, [], 0
            return out or None
        nbytes = sum(_nbytes(t) for _, t in group)
        if self._pending and self._size + nbytes > self.max_bytes:
            out, self._pending, self._size = self._pending, list(group), nbytes
            return out
        self._pending.extend(group)
        self._size += nbytes
        return None


# --- packing (vLLM's packed layout: the tensors' bytes back to back) ---------------------------------------


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name, e.g. "bfloat16"
    shape: tuple[int, ...]
    nbytes: int


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucket_meta(tensors: Sequence[tuple[str, torch.Tensor]]) -> list[TensorMeta]:
    """Metadata of a packed bucket. Checks that every tensor starts at a multiple of its element size (vLLM's
    unpack views each byte slice as its dtype, which needs that alignment)."""
    meta, offset = [], 0
    for name, t in tensors:
        if offset % t.element_size():
            raise TransportError(f"{name}: byte offset {offset} in its bucket is not a multiple of its "
                                 f"element size {t.element_size()} (mixed dtypes in one bucket)")
        meta.append(TensorMeta(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), _nbytes(t)))
        offset += _nbytes(t)
    return meta


def pack_into(out: torch.Tensor, tensors: Sequence[tuple[str, torch.Tensor]]) -> int:
    """Copy the tensors back to back into the uint8 buffer `out` (any devices; non-contiguous inputs are
    fine). Returns the bytes written."""
    offset = 0
    for _, t in tensors:
        flat = t.detach().contiguous().reshape(-1).view(torch.uint8)
        out[offset:offset + flat.numel()].copy_(flat)
        offset += flat.numel()
    return offset


def unpack(buf: torch.Tensor, meta: Sequence[TensorMeta]) -> list[tuple[str, torch.Tensor]]:
    """Views into a packed uint8 buffer: the inverse of pack_into, like vLLM's `unpack_tensor`."""
    out, offset = [], 0
    for m in meta:
        piece = buf[offset:offset + m.nbytes]
        out.append((m.name, piece.view(getattr(torch, m.dtype)).view(m.shape)))
        offset += m.nbytes
    return out


# --- what travels to the engine ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BucketPayload:
    """One bucket for `RolloutEngine.load_bucket`. Plain data: Ray pickles it, and the engine forwards `data`
    through vLLM's msgspec RPC, so `data` holds only str/int/float/bool/list/dict.

    names: the HF names it carries (the engine's exactly-once check). data: shm -> ShmBucket.to_wire();
    cuda_ipc -> vLLM IPCWeightTransferUpdateInfo fields; nccl -> NCCLWeightTransferUpdateInfo fields +
    "stage".
    """

    kind: str
    names: tuple[str, ...]
    data: Any


def ipc_update_info(meta: Sequence[TensorMeta], handles_pickled: str) -> dict:
    """vLLM `IPCWeightTransferUpdateInfo` fields of one packed bucket (packed=True at the init handshake)."""
    return {"names": [m.name for m in meta], "dtype_names": [m.dtype for m in meta],
            "shapes": [list(m.shape) for m in meta], "tensor_sizes": [m.nbytes for m in meta],
            "ipc_handles_pickled": handles_pickled}


def nccl_update_info(meta: Sequence[TensorMeta], stage: int) -> dict:
    """Update info of HarmonyNCCLWeightTransferEngine: vLLM's NCCL fields + the stage (which group)."""
    return {"names": [m.name for m in meta], "dtype_names": [m.dtype for m in meta],
            "shapes": [list(m.shape) for m in meta], "stage": stage}


def encode_ipc_handles(handles: dict[str, tuple]) -> str:
    """{GPU uuid: reduce_tensor args} as vLLM's `ipc_handles_pickled` (standard base64 of a pickle)."""
    return base64.b64encode(pickle.dumps(handles)).decode("ascii")


def decode_ipc_handles(text: str) -> dict[str, tuple]:
    return pickle.loads(base64.b64decode(text))


# --- calling engines (Ray actors; plain objects in tests) --------------------------------------------------


class _Done:
    def __init__(self, value):
        self.value = value


def _submit(engine, method: str, *args):
    """engine.method(*args): through `.remote` when the method has one (a Ray actor handle: an ObjectRef, or
    whatever `.remote` returns), else called directly (already done)."""
    fn = getattr(engine, method)
    remote = getattr(fn, "remote", None)
    return remote(*args) if remote is not None else _Done(fn(*args))


def _wait(futures: Sequence) -> list:
    """The results of _submit's futures: Ray ObjectRefs (ray.get, which raises the engine's error),
    concurrent futures, or calls already done."""
    from concurrent.futures import Future

    refs = [f for f in futures if not isinstance(f, (_Done, Future))]
    got = iter([])
    if refs:
        import ray

        got = iter(ray.get(refs))
    out = []
    for f in futures:
        if isinstance(f, _Done):
            out.append(f.value)
        elif isinstance(f, Future):
            out.append(f.result())
        else:
            out.append(next(got))
    return out


# --- senders -----------------------------------------------------------------------------------------------


class WeightSender(ABC):
    """The sending side of a transport: one per policy rank, reused across syncs."""

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
    def push(self, groups_fn: GroupsFn, engines: list, bucket_bytes: int | None = None) -> dict[str, float]:
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


class ShmSender(WeightSender):
    """Shared memory on one machine. Two ways into an engine, chosen per engine at every sync:

    * direct (vLLM-CPU engines with plain weights, once the engine has recorded where its loaders put each HF
      weight; harmony_mcore.rollout.placement): the engine's parameters live in /dev/shm files that this rank
      maps once (`shm.DirectTarget`), and each HF tensor is copied straight into them. One copy per byte, no
      staging bucket, one RPC per sync (`direct_written`, the names for the engine's coverage check).
    * buckets (every other engine, and the first sync of a new engine, which its workers record): the stage
      sender writes buckets into two /dev/shm slots and calls `engine.load_shm_bucket(ShmBucket)`; a slot is
      reused only once every engine has loaded the bucket it held.
    """

    kind = "shm"
    slots = 2

    def __init__(self, layout: RankLayout, *, bucket_bytes: int):
        super().__init__(layout, bucket_bytes=bucket_bytes)
        self._writer = None
        self._targets: dict[int, Any] = {}  # engine index -> shm.DirectTarget

    def push(self, groups_fn: GroupsFn, engines: list, bucket_bytes: int | None = None) -> dict[str, float]:
        start = time.perf_counter()
        groups = self._stage_groups(groups_fn)
        if groups is None:
            return {} if self.layout.dp_rank != 0 else {"sync_bytes": 0.0, "sync_s": time.perf_counter() - start}
        targets = self._direct_targets(engines)
        direct = [t for t in targets if t is not None]
        bucketed = [e for e, t in zip(engines, targets) if t is None]
        names: list[str] = []
        sent = 0

        def written(groups):  # every group goes straight into the direct engines first
            nonlocal sent
            for group in groups:
                if not group:
                    continue
                for name, tensor in group:
                    for target in direct:
                        target.write(name, tensor)
                    names.append(name)
                    sent += _nbytes(tensor)
                yield group

        if bucketed:
            self._push_buckets(written(groups), bucketed, bucket_bytes or self.bucket_bytes)
        else:
            for _ in written(groups):
                pass
        _wait([_submit(e, "direct_written", names) for e, t in zip(engines, targets) if t is not None])
        return {"sync_bytes": float(sent), "sync_s": time.perf_counter() - start}

    def _direct_targets(self, engines: list) -> list:
        """Per engine, its DirectTarget (mapped once per engine incarnation, re-fetched when its token changes)
        or None (bucket path)."""
        from harmony_mcore.rollout.shm import DirectTarget

        known = [self._targets[i].token if i in self._targets else None for i in range(len(engines))]
        replies = _wait([_submit(e, "direct_target", token) for e, token in zip(engines, known)])
        out = []
        for i, reply in enumerate(replies):
            current = self._targets.get(i)
            if current is not None and (reply is None or reply["token"] != current.token):
                self._targets.pop(i).close()
                current = None
            if reply is not None and current is None:
                current = self._targets[i] = DirectTarget(reply)
            out.append(current)
        return out

    def _push_buckets(self, groups: Iterable[Group], engines: list, max_bytes: int) -> None:
        if self._writer is None:
            from harmony_mcore.rollout.shm import ShmBucketWriter

            self._writer = ShmBucketWriter(f"pp{self.layout.pp_rank}", slots=self.slots)
        in_flight: list[list] = []
        for bucket in hf_dir.buckets(groups, max_bytes):
            if len(in_flight) == self.slots:  # the slot about to be reused must have been consumed
                _wait(in_flight.pop(0))
            shm_bucket = self._writer.write(bucket)
            in_flight.append([_submit(e, "load_shm_bucket", shm_bucket) for e in engines])
        for futures in in_flight:
            _wait(futures)

    def close(self) -> None:
        for target in self._targets.values():
            target.close()
        self._targets = {}
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _node_ip() -> str:
    import ray

    if ray.is_initialized():
        return ray.util.get_node_ip_address()
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


class NcclSender(WeightSender):
    """Packed NCCL broadcast from each stage sender (rank 0 of its stage's group) to every engine worker.

    vLLM API: `weight_transfer.nccl_common.trainer_init` (StatelessProcessGroup TCP rendezvous, then a
    PyNcclCommunicator on the current CUDA device) and `packed_tensor.packed_nccl_broadcast_producer` (chunks
    of chunk_bytes over num_buffers streams). The engines run `packed_nccl_broadcast_consumer` with the same
    chunk size and buffer count (sent in the init info), so both sides cut the stream identically.

    group_factory / broadcaster stand in for the vLLM calls in CPU tests (the choreography runs on gloo).
    """

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

    def push(self, groups_fn: GroupsFn, engines: list, bucket_bytes: int | None = None) -> dict[str, float]:
        start = time.perf_counter()
        groups = self._stage_groups(groups_fn)
        if groups is None:
            return {} if self.layout.dp_rank != 0 else {"sync_bytes": 0.0, "sync_s": time.perf_counter() - start}
        if self._group is None:
            raise TransportError("nccl: push() before connect() (Cluster.connect_weights at launch)")
        self._wait_turn()
        stage, sent, previous = self.layout.pp_rank, 0, []
        for bucket in hf_dir.buckets((g for g in groups if g), bucket_bytes or self.bucket_bytes):
            meta = bucket_meta(list(bucket.items()))
            _wait(previous)  # the previous bucket is loaded: engine errors surface before the next NCCL call
            payload = BucketPayload(self.kind, tuple(bucket), nccl_update_info(meta, stage))
            previous = [_submit(e, "load_bucket", payload) for e in engines]
            self._broadcaster(self._group, bucket, self.chunk_bytes, self.num_buffers)
            sent += sum(m.nbytes for m in meta)
        _wait(previous)
        self._pass_turn()
        return {"sync_bytes": float(sent), "sync_s": time.perf_counter() - start}

    # Stage s sends only after stage s - 1 has finished (the module docstring says which deadlock it avoids).

    @staticmethod
    def _token() -> torch.Tensor:
        on_nccl = dist.get_backend() == "nccl"
        return torch.zeros(1, device=torch.device("cuda", torch.cuda.current_device()) if on_nccl else "cpu")

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
    """Every policy rank holds each bucket in its own GPU buffer and shares it by CUDA IPC with the engine
    worker on its GPU (vLLM "ipc" backend, packed mode).

    For each pipeline stage s in order, all ranks step together, one step per parameter of stage s:
        stage s, DP 0:  the next parameter (TP gather); the stage sender (TP 0) feeds it to a BucketPlanner
        all ranks:      (done, meta, error) = broadcast_object(header, src=stage s sender)
        bucket closed:  broadcast of the packed bucket into every rank's buffer; each rank exports its buffer
                        (once per buffer: all_gather_object of {uuid: handle}); rank 0 calls
                        engine.load_bucket(payload) on every engine, waits, and broadcasts its status, the
                        barrier before any buffer is refilled (an engine error reaches every rank).
    The buffer is allocated per sync (max(bucket_bytes, bucket) bytes) and replaced, with a new export, for a
    larger bucket; the engine's PackedBufferImporter releases the old mapping when the handle changes and at
    finish, exactly as with vLLM's own packed_ipc_producer.

    exporter stands in for the CUDA pieces in CPU tests (the choreography runs on gloo).
    """

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

    def push(self, groups_fn: GroupsFn, engines: list, bucket_bytes: int | None = None) -> dict[str, float]:
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

    def _push_stage(self, stage: int, src: int, groups_fn: GroupsFn, engines: list, max_bytes: int) -> int:
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

    def _exchange(self, meta: list[TensorMeta], tensors: Group | None, src: int, engines: list,
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
            pack_into(view, tensors)
        if self.layout.world > 1:
            dist.broadcast(view, src=src)
        self._exporter.ready(view, meta)
        status, failure = None, None
        if self.layout.rank == 0 and engines:
            names = tuple(m.name for m in meta)
            payload = BucketPayload(self.kind, names, ipc_update_info(meta, self._handles))
            try:
                _wait([_submit(e, "load_bucket", payload) for e in engines])
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


def make_sender(kind: str, layout: RankLayout, *, bucket_bytes: int, **options) -> WeightSender:
    """The sender of a resolved transport kind for this rank (options: the GPU senders' test seams)."""
    senders = {"shm": ShmSender, "cuda_ipc": CudaIpcSender, "nccl": NcclSender}
    if kind not in senders:
        raise TransportError(f"unknown transport {kind!r} (expected one of {', '.join(KINDS)})")
    return senders[kind](layout, bucket_bytes=bucket_bytes, **options)


# --- engine side -------------------------------------------------------------------------------------------


def nccl_world_size(num_engines: int, engine_tp: int) -> int:
    """Size of each stage's NCCL group: the stage sender + every engine worker."""
    return 1 + num_engines * engine_tp


def engine_init_infos(kind: str, *, endpoints: Sequence[dict], num_engines: int,
                      engine_tp: int) -> list[dict | None]:
    """The init info of each engine for `llm.init_weight_transfer_engine` (None: nothing to connect).

    cuda_ipc: {"packed": True} (vLLM's IPCWeightTransferInitInfo). nccl: every stage's rendezvous in stage
    order; engine e's workers at rank_offset + w with rank_offset = 1 + e * engine_tp (vLLM's
    worker_init_process_group adds the worker's rank w); world 1 + engines * engine_tp; the stage senders'
    packed chunking.
    """
    if kind == "shm":
        return [None] * num_engines
    if kind == "cuda_ipc":
        return [{"packed": True} for _ in range(num_engines)]
    if kind != "nccl":
        raise TransportError(f"unknown transport {kind!r}")
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


class EngineReceiver:
    """The engine side of a transport, owned by the RolloutEngine actor (the process that holds the LLM).

    Build it BEFORE the LLM: for cuda_ipc it sets VLLM_ALLOW_INSECURE_SERIALIZATION=1, which the engine-core
    and worker processes inherit (vLLM decodes `ipc_handles_pickled` only then); for nccl it registers the
    "harmony_nccl" backend. vLLM API used: LLM(weight_transfer_config=...) and LLM's RL methods
    (init_weight_transfer_engine, start_weight_update, update_weights, finish_weight_update(weight_version),
    shutdown_weight_transfer_engine), which collective_rpc the worker's WeightTransferEngine.
    """

    def __init__(self, kind: str):
        if kind not in KINDS:
            raise TransportError(f"unknown transport {kind!r} (expected one of {', '.join(KINDS)})")
        self.kind = kind
        self.connected = kind == "shm"
        self.in_update = False
        if kind == "cuda_ipc":
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        elif kind == "nccl":
            register_vllm_backends()

    def llm_kwargs(self) -> dict:
        backend = VLLM_BACKENDS.get(self.kind)
        return {} if backend is None else {"weight_transfer_config": {"backend": backend}}

    def connect(self, llm, init_info: dict | None) -> None:
        """IPC: every worker records packed mode. NCCL: every worker joins every stage's group, which blocks
        until the stage senders connect too (call both sides concurrently)."""
        if self.kind == "shm":
            return
        if init_info is None:
            raise TransportError(f"{self.kind}: connect needs the init info (transport.engine_init_infos)")
        llm.init_weight_transfer_engine({"init_info": dict(init_info)})
        self.connected = True

    def disconnect(self, llm) -> None:
        if self.kind != "shm" and self.connected:
            llm.shutdown_weight_transfer_engine()
            self.connected = False

    def begin(self, llm) -> None:
        """Open vLLM's update session (initialize_layerwise_reload); each bucket of the sync loads into it."""
        if self.kind == "shm":
            return
        if not self.connected:
            raise TransportError(f"{self.kind}: weight update before connect_weights()")
        llm.start_weight_update()
        self.in_update = True

    def load(self, llm, payload: BucketPayload) -> int:
        if payload.kind != self.kind:
            raise TransportError(f"a {payload.kind} bucket sent to an engine set up for {self.kind}")
        if self.kind == "shm":
            llm.collective_rpc("harmony_load_shm_bucket", args=tuple(payload.data))
            return len(payload.names)
        if not self.in_update:
            raise TransportError(f"{self.kind}: bucket outside begin()/finish()")
        try:
            llm.update_weights({"update_info": payload.data})
        except BaseException:
            self.in_update = False  # the worker ended its session on the failure
            raise
        return len(payload.names)

    def finish(self, llm, version: int | None) -> None:
        """Close the session (finalize_layerwise_reload; IPC also releases the buffer mapping) and tag vLLM's
        weight version."""
        if self.in_update:
            self.in_update = False
            llm.finish_weight_update(weight_version=None if version is None else str(version))


# --- the vLLM worker-side NCCL backend (built on first use: importing vLLM's NCCL engine takes seconds) -----


def register_vllm_backends() -> None:
    """Register "harmony_nccl" with vLLM's WeightTransferEngineFactory (idempotent; the class loads lazily).

    It must run in every process that creates a worker's weight-transfer engine: the engine actor
    (EngineReceiver) and the vLLM workers (harmony_mcore.rollout.worker_ext calls it; vLLM imports the worker
    extension before it loads the model and creates the engine).
    """
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory

    try:
        WeightTransferEngineFactory.register_engine(NCCL_BACKEND, __name__, "HarmonyNCCLWeightTransferEngine")
    except ValueError:  # "already registered": this process did it before
        pass


_LAZY: dict[str, type] = {}


def _build_nccl_backend() -> dict[str, type]:
    """vLLM's dense NCCL engine with one communicator per pipeline stage.

    Differences from NCCLWeightTransferEngine: the init info lists one [address, port] per stage and each
    worker joins every stage's group (the same rank in each: rank_offset + its rank); the update info names
    the stage whose group carries the bucket. Receiving (packed consumer -> model.load_weights) and the
    layer-wise reload session are the parent's.
    """
    if _LAZY:
        return _LAZY
    from dataclasses import dataclass as _dataclass

    from vllm.distributed.weight_transfer.base import WeightTransferInitInfo
    from vllm.distributed.weight_transfer.nccl_common import (
        NCCLWeightTransferInitInfo,
        worker_init_process_group,
    )
    from vllm.distributed.weight_transfer.nccl_engine import (
        NCCLWeightTransferEngine,
        NCCLWeightTransferUpdateInfo,
    )
    from vllm.distributed.weight_transfer.packed_tensor import (
        DEFAULT_PACKED_BUFFER_SIZE_BYTES,
        DEFAULT_PACKED_NUM_BUFFERS,
    )

    @_dataclass
    class StageGroupsInitInfo(WeightTransferInitInfo):
        endpoints: list  # [[address, port], ...] in stage order
        rank_offset: int
        world_size: int
        packed: bool = True
        packed_buffer_size_bytes: int = DEFAULT_PACKED_BUFFER_SIZE_BYTES
        packed_num_buffers: int = DEFAULT_PACKED_NUM_BUFFERS

        def __post_init__(self) -> None:
            if not self.endpoints or any(len(e) != 2 for e in self.endpoints):
                raise ValueError(f"endpoints must be [[address, port], ...] per stage: {self.endpoints!r}")
            if not 1 <= self.rank_offset < self.world_size:
                raise ValueError(f"rank_offset {self.rank_offset} outside [1, world_size={self.world_size})")

    @_dataclass
    class StageUpdateInfo(NCCLWeightTransferUpdateInfo):
        stage: int = 0

    class HarmonyNCCLWeightTransferEngine(NCCLWeightTransferEngine):
        init_info_cls = StageGroupsInitInfo
        update_info_cls = StageUpdateInfo

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.stage_groups: list = []

        def init_transfer_engine(self, init_info: StageGroupsInitInfo) -> None:
            self.shutdown()  # a reconnect (after an engine restart) replaces the old groups
            self.packed = init_info.packed
            self.packed_buffer_size_bytes = init_info.packed_buffer_size_bytes
            self.packed_num_buffers = init_info.packed_num_buffers
            for address, port in init_info.endpoints:
                one = NCCLWeightTransferInitInfo(
                    master_address=str(address), master_port=int(port), rank_offset=init_info.rank_offset,
                    world_size=init_info.world_size, packed=init_info.packed,
                    packed_buffer_size_bytes=init_info.packed_buffer_size_bytes,
                    packed_num_buffers=init_info.packed_num_buffers)
                self.stage_groups.append(worker_init_process_group(one, self.parallel_config))
            self.model_update_group = self.stage_groups[0]

        def receive_weights(self, update_info: StageUpdateInfo) -> None:
            if not 0 <= update_info.stage < len(self.stage_groups):
                raise RuntimeError(f"a bucket of pipeline stage {update_info.stage}, but "
                                   f"{len(self.stage_groups)} stage groups are connected")
            self.model_update_group = self.stage_groups[update_info.stage]
            super().receive_weights(update_info)

        def shutdown(self) -> None:
            for group in self.stage_groups:
                group.destroy()
            self.stage_groups = []
            self.model_update_group = None

    _LAZY.update(StageGroupsInitInfo=StageGroupsInitInfo, StageUpdateInfo=StageUpdateInfo,
                 HarmonyNCCLWeightTransferEngine=HarmonyNCCLWeightTransferEngine)
    return _LAZY


def __getattr__(name: str):
    """Module attributes built on first use (PEP 562): vLLM's factory loads
    `harmony_mcore.rollout.transport.HarmonyNCCLWeightTransferEngine` by name, and importing this module does
    not import vLLM."""
    if name in ("HarmonyNCCLWeightTransferEngine", "StageGroupsInitInfo", "StageUpdateInfo"):
        return _build_nccl_backend()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
