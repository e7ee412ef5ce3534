"""Moving weights between this rank's Megatron model shard and HF-named full tensors, via the one table.

- `load_hf_weights`: HF safetensors -> this rank's shard (used by HF->mcore conversion).
- `iter_hf_groups`: this stage's shard -> (HF name, full tensor) pairs, gathering TP shards on TP rank 0. Shared by
  the mcore->HF export and the per-step weight sync into vLLM.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist

from harmony_mcore.mcore.model import layer_offset
from harmony_mcore.weights import table
from harmony_mcore.weights.arch import ArchSpec
from harmony_mcore.weights.hf_dir import HFWeights
from harmony_mcore.weights.validate import WeightMismatchError, check_hf_checkpoint


def _rule_for(name: str, arch: ArchSpec, model) -> tuple[table.WeightRule, int | None]:
    """Table rule and GLOBAL layer index of a model parameter."""
    if name == "output_layer.weight" and arch.tied_embeddings:
        # Last pipeline stage's copy of the tied embedding (PP > 1): same tensor as the input embedding.
        return table.match_module_name("embedding.word_embeddings.weight", arch)
    rule, local_layer = table.match_module_name(name, arch)
    return rule, None if local_layer is None else local_layer + layer_offset(model)


@torch.no_grad()
def load_hf_weights(model, hf: HFWeights, arch: ArchSpec, padded_vocab: int) -> None:
    """Fill this rank's shard of `model` from the HF checkpoint (shapes checked against the architecture)."""
    from megatron.core import parallel_state as ps

    tp_rank, tp = ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size()
    check_hf_checkpoint(hf, arch)
    for name, param in model.named_parameters():
        rule, layer = _rule_for(name, arch, model)
        parts = [hf.get(n) for n in rule.hf_names(layer)]
        shard = table.tp_shard(rule, table.to_mcore(rule, parts, arch, padded_vocab), tp_rank, tp)
        if shard.shape != param.shape:
            raise WeightMismatchError(
                f"{name}: HF tensors {rule.hf_names(layer)} give shape {tuple(shard.shape)}, model expects "
                f"{tuple(param.shape)}"
            )
        param.copy_(shard)


def _gather_tp(shard: torch.Tensor, rule: table.WeightRule) -> torch.Tensor | None:
    """Full tensor on TP rank 0 (None elsewhere); a no-op for replicated tensors."""
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if rule.tp_dim is None or tp == 1:
        return shard if ps.get_tensor_model_parallel_rank() == 0 else None
    group = ps.get_tensor_model_parallel_group()
    dst = ps.get_tensor_model_parallel_src_rank()
    shard = shard.contiguous()
    if dist.get_rank() == dst:
        shards = [torch.empty_like(shard) for _ in range(tp)]
        dist.gather(shard, shards, dst=dst, group=group)
        return table.tp_unshard(rule, shards)
    dist.gather(shard, None, dst=dst, group=group)
    return None


@torch.no_grad()
def iter_hf_groups(model, arch: ArchSpec, *, lockstep: bool = False) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """For every weight of this pipeline stage, the HF (name, full tensor) pairs it maps to (q/k/v together,
    gate/up together), yielded on TP rank 0.

    All TP ranks of the stage must iterate it together (each parameter is a TP gather). lockstep=True also
    yields an empty group on the other TP ranks, one per parameter, for callers that interleave their own
    collectives with the gathers (the CUDA IPC weight sender). At most one full parameter is materialised at a
    time beyond the model itself; the tensors are views of that gather.
    """
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and arch.tied_embeddings:
            continue  # exported once, from the input embedding on the first stage
        rule, layer = _rule_for(name, arch, model)
        full = _gather_tp(param.detach(), rule)
        if full is not None:
            yield list(zip(rule.hf_names(layer), table.to_hf(rule, full, arch)))
        elif lockstep:
            yield []
