"""Where a run executes: decided once, from the config and the resources, and handed to every part.

    cpu                Megatron on gloo with the CPU compatibility layer, vLLM-CPU engines in processes of their
                       own, weights through /dev/shm
    gpu-colocated      one policy rank per GPU, the engines on the same GPUs, asleep while Megatron trains;
                       weights by CUDA IPC
    gpu-disaggregated  the engines on GPUs of their own; weights by NCCL broadcast

`decide(cfg, gpus)` is the one place that turns a GPU count into these answers: the cluster (harmony_mcore.cluster)
calls it with the GPUs Ray reports and passes the result to every policy rank and engine; the eval CLI calls it with
the local GPU count. `rollout.transport` may name a wire other than the one a runtime implies (shm on GPUs, for a
one-machine fallback) where that wire can work.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from harmony_mcore.checks import ConfigError

Device = Literal["cpu", "cuda"]
TRANSPORTS = ("shm", "cuda_ipc", "nccl")


@dataclass(frozen=True)
class Runtime:
    device: Device = "cpu"
    colocated: bool = True  # engines share the policy's GPUs (meaningless on CPU, where each has a process)
    transport: str = "shm"  # the weight-sync wire (harmony_mcore.sync)
    sleep_engines: bool = False  # colocated GPU engines release their memory while Megatron trains

    @property
    def on_gpu(self) -> bool:
        return self.device == "cuda"

    @property
    def name(self) -> str:
        if not self.on_gpu:
            return "cpu"
        return "gpu-colocated" if self.colocated else "gpu-disaggregated"


CPU = Runtime()


def transport_for(requested: str, *, on_gpu: bool, colocated: bool) -> str:
    """`rollout.transport` -> the wire. auto: cuda_ipc when colocated on GPU, nccl when disaggregated on GPU, shm on
    CPU. cuda_ipc and nccl need GPUs; a CUDA IPC handle opens only on its own GPU (colocated); NCCL cannot put two
    ranks on one GPU (disaggregated)."""
    if requested == "auto":
        return "shm" if not on_gpu else ("cuda_ipc" if colocated else "nccl")
    if requested not in TRANSPORTS:
        raise ConfigError(f"rollout.transport={requested!r}: expected auto, {', '.join(TRANSPORTS)}")
    if requested != "shm" and not on_gpu:
        raise ConfigError(f"rollout.transport={requested}: needs GPUs (use shm or auto on CPU)")
    if requested == "cuda_ipc" and not colocated:
        raise ConfigError("rollout.transport=cuda_ipc: a CUDA IPC handle opens only on its own GPU; "
                          "disaggregated engines use nccl")
    if requested == "nccl" and colocated:
        raise ConfigError("rollout.transport=nccl: NCCL cannot put two ranks on one GPU; colocated engines use "
                          "cuda_ipc")
    return requested


def decide(cfg, gpus: int) -> Runtime:
    """The runtime of a run of `cfg` on resources with `gpus` GPUs (0: CPU)."""
    r = cfg.rollout
    on_gpu, colocated = gpus > 0, r.placement == "colocated"
    return Runtime(device="cuda" if on_gpu else "cpu", colocated=colocated,
                   transport=transport_for(r.transport, on_gpu=on_gpu, colocated=colocated),
                   sleep_engines=on_gpu and colocated and r.sleep_while_training)


def standalone(gpus: int) -> Runtime:
    """One engine loading its weights from disk, no trainer (the eval CLI)."""
    return Runtime(device="cuda" if gpus > 0 else "cpu", colocated=False)


def local_gpus() -> int:
    """GPUs of this machine, for the commands that run without Ray (the eval CLI)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
