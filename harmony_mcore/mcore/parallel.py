"""Process group and Megatron parallel state for TP x PP x DP, from one place.

World = TP * PP * DP (Megatron orders ranks TP-fastest, then DP, then PP). NCCL with one GPU per rank when CUDA
is present, gloo on CPU (with the CPU compatibility layer applied).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

from harmony_mcore.weights.arch import ArchSpec


class LayoutError(ValueError):
    """An impossible parallel layout, naming the constraint it breaks."""


def layout_errors(arch: ArchSpec, *, tp: int, pp: int, world: int | None = None,
                  padded_vocab: int | None = None) -> list[str]:
    """Every reason the layout cannot hold this model (empty when it can)."""
    errors = []
    for name, value in (("tp", tp), ("pp", pp)):
        if value < 1:
            errors.append(f"parallel.{name}={value} must be >= 1")
    if errors:
        return errors
    if world is not None and world % (tp * pp):
        errors.append(f"world size {world} is not a multiple of tp*pp = {tp * pp}")
    if arch.num_heads % tp:
        errors.append(f"parallel.tp={tp} does not divide the {arch.num_heads} attention heads")
    if arch.num_query_groups % tp:
        errors.append(f"parallel.tp={tp} does not divide the {arch.num_query_groups} query groups (KV heads)")
    if arch.ffn_hidden_size % tp:
        errors.append(f"parallel.tp={tp} does not divide ffn_hidden_size={arch.ffn_hidden_size}")
    if padded_vocab is not None and padded_vocab % tp:
        errors.append(f"parallel.tp={tp} does not divide the padded vocab {padded_vocab}")
    if arch.num_layers % pp:
        errors.append(f"parallel.pp={pp} does not divide the {arch.num_layers} layers")
    return errors


def check_layout(arch: ArchSpec, *, tp: int, pp: int, world: int | None = None,
                 padded_vocab: int | None = None) -> None:
    errors = layout_errors(arch, tp=tp, pp=pp, world=world, padded_vocab=padded_vocab)
    if errors:
        raise LayoutError("impossible parallel layout: " + "; ".join(errors))


BACKENDS = {"cuda": "nccl", "cpu": "gloo"}


def torch_device(device: str) -> torch.device:
    """The torch device of this rank's Megatron: its GPU (LOCAL_RANK, set by init_parallel), or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else torch.device("cpu")


def init_parallel(tp: int, pp: int, *, device: str = "cpu", seed: int = 1234, timeout_s: float = 1800.0) -> None:
    """Join the process group described by the env (RANK, WORLD_SIZE, MASTER_ADDR/PORT, LOCAL_RANK) if not
    joined yet, then build Megatron's TP/PP/DP groups and seed its RNG tracker.

    device (harmony_mcore.runtime): "cuda", one GPU per rank over NCCL, or "cpu", gloo with the CPU compatibility
    layer, even on a machine with GPUs (the CPU test tier there). A group the caller joined already (e.g.
    harmony_mcore.dist.spawn_gloo) must use the matching backend.
    """
    from megatron.core import parallel_state, tensor_parallel

    from harmony_mcore.mcore import cpu_compat

    if device not in BACKENDS:
        raise ValueError(f"device {device!r}: expected cpu or cuda")
    if device == "cpu":
        cpu_compat.apply()
    if dist.is_initialized():
        if dist.get_backend() != BACKENDS[device]:
            raise LayoutError(f"Megatron on {device} needs a {BACKENDS[device]} process group, this process "
                              f"joined {dist.get_backend()}")
    else:
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(BACKENDS[device], timeout=timedelta(seconds=timeout_s))
    world = dist.get_world_size()
    if world % (tp * pp):
        raise LayoutError(f"world size {world} is not a multiple of tp*pp = {tp * pp}")
    if parallel_state.model_parallel_is_initialized():
        if (parallel_state.get_tensor_model_parallel_world_size(),
                parallel_state.get_pipeline_model_parallel_world_size()) == (tp, pp):
            tensor_parallel.model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
            return
        # Megatron forgets its groups here without destroying them (their threads stay): change layouts rarely.
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
        # gloo twins of the DP groups carry CPU-side collectives (pseudo-label counts, the optimizer-state
        # gather of a checkpoint) on GPU and CPU alike; on CPU they duplicate groups that are gloo already.
        create_gloo_process_groups=True,
    )
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy_parallel() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def ranks() -> dict[str, int]:
    """This process's coordinates: tp/pp/dp rank and size."""
    from megatron.core import parallel_state as ps

    return {
        "tp_rank": ps.get_tensor_model_parallel_rank(), "tp": ps.get_tensor_model_parallel_world_size(),
        "pp_rank": ps.get_pipeline_model_parallel_rank(), "pp": ps.get_pipeline_model_parallel_world_size(),
        "dp_rank": ps.get_data_parallel_rank(), "dp": ps.get_data_parallel_world_size(),
    }
