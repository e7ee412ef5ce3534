"""The one HF <-> Megatron-Core name/layout table.

Used by tools/convert_*.py (checkpoint conversion) and by the per-step weight sync into vLLM; there is no second
mapping anywhere. Names on the Megatron side are the dist-checkpoint names, which are the TransformerEngine
module names; the local (non-TE) layer spec stores two layer norms under other module names (`local`), and Megatron
itself maps them back to these names in its sharded state dict.

Layouts (H = hidden, hd = head_dim, ng = query groups, hpg = heads per group, F = ffn hidden):
- COPY:    one tensor, same layout on both sides.
- QKV:     HF q (ng*hpg*hd, H), k (ng*hd, H), v (ng*hd, H)  <->  Megatron (ng*(hpg+2)*hd, H), interleaved per query
           group: [q_g0 (hpg*hd); k_g0 (hd); v_g0 (hd); q_g1; ...]. Biases the same with the trailing dim dropped.
           TP splits whole groups, so TP shards concatenate back in order.
- GATE_UP: HF gate (F, H), up (F, H)  <->  Megatron (2F, H) = [gate; up]. Each TP rank holds [gate_r; up_r], so
           shards are split in halves before concatenating.
`tp_dim` is the dimension Megatron splits across tensor-parallel ranks (0 column-parallel / vocab-parallel,
1 row-parallel, None replicated). `vocab` rows are padded with zeros to the padded vocab size (exports drop them).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from harmony_mcore.weights.arch import ArchSpec


class Layout(Enum):
    COPY = "copy"
    QKV = "qkv"
    GATE_UP = "gate_up"


@dataclass(frozen=True)
class WeightRule:
    mcore: str  # dist-checkpoint / TE name; "{i}" is the global layer index
    hf: tuple[str, ...]  # HF names, in the order the layout expects
    layout: Layout = Layout.COPY
    tp_dim: int | None = None
    vocab: bool = False
    local: str | None = None  # module name under Megatron's local layer spec, when it differs
    requires: str | None = None  # ArchSpec flag the rule depends on: "qkv_bias", "qk_norm", "untied"

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.mcore

    def applies(self, arch: ArchSpec) -> bool:
        return {
            None: True,
            "qkv_bias": arch.qkv_bias,
            "qk_norm": arch.qk_norm,
            "untied": not arch.tied_embeddings,
        }[self.requires]

    def mcore_name(self, layer: int | None = None, local_spec: bool = False) -> str:
        name = self.local if (local_spec and self.local) else self.mcore
        return name.format(i=layer) if self.per_layer else name

    def hf_names(self, layer: int | None = None) -> tuple[str, ...]:
        return tuple(n.format(i=layer) for n in self.hf) if self.per_layer else self.hf


_L = "decoder.layers.{i}."
_H = "model.layers.{i}."

RULES: tuple[WeightRule, ...] = (
    WeightRule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), tp_dim=0, vocab=True),
    WeightRule(_L + "self_attention.linear_qkv.layer_norm_weight", (_H + "input_layernorm.weight",),
               local=_L + "input_layernorm.weight"),
    WeightRule(_L + "self_attention.linear_qkv.weight",
               (_H + "self_attn.q_proj.weight", _H + "self_attn.k_proj.weight", _H + "self_attn.v_proj.weight"),
               Layout.QKV, tp_dim=0),
    WeightRule(_L + "self_attention.linear_qkv.bias",
               (_H + "self_attn.q_proj.bias", _H + "self_attn.k_proj.bias", _H + "self_attn.v_proj.bias"),
               Layout.QKV, tp_dim=0, requires="qkv_bias"),
    WeightRule(_L + "self_attention.q_layernorm.weight", (_H + "self_attn.q_norm.weight",), requires="qk_norm"),
    WeightRule(_L + "self_attention.k_layernorm.weight", (_H + "self_attn.k_norm.weight",), requires="qk_norm"),
    WeightRule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), tp_dim=1),
    WeightRule(_L + "mlp.linear_fc1.layer_norm_weight", (_H + "post_attention_layernorm.weight",),
               local=_L + "pre_mlp_layernorm.weight"),
    WeightRule(_L + "mlp.linear_fc1.weight", (_H + "mlp.gate_proj.weight", _H + "mlp.up_proj.weight"),
               Layout.GATE_UP, tp_dim=0),
    WeightRule(_L + "mlp.linear_fc2.weight", (_H + "mlp.down_proj.weight",), tp_dim=1),
    WeightRule("decoder.final_layernorm.weight", ("model.norm.weight",)),
    WeightRule("output_layer.weight", ("lm_head.weight",), tp_dim=0, vocab=True, requires="untied"),
)


def rules_for(arch: ArchSpec) -> list[WeightRule]:
    return [r for r in RULES if r.applies(arch)]


def expected_hf_names(arch: ArchSpec) -> list[str]:
    """Every HF tensor name a checkpoint of this architecture must contain, in table order."""
    names: list[str] = []
    for rule in rules_for(arch):
        layers = range(arch.num_layers) if rule.per_layer else [None]
        for i in layers:
            names.extend(rule.hf_names(i))
    return names


_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")


def match_module_name(name: str, arch: ArchSpec) -> tuple[WeightRule, int | None]:
    """Find the rule of a Megatron module parameter name (TE or local spec, any layer index).

    Returns (rule, layer index as written in `name`); raises KeyError for names outside the table.
    """
    m = _LAYER_RE.match(name)
    layer, key = (int(m.group(1)), _L + m.group(2)) if m else (None, name)
    for rule in rules_for(arch):
        if key in (rule.mcore, rule.local):
            return rule, layer
    raise KeyError(f"{name}: not in the HF<->mcore table for {arch.family}")


# --- layout transforms on full (unsharded) tensors ---------------------------------------------------------------

def _check_parts(rule: WeightRule, parts: Sequence[torch.Tensor]) -> None:
    if len(parts) != len(rule.hf):
        raise ValueError(f"{rule.mcore}: expected {len(rule.hf)} HF tensors, got {len(parts)}")


def to_mcore(rule: WeightRule, parts: Sequence[torch.Tensor], arch: ArchSpec, padded_vocab: int) -> torch.Tensor:
    """HF tensors (in `rule.hf` order) -> the full Megatron tensor."""
    _check_parts(rule, parts)
    if rule.layout is Layout.QKV:
        q, k, v = parts
        ng, hd, hpg = arch.num_query_groups, arch.head_dim, arch.heads_per_group
        tail = q.shape[1:]  # (H,) for weights, () for biases
        qkv = torch.cat(
            [q.reshape(ng, hpg * hd, *tail), k.reshape(ng, hd, *tail), v.reshape(ng, hd, *tail)], dim=1
        )  # (ng, (hpg+2)*hd, *tail)
        return qkv.reshape(ng * (hpg + 2) * hd, *tail)
    if rule.layout is Layout.GATE_UP:
        return torch.cat(list(parts), dim=0)  # (2F, H)
    (t,) = parts
    if rule.vocab and t.shape[0] != padded_vocab:
        pad = t.new_zeros(padded_vocab - t.shape[0], *t.shape[1:])
        t = torch.cat([t, pad], dim=0)  # (padded_vocab, H)
    return t


def to_hf(rule: WeightRule, full: torch.Tensor, arch: ArchSpec) -> tuple[torch.Tensor, ...]:
    """The full Megatron tensor -> HF tensors in `rule.hf` order (vocab padding removed). Views where possible."""
    if rule.layout is Layout.QKV:
        ng, hd, hpg = arch.num_query_groups, arch.head_dim, arch.heads_per_group
        tail = full.shape[1:]
        grouped = full.reshape(ng, (hpg + 2) * hd, *tail)
        q, k, v = torch.split(grouped, [hpg * hd, hd, hd], dim=1)
        return (q.reshape(ng * hpg * hd, *tail), k.reshape(ng * hd, *tail), v.reshape(ng * hd, *tail))
    if rule.layout is Layout.GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return gate, up
    return (full[: arch.vocab_size] if rule.vocab else full,)


# --- tensor-parallel sharding ----------------------------------------------------------------------------------

def tp_shard(rule: WeightRule, full: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of the full Megatron tensor, in the layout Megatron keeps on that rank."""
    if rule.tp_dim is None or size == 1:
        return full
    if full.shape[rule.tp_dim] % size:
        raise ValueError(f"{rule.mcore}: dim {rule.tp_dim} of {tuple(full.shape)} does not split into TP={size}")
    if rule.layout is Layout.GATE_UP:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], dim=0)
    return torch.chunk(full, size, dim=rule.tp_dim)[rank]


def tp_unshard(rule: WeightRule, shards: Sequence[torch.Tensor]) -> torch.Tensor:
    """Inverse of tp_shard: TP-rank-ordered shards -> the full Megatron tensor."""
    if rule.tp_dim is None or len(shards) == 1:
        return shards[0]
    if rule.layout is Layout.GATE_UP:
        halves = [torch.chunk(s, 2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
    return torch.cat(list(shards), dim=rule.tp_dim)
