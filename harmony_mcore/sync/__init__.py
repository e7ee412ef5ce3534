"""Weight sync: the policy's new weights into the vLLM engines, once per training step.

A sync (Cluster.sync_weights): every engine opens an update (`begin_weight_update`), every policy rank calls its
sender's `push` at the same time, every engine closes the update (`finish_weight_update`) and, once it has
counted every weight of its model exactly once, serves the new version. Each rank's `groups_fn()` gives its
pipeline stage's weights as `iter_hf_groups(..., lockstep=True)` does: one item per model parameter on every TP
rank, the HF (name, full tensor) pairs on TP rank 0 and [] on the others (they only join the TP gather). Buckets
are cut by `weights.hf_dir.BucketPlanner` (the same as HF export), never splitting a group (q/k/v, gate/up), so
vLLM's layer-wise reload always receives whole layers.

Three wires (`rollout.transport`, resolved with the run's runtime by `harmony_mcore.runtime.transport_for`), one module each, sending and receiving side
together:

    shm       sync.shm: /dev/shm files on one machine (CPU, and the one-machine GPU fallback). vLLM-CPU engines
              with plain weights take direct writes into their parameters after their first sync
              (sync.cpu_direct, CPU development only).
    cuda_ipc  sync.cuda_ipc: colocated GPU engines; every rank shares each bucket from its GPU by CUDA IPC into
              vLLM's "ipc" backend.
    nccl      sync.nccl: disaggregated GPU engines; packed NCCL broadcast from each stage sender into vLLM's
              NCCL backend with one group per stage (sync.nccl_vllm, inside vLLM's processes).

Who sends: each stage's TP rank 0 of DP replica 0 (its other TP ranks only join the gathers, other replicas do
nothing), except over cuda_ipc, where every rank takes part (each GPU's engine worker maps that GPU's copy).

Sender (`make_sender`, one per policy rank, protocol.WeightSender):

    endpoint()           NCCL rendezvous {"stage", "host", "port", ...} of a stage sender; None elsewhere
    connect(world_size)  NCCL stage senders: open the stage's group as its rank 0 (concurrently with the
                         engines' connect); a no-op otherwise
    push(groups_fn, engines, bucket_bytes) -> {"sync_bytes", "sync_s"} | {}
                         on EVERY policy rank at every sync, inside the engines' begin/finish_weight_update;
                         `engines` (protocol.Engines) calls the engines: RayEngines(actor handles) from
                         Policy.push_weights, LocalEngines(objects) in process
    release()            after the update: free what it no longer needs (CUDA IPC: the last bucket)
    disconnect(), close()

The engine's methods a sender calls (RolloutEngine): `load_bucket(BucketPayload)` on every wire (shm: where the
bucket's file is; cuda_ipc: IPC handles; nccl: the metadata of the broadcast that follows), and over shm
`direct_target(token)` / `direct_written(names)` (cpu_direct).

Engine side (`make_receiver`, protocol.Receiver, owned by the RolloutEngine actor; built before the LLM):

    llm_kwargs()                    LLM(weight_transfer_config={"backend": "ipc" | "harmony_nccl"}) on GPU wires
    connect(llm, info)              `engine_init_infos` gives each engine's info (NCCL: the stage groups)
    begin(llm)                      vLLM's update session opens (initialize_layerwise_reload)
    load(llm, payload)              one bucket into the model
    finish(llm, version, complete)  the session closes, vLLM's weight version is tagged
    disconnect(llm), close(llm)

Why not vLLM's trainer side (`IPCTrainerWeightTransferEngine`, `NCCLTrainerWeightTransferEngine`) as it is: it
assumes ONE sender that iterates the whole model (rank 0 of an FSDP or Megatron-Bridge export, which
materialises every tensor on every rank) and it opens and closes a vLLM update session per `send_weights`.
Here each pipeline stage streams only its own layers (full tensors on its TP rank 0), several stages feed one
session that the engine opens in begin_weight_update, and IPC needs a copy on every GPU. So the senders drive
vLLM's wire protocol themselves, with vLLM's pieces (`reduce_tensor` handles in the packed
`IPCWeightTransferUpdateInfo` layout, `nccl_common.trainer_init`, `packed_nccl_broadcast_producer`); everything
on the receiving side is vLLM's code.

vLLM, Ray, Megatron and CUDA-only code are imported lazily: this package imports on a CPU-only machine (except
sync.nccl_vllm, which only vLLM's processes import).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from harmony_mcore.sync import cuda_ipc, nccl, shm
from harmony_mcore.sync.cpu_direct import DirectPlacement
from harmony_mcore.sync.protocol import RankLayout, Receiver, TransportError, WeightSender


class Wire(NamedTuple):
    sender: type[WeightSender]
    receiver: type[Receiver]
    init_infos: Callable[..., list[dict | None]]


WIRES = {
    "shm": Wire(shm.ShmSender, shm.ShmReceiver, shm.init_infos),
    "cuda_ipc": Wire(cuda_ipc.CudaIpcSender, cuda_ipc.IpcReceiver, cuda_ipc.init_infos),
    "nccl": Wire(nccl.NcclSender, nccl.NcclReceiver, nccl.init_infos),
}
KINDS = tuple(WIRES)


def _wire(kind: str) -> Wire:
    if kind not in WIRES:
        raise TransportError(f"unknown transport {kind!r} (expected one of {', '.join(KINDS)})")
    return WIRES[kind]


def make_sender(kind: str, layout: RankLayout, *, bucket_bytes: int, **test_seams) -> WeightSender:
    """The sender of a resolved kind for this rank (test_seams: the GPU senders' stand-ins for CUDA and vLLM)."""
    return _wire(kind).sender(layout, bucket_bytes=bucket_bytes, **test_seams)


def make_receiver(kind: str, *, direct_writes: bool = False) -> Receiver:
    """An engine's receiver. direct_writes: a vLLM-CPU engine with plain weights over shm, which lets the
    senders write into its parameters once it has learnt where each weight goes (sync.cpu_direct)."""
    wire = _wire(kind)
    if not direct_writes:
        return wire.receiver()
    if kind != "shm":
        raise TransportError(f"{kind}: direct writes into an engine's parameters need the shm wire")
    return shm.ShmReceiver(direct=DirectPlacement())


def engine_init_infos(kind: str, *, endpoints: Sequence[dict], num_engines: int,
                      engine_tp: int) -> list[dict | None]:
    """The init info of each engine for its receiver's `connect` (None: nothing to connect); endpoints: the
    stage senders' `endpoint()` (NCCL)."""
    return _wire(kind).init_infos(endpoints=endpoints, num_engines=num_engines, engine_tp=engine_tp)
