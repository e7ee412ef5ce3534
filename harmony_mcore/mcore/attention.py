"""Fused core attention for Megatron's local layer spec (the spec used where TransformerEngine is absent).

Megatron's local `DotProductAttention` materialises the (b, heads, s, s) scores in the parameters' dtype, then a
softmax in fp32 and the probabilities: O(s^2) memory per layer and three unfused kernels. `SdpaAttention` keeps
its constructor (heads per partition, softmax scale, checkpoint state: it is a drop-in `core_attention`) and
computes

    out = softmax(q k^T * scale + causal mask) v        per head, keys/values shared within each query group

with `torch.nn.functional.scaled_dot_product_attention`: flash or memory-efficient kernels on CUDA, the fused
kernel on CPU, never the full score matrix. Deliberate limits: causal masking only (the trainer's batches are
right-padded, so causal attention never lets a real token see padding, and the mask argument Megatron passes along
is not consulted), no attention dropout (the trainer sets it to 0), no packed sequences, no attention bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention


class SdpaAttention(DotProductAttention):
    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> torch.Tensor:
        """query (sq, b, np, hn); key, value (sk, b, ng, hn) -> context (sq, b, np * hn)."""
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SdpaAttention: packed sequences and attention bias are not supported")
        if self.config.attention_dropout:
            raise NotImplementedError("SdpaAttention: attention dropout is not supported (the trainer uses 0)")
        sq, b = query.shape[0], query.shape[1]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # (b, heads, s, hn)
        context = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=self.softmax_scale,
            enable_gqa=self.num_attention_heads_per_partition != self.num_query_groups_per_partition)
        return context.permute(2, 0, 1, 3).reshape(sq, b, self.hidden_size_per_partition)  # (sq, b, np * hn)
