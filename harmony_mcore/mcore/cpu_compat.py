"""Megatron-Core on a machine without CUDA.

Megatron-Core 0.16 assumes CUDA in a handful of places. `apply()` patches exactly those, once, in a process whose
Megatron runs on the CPU: one with a gloo process group (harmony_mcore.mcore.parallel.init_parallel decides), on a
machine without CUDA or, for the CPU test tier, on one with GPUs (which that process then does not see). Every
patch says why it exists. Megatron's own layers, schedules, DDP and DistributedOptimizer then run unchanged on CPU
tensors with gloo (torch 2.13's gloo has the reduce-scatter and all-gather-into-tensor they need: nothing to shim).

The TorchFunctionMode part is per thread (PyTorch keeps the mode stack thread-locally): call `apply()` in the
thread that runs Megatron (Ray's synchronous actors run every method on one thread).
"""

from __future__ import annotations

import threading

import torch
from torch.overrides import TorchFunctionMode

_patched = False
_mode_threads: set[int] = set()
_lock = threading.Lock()


def _is_cuda(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


class _CudaToCpu(TorchFunctionMode):
    """Maps CUDA placements in Megatron to the CPU.

    - literal `device="cuda"` in the pipeline schedules (token counters), the optimizer (found_inf, scale)
      and clip_grads (norm buffers);
    - `tensor.cuda()` / `tensor.to("cuda")` in optimizer state loading;
    - `tensor.type()` compared against "torch.cuda.FloatTensor" (clip_grads and the optimizer assert CUDA
      gradients): reported as the CUDA type name of the same dtype.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        return func(*args, **kwargs)


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(new_state)


def _seed_cpu_generator(seed: int) -> None:
    # Not torch.manual_seed: that one calls torch.cuda.manual_seed_all itself.
    torch.default_generator.manual_seed(int(seed))


def apply() -> bool:
    """Install the CPU patches in this process (idempotent). Returns True."""
    global _patched
    with _lock:
        if not _patched:
            # Megatron branches on is_available() (streams, events, memory stats, device placement): a process
            # running Megatron on the CPU hides the GPUs of the machine from it, rather than half-using them.
            torch.cuda.is_available = lambda: False
            # Device placement: rotary embeddings, p2p shape buffers, attention masks call current_device().
            torch.cuda.current_device = lambda: torch.device("cpu")
            # The pipeline schedule and p2p communication synchronise the (absent) CUDA stream.
            torch.cuda.synchronize = lambda *a, **k: None
            # Memory housekeeping in DDP/optimizer: nothing to free on CPU.
            torch.cuda.empty_cache = lambda: None
            # Megatron's RNG tracker forks the CUDA generator for tensor-parallel regions (dropout, init);
            # on CPU the CPU generator plays that role, preserving the fork/restore semantics.
            torch.cuda.get_rng_state = _cpu_rng_state
            torch.cuda.set_rng_state = _set_cpu_rng_state
            torch.cuda.manual_seed = _seed_cpu_generator
            torch.cuda.manual_seed_all = _seed_cpu_generator
            from megatron.core.tensor_parallel import random as mrandom

            mrandom._get_cuda_rng_state = _cpu_rng_state
            mrandom._set_cuda_rng_state = _set_cpu_rng_state
            _patched = True
        tid = threading.get_ident()
        if tid not in _mode_threads:
            _CudaToCpu().__enter__()  # stays on this thread's mode stack for the life of the process
            _mode_threads.add(tid)
    return True
