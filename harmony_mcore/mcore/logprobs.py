"""Token log-probabilities and entropy from vocab-parallel logits, holding at most about one logits-sized buffer.

For each position with logits z (the full vocabulary, split over the TP ranks, padded rows excluded) and target t:

    lse = log sum_v exp(z_v)          logp = z_t - lse          H = lse - sum_v p_v z_v,   p_v = exp(z_v - lse)

and in the backward pass, for upstream gradients g (of logp) and h (of H):

    dL/dz_v = g [v = t] - p_v (g + h (z_v - (lse - H)))

A naive autograd implementation keeps several fp32 copies of the (b, S, V/tp) logits alive (the cast, the masked
copy, the shifted logits, their exponentials, the probabilities): 1.2 GB each for a micro-batch of 2 x 1,024
tokens of a 152k vocabulary. Here the forward pass reads the logits in row chunks (at most `CHUNK_BYTES` of fp32
and an eighth of the rows) and keeps per-row statistics only; it saves the logits themselves (the output layer's result, which exists
anyway) and recomputes p chunk by chunk in the backward pass, writing the gradient straight into one buffer of the
logits' dtype. Peak: the logits, their gradient, and two fp32 chunks.

Over the TP group, the per-row statistics combine in one pass: each rank's max m_r, sum s_r = sum exp(z - m_r) and
weighted sum w_r = sum exp(z - m_r) z; with M = max_r m_r, sum exp(z - M) = sum_r s_r exp(m_r - M) (same for w).
The gradient of a rank's shard needs no communication (every rank computes the same loss; Megatron's output layer
sums the input gradients over TP).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CHUNK_BYTES = 256 * 2**20  # fp32 working set per chunk of rows, at most
CHUNKS_AT_LEAST = 8  # and at most 1/8 of the rows: the temporaries stay a fraction of one logits buffer


class _VocabParallelLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets, vocab_start, real_vocab, group, with_entropy, chunk_rows):
        V = logits.shape[-1]
        flat, tgt = logits.reshape(-1, V), targets.reshape(-1)  # (N, V/tp), (N,)
        N, dev = flat.shape[0], logits.device
        stats = torch.empty(3, N, dtype=torch.float32, device=dev)  # local max, sum exp, sum exp * z
        target_logit = torch.zeros(N, dtype=torch.float32, device=dev)
        local_t = tgt - vocab_start
        in_shard = (local_t >= 0) & (local_t < V)
        pad = _padding(vocab_start, V, real_vocab, dev)
        for rows in _chunks(N, chunk_rows):
            z = _masked(flat[rows], pad)  # (n, V/tp) fp32
            m = z.max(dim=-1).values
            e = torch.exp(z - m[:, None])
            stats[0, rows], stats[1, rows] = m, e.sum(-1)
            if with_entropy:
                stats[2, rows] = (e * torch.where(torch.isinf(z), 0.0, z)).sum(-1)
            del e
            hit = in_shard[rows]
            target_logit[rows] = torch.where(hit, z.gather(-1, local_t[rows].clamp(0, V - 1)[:, None])[:, 0], 0.0)
        if group is not None and dist.get_world_size(group) > 1:
            top = stats[0].clone()
            dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
            scale = torch.exp(stats[0] - top)
            sums = torch.stack([stats[1] * scale, stats[2] * scale, target_logit])
            dist.all_reduce(sums, group=group)
            top_all, s, w, target_logit = top, sums[0], sums[1], sums[2]
        else:
            top_all, s, w = stats[0], stats[1], stats[2]
        lse = top_all + torch.log(s)  # (N,)
        logp = target_logit - lse
        entropy = lse - w / s if with_entropy else torch.zeros_like(lse)
        ctx.save_for_backward(logits, targets, lse, entropy)
        ctx.meta = (vocab_start, real_vocab, chunk_rows)
        shape = targets.shape
        return logp.view(shape), entropy.view(shape)

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        logits, targets, lse, entropy = ctx.saved_tensors
        vocab_start, real_vocab, chunk_rows = ctx.meta
        V = logits.shape[-1]
        flat, tgt = logits.reshape(-1, V), targets.reshape(-1)
        N, dev = flat.shape[0], logits.device
        g = (g_logp if g_logp is not None else torch.zeros_like(lse.view(targets.shape))).reshape(-1).float()
        h = (g_entropy if g_entropy is not None else torch.zeros_like(g.view(targets.shape))).reshape(-1).float()
        local_t = tgt - vocab_start
        in_shard = (local_t >= 0) & (local_t < V)
        pad = _padding(vocab_start, V, real_vocab, dev)
        grad = torch.empty_like(flat)  # (N, V/tp), the logits' dtype
        mean_z = lse - entropy  # sum_v p_v z_v
        for rows in _chunks(N, chunk_rows):
            z = _masked(flat[rows], pad)
            p = torch.exp(z - lse[rows, None])  # 0 on padded rows
            zf = torch.where(torch.isinf(z), 0.0, z)
            gz = -p * (g[rows, None] + h[rows, None] * (zf - mean_z[rows, None]))
            del p, zf
            hit = in_shard[rows]
            idx = local_t[rows].clamp(0, V - 1)[:, None]
            gz.scatter_add_(-1, idx, torch.where(hit, g[rows], 0.0)[:, None])
            grad[rows] = gz.to(grad.dtype)
        return grad.view_as(logits), None, None, None, None, None, None


def _chunks(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _padding(vocab_start: int, shard: int, real_vocab: int, device) -> torch.Tensor | None:
    """(V/tp,) True on this shard's padded vocabulary rows (ids >= the real vocab), None when it has none."""
    if vocab_start + shard <= real_vocab:
        return None
    return torch.arange(vocab_start, vocab_start + shard, device=device) >= real_vocab


