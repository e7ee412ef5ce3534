"""Forward passes through Megatron's pipeline schedule (any PP), returning full-vocab logits on the last stage."""

from __future__ import annotations

import torch


def causal_mask(seq_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, S, S) bool, True where attention is NOT allowed (Megatron's convention).

    Passed explicitly: Megatron's default mask is built on CUDA.
    """
    return torch.triu(torch.ones(seq_len, seq_len, dtype=torch.bool, device=device), diagonal=1)[None, None]


@torch.no_grad()
def forward_logits(model, tokens: torch.Tensor, micro_batch_size: int | None = None) -> torch.Tensor | None:
    """tokens (B, S) -> logits (B, S, padded_vocab) on the last pipeline stage's ranks, None on other stages.

    Runs Megatron's forward-only schedule (1F1B machinery with PP > 1) and gathers the vocab-parallel logits
    over TP.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    dev = next(model.parameters()).device
    B, S = tokens.shape
    mbs = micro_batch_size or B
    chunks = list(tokens.to(dev).split(mbs))
    position_ids = torch.arange(S, device=dev)[None]
    mask = causal_mask(S, dev)

    def step(data_iterator, model_chunk):
        ids = next(data_iterator)
        out = model_chunk(ids, position_ids.expand_as(ids), mask)  # (b, S, V/tp) on the last stage

        def collect(output_tensor):
            return torch.zeros((), device=dev), {"logits": gather_from_tensor_model_parallel_region(output_tensor)}

        return out, collect

    results = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter(chunks), model=[model], num_microbatches=len(chunks),
        seq_length=S, micro_batch_size=mbs, forward_only=True,
    )
    if not ps.is_pipeline_last_stage():
        return None
    return torch.cat([r["logits"] for r in results], dim=0)
