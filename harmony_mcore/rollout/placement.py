"""Where each HF weight lands inside a vLLM worker's parameters, learnt from vLLM's own weight loaders.

The direct shm sync (harmony_mcore.rollout.transport.ShmSender) writes the policy's HF tensors straight into the
memory of a vLLM-CPU engine's parameters: one copy per byte, no staging bucket, no RPC per bucket. The layout
knowledge (q/k/v fused into qkv_proj rows, gate/up into gate_up_proj, vocabulary padding, TP shards) stays
vLLM's: the first sync after an engine starts goes through `model.load_weights` as usual while `CopyRecorder`
watches it and notes every `copy_` from an HF tensor into a parameter as a `Piece`

    param[dst_offset + sum(i_k * dst_stride_k)] = hf[src_offset + sum(i_k * src_stride_k)]   for i in shape

(element offsets and strides; HF tensors are contiguous in the bucket, so src strides refer to that layout).
Anything else a loader does with HF data (a dtype cast, an arithmetic op, a copy into something that is not a
parameter) makes the recording `unsupported`, and that engine keeps the loader path: the recorder never guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Piece:
    """One strided copy of (part of) HF tensor `hf_name` into parameter `param`."""

    hf_name: str
    param: str
    dst_offset: int  # elements from the parameter's first element
    src_offset: int  # elements from the HF tensor's first element
    shape: tuple[int, ...]
    dst_stride: tuple[int, ...]
    src_stride: tuple[int, ...]

    def to_wire(self) -> tuple:
        return (self.hf_name, self.param, self.dst_offset, self.src_offset, list(self.shape),
                list(self.dst_stride), list(self.src_stride))

    @classmethod
    def from_wire(cls, w: Sequence) -> Piece:
        name, param, dst, src, shape, dst_stride, src_stride = w
        return cls(name, param, int(dst), int(src), tuple(shape), tuple(dst_stride), tuple(src_stride))


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def covers_whole(piece: Piece, hf_shape: Sequence[int]) -> bool:
    """Whether the piece reads the entire contiguous HF tensor (the usual case on an unsharded engine)."""
    return (piece.src_offset == 0 and piece.shape == tuple(hf_shape)
            and piece.src_stride == contiguous_strides(hf_shape))


def _span(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) byte addresses a tensor view touches."""
    if t.numel() == 0:
        return t.data_ptr(), t.data_ptr()
    last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


class _Ranges:
    """Named, non-overlapping byte ranges: which tensor a view's memory belongs to."""

    def __init__(self, named: Sequence[tuple[str, torch.Tensor]]):
        self._items = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size(), name, t)
                             for name, t in named if t.numel())

    def find(self, view: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        lo, hi = _span(view)
        for start, end, name, t in self._items:
            if start <= lo < end:
                if hi > end:
                    raise ValueError(f"a view reaches past the end of {name!r}")
                return name, t
        return None

    def overlaps(self, view: torch.Tensor) -> str | None:
        lo, hi = _span(view)
        for start, end, name, _ in self._items:
            if lo < end and start < hi:
                return name
        return None


class CopyRecorder(TorchDispatchMode):
    """Records how `model.load_weights(sources)` places HF tensors into parameters (run it around that call).

    sources: the HF (name, tensor) pairs being loaded (contiguous, alive for the whole call); params: the model's
    unique parameters. After the call, `pieces` holds what was placed and `unsupported` the first reason the
    placement cannot be replayed as plain copies (None if it can). `names` lists every source, placed or not (a
    loader may skip one, e.g. the LM head of tied embeddings).
    """

    def __init__(self, sources: Sequence[tuple[str, torch.Tensor]], params: Sequence[tuple[str, torch.Tensor]]):
        super().__init__()
        for name, t in sources:
            if not t.is_contiguous():
                raise ValueError(f"CopyRecorder: source {name!r} must be contiguous")
        self.names = [name for name, _ in sources]
        self._sources = _Ranges(sources)
        self._params = _Ranges(params)
        self.pieces: list[Piece] = []
        self.unsupported: str | None = None

    def _fail(self, reason: str) -> None:
        if self.unsupported is None:
            self.unsupported = reason

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten.copy_.default:
            self._copy(args[0], args[1])
        elif not func.is_view:
            for arg in (*args, *kwargs.values()):
                if isinstance(arg, torch.Tensor) and (name := self._sources.overlaps(arg)) is not None:
                    self._fail(f"the loader applies {func} to {name!r} (only views and copies are replayed)")
        return func(*args, **kwargs)

    def _copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if not isinstance(src, torch.Tensor):
            return
        found = self._sources.find(src)
        if found is None:
            if (name := self._sources.overlaps(src)) is not None:
                self._fail(f"a copy reads {name!r} through an unrecognised view")
            return
        hf_name, hf = found
        target = self._params.find(dst)
        if target is None:
            self._fail(f"the loader copies {hf_name!r} into a tensor that is not a parameter")
            return
        param_name, param = target
        if dst.dtype != src.dtype or dst.shape != src.shape:
            self._fail(f"{hf_name!r} -> {param_name!r} converts {src.dtype}{tuple(src.shape)} to "
                       f"{dst.dtype}{tuple(dst.shape)}")
            return
        size = src.element_size()
        self.pieces.append(Piece(hf_name, param_name, (dst.data_ptr() - param.data_ptr()) // size,
                                 (src.data_ptr() - hf.data_ptr()) // size, tuple(src.shape),
                                 tuple(dst.stride()), tuple(src.stride())))


def unique_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """named_parameters without tied duplicates (the first name of each tensor)."""
    return list(model.named_parameters(remove_duplicate=True))