def _masked(block: torch.Tensor, pad: torch.Tensor | None) -> torch.Tensor:
    z = block.float()
    return z if pad is None else z.masked_fill(pad, float("-inf"))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int, real_vocab: int,
                   group=None, with_entropy: bool = False,
                   chunk_bytes: int = CHUNK_BYTES) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits (b, S, V/tp) of this TP rank's vocabulary shard [vocab_start, vocab_start + V/tp); targets (b, S)
    global ids -> log p(target) (b, S) fp32 and, with_entropy, the entropy (b, S) fp32 (else None).
    group: the TP process group (None or size 1: the whole vocabulary is here)."""
    n = logits.numel() // logits.shape[-1]
    rows = max(1, min(chunk_bytes // (4 * logits.shape[-1]), -(-n // CHUNKS_AT_LEAST)))
    logp, entropy = _VocabParallelLogprobs.apply(logits, targets, vocab_start, real_vocab, group, with_entropy, rows)
    return logp, entropy if with_entropy else None


def reference_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, vocab_start: int, real_vocab: int,
                             group=None, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same quantities by plain autograd (the trainer's implementation before `token_logprobs`): several fp32
    copies of the logits alive at once. Kept as the reference of the tests and of tools/bench_update.py."""
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region as tp_sum

    tp = group is not None and dist.get_world_size(group) > 1
    total = tp_sum if tp else (lambda x: x)
    logits = logits.float()
    shard = logits.shape[-1]
    pad = _padding(vocab_start, shard, real_vocab, logits.device)
    if pad is not None:
        logits = logits.masked_fill(pad, torch.finfo(logits.dtype).min)
    local_max = logits.max(dim=-1).values.detach()
    if tp:
        dist.all_reduce(local_max, op=dist.ReduceOp.MAX, group=group)
    z = logits - local_max.unsqueeze(-1)
    lse = torch.log(total(torch.exp(z).sum(dim=-1)))
    local_t = targets - vocab_start
    in_shard = (local_t >= 0) & (local_t < shard)
    z_t = torch.gather(z, -1, local_t.clamp(0, shard - 1).unsqueeze(-1)).squeeze(-1) * in_shard
    logp = total(z_t) - lse
    if not with_entropy:
        return logp, None
    p = torch.exp(z - lse.unsqueeze(-1))
    return logp, lse - total((p * z).sum(dim=-1))
