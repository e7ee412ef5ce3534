"""`harmony-mcore plan`: does a run config fit a GPU cluster? Layout checks, exact parameter counts, memory.

    harmony-mcore plan --config configs/recipes/qwen3_8b_base_math500_1x8.yaml --nodes 1 --gpus-per-node 8
    python -m harmony_mcore.plan --config X --nodes 2 --gpus-per-node 8 [--gpu-mem-gib 80] [--show-config] \
        [key=value ...]

Exit status: 0 it fits, 1 it does not, 2 a config or layout error; the reason is printed in every case.
Nothing is allocated and no GPU is needed: the 8B+ runs are simulated on any machine.

Layout rules (`layout_problems`): nodes x gpus-per-node must equal the TP x PP x DP training GPUs when the
vLLM engines are colocated (and rollout.engines x rollout.engine_tp must equal them too: one engine shard per
GPU), or TP x PP x DP + engines x engine_tp when they are disaggregated. TP divides the attention heads,
the query groups, the FFN width and the padded vocab; PP divides the layers; engine_tp divides the heads,
the query groups and the padded vocab; with fixed micro-batches, the micro-batch size divides the sequences of
one update on one DP rank and a pipeline gets at least PP micro-batches per update (token-budget micro-batches
are split to at least PP); prompt + response fit the model's positions.

Parameters are counted, not estimated: the real GPTModel of every (tp_rank, pp_rank) is built by
`harmony_mcore.mcore.model.build_gpt` (the training builder) on the meta device, in one process that takes
that rank of a TP x PP world through torch's "fake" process-group backend (collectives are no-ops) and
Megatron's own `initialize_model_parallel`. It builds the local layer spec: the TransformerEngine spec holds
the same parameters (it fuses the norm weights into the following linear layers).

Memory model, bytes per GPU. P_r: parameters on rank r (its stage's layers, its TP shard, the padded vocab
rows it holds and, with PP > 1 and tied embeddings, the last stage's trained copy of the embedding).
w: bytes per weight (2 bf16, 4 float32). s = rollout.max_prompt_tokens + rollout.max_response_tokens (the
longest sequence); T = the padded tokens of the largest micro-batch: parallel.max_tokens_per_micro_batch with
token-budget micro-batches (default micro_batch_size x s), s x micro_batch_size with fixed ones; t = TP; h hidden,
F ffn, a heads, g query groups, d head_dim, V padded vocab, L_r layers of the stage.

Training state, resident all run (Megatron DDP + distributed optimizer):
    weights    = w * P_r
    grads      = 4 * P_r                        fp32 main-grad buffer of Megatron's DDP
    optimizer  = (12 if bf16 else 8) * P_r / DP fp32 master weights (bf16 only) + Adam m, v; sharded over DP
    reference  = w * P_r if grpo.kl_coef > 0    frozen reference policy for the KL term, forward only
    overhead   = 2 GiB                          CUDA context, NCCL communicators, allocator slack
Activations (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", no
sequence parallelism), per layer and micro-batch, generalised to GQA, q/k norms and SwiGLU:
    layer = T*(10h + [2d(2a + 2g') + 2d(a + g)*qk_norm + 6F] / t) + 5*a*s*T/t * unfused
      10h       inputs of the two norms, the QKV and the first MLP linear, two dropout masks (replicated
                over TP; the masks are counted although dropout is 0: a conservative estimate)
      2d(2a+2g') Q, K, V and the attention output; g' = g with TransformerEngine's attention, g' = a with torch
                SDPA (model.attention=sdpa, the local spec's default; its kernels may expand K/V for GQA) and
                with Megatron's unfused attention, which expands K and V to every head
      2d(a+g)   the inputs of Qwen3's q/k norms
      6F        SwiGLU: gate and up outputs (4F) and its output (2F); the paper's GeLU MLP stores 4F = 16h
      5as^2b    scores, softmax output and its dropout (T/s sequences of s^2), only with model.attention=unfused
    stage = n_r * (L_r * layer + [first stage] 2Th + [last stage] (4Th + 2w*T*V/t + 3c))
      embedding output; final-norm and output-layer inputs; the logits and, during the log-prob path's
      backward, their gradient (both in the parameters' dtype) and three fp32 chunks of c = min(256 MiB,
      4*T*V/t / 8) bytes (harmony_mcore.mcore.logprobs)
      n_r = min(PP - pp_rank, micro-batches per update): 1F1B keeps the activations of PP - pp_rank
      micro-batches on stage pp_rank (1 without PP).
    model.recompute (Megatron's full, uniform recompute of every layer) keeps each layer's input instead:
    stage = n_r * (L_r * 2Th + first/last terms) + layer (one layer is recomputed at a time).
vLLM, per GPU of an engine with TP e:
    reservation = rollout.gpu_memory_utilization * GPU memory (vLLM claims it when it starts or wakes)
    weights     = w * P(e)          the Megatron count of the same model at TP = e, PP = 1
    workspace   = T*2*(2h + (a + 2g)d/e + 3F/e) + S*V*8 + 1 GiB [+ 1 GiB CUDA graphs unless enforce_eager]
                  activation profile of T = max(s, 8192) batched tokens (harmony_mcore.rollout.engine's
                  max_num_batched_tokens); fp32 logits and probabilities of S = 1024 sequences (vLLM's
                  max_num_seqs on 80 GB GPUs); the engine's CUDA context and NCCL
    KV cache    = reservation - weights - workspace, at 2*L*(g/e)*d*2 bytes per token; it must hold one
                  sequence of s tokens, or vLLM refuses to start
Phases of one GPU, with resident = weights + grads + optimizer + reference + overhead (Megatron's state stays
on the GPU while vLLM generates: nothing is offloaded):
    colocated  train   = resident + activations + (1 GiB vLLM residue asleep | reservation awake)
               rollout = resident + reservation + rollout.sync_bucket_mb (the weight-sync bucket)
               peak    = max(train, rollout) with rollout.sleep_while_training, else train with vLLM awake
    disaggregated: training GPUs peak = resident + activations; engine GPUs peak = reservation.
It fits when every GPU's peak is at most --gpu-mem-gib and every engine's KV cache holds one full sequence.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache, reduce
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch.overrides import TorchFunctionMode

from harmony_mcore.config import Config, ConfigError, config_layers, load_config
from harmony_mcore.mcore.parallel import layout_errors
from harmony_mcore.rollout.engine import MIN_BATCHED_TOKENS
from harmony_mcore.weights.arch import ArchError, ArchSpec
from harmony_mcore.weights.presets import PresetError, arch_for, arch_source

GIB = 1024**3
MIB = 1024**2
WEIGHT_BYTES = {"bfloat16": 2, "float32": 4}
GRAD_BYTES = 4  # fp32 main grads
ADAM_BYTES = {"bfloat16": 12, "float32": 8}  # fp32 master (bf16 only) + m + v
TRAIN_OVERHEAD = 2 * GIB
VLLM_RUNTIME = 1 * GIB
VLLM_CUDA_GRAPHS = 1 * GIB
VLLM_SLEEP_RESIDUE = 1 * GIB
VLLM_MAX_SEQS = 1024
KV_BYTES = 2  # bf16 KV cache


class PlanError(ValueError):
    """A config or layout the planner refuses, with every reason."""


@dataclass(frozen=True)
class Hardware:
    """The GPUs a plan is made for (harmony_mcore.cluster.Cluster is a run's Ray actors)."""

    nodes: int
    gpus_per_node: int
    gpu_mem_gib: float = 80.0

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def gpu_mem(self) -> int:
        return int(self.gpu_mem_gib * GIB)


# ------------------------------------------------------------------------------------------------ layout


@dataclass(frozen=True)
class BatchShape:
    """Sequences of one training step, as Megatron sees them on one data-parallel rank."""

    seq_len: int  # s: prompt + response tokens, the longest a sequence can be
    micro_batch: int  # b
    sequences_per_update: int  # per DP rank and optimizer step
    tokens: int  # T: padded tokens of the largest micro-batch (s * b with fixed micro-batches, else the budget)
    packed: bool  # token-budget micro-batches (parallel.micro_batching=tokens)

    @classmethod
    def of(cls, cfg: Config) -> BatchShape:
        from harmony_mcore.mcore.policy import micro_batch_tokens

        r, t, p = cfg.rollout, cfg.train, cfg.parallel
        per_step = t.questions_per_step * len(cfg.labels.views) * r.n_per_view
        seq_len = r.max_prompt_tokens + r.max_response_tokens
        packed = p.micro_batching == "tokens"
        return cls(seq_len=seq_len, micro_batch=p.micro_batch_size,
                   sequences_per_update=per_step // p.dp // cfg.grpo.updates_per_step,
                   tokens=micro_batch_tokens(cfg) if packed else seq_len * p.micro_batch_size, packed=packed)

    @property
    def micro_batches(self) -> int:
        return self.sequences_per_update // self.micro_batch


def _world_problems(cfg: Config, cluster: Hardware) -> list[str]:
    p, r = cfg.parallel, cfg.rollout
    train_gpus, engine_gpus = p.tp * p.pp * p.dp, r.engines * r.engine_tp
    layout = f"parallel.tp x pp x dp = {p.tp} x {p.pp} x {p.dp} = {train_gpus}"
    engines = f"rollout.engines x engine_tp = {r.engines} x {r.engine_tp} = {engine_gpus}"
    have = f"{cluster.nodes} node(s) x {cluster.gpus_per_node} GPUs = {cluster.gpus}"
    if r.placement == "colocated":
        problems = []
        if train_gpus != cluster.gpus:
            problems.append(f"{layout} training GPUs, but the cluster has {have}")
        if engine_gpus != train_gpus:
            problems.append(f"{engines} GPUs must equal the {train_gpus} training GPUs in colocated "
                            "placement (one engine shard per GPU)")
        return problems
    if train_gpus + engine_gpus != cluster.gpus:
        return [f"{layout} training GPUs + {engines} engine GPUs = {train_gpus + engine_gpus}, but the "
                f"cluster has {have} (disaggregated placement)"]
    return []


def _engine_problems(arch: ArchSpec, engine_tp: int, padded_vocab: int) -> list[str]:
    sizes = ((arch.num_heads, "attention heads"), (arch.num_query_groups, "query groups (KV heads)"),
             (padded_vocab, "padded vocab rows"))
    return [f"rollout.engine_tp={engine_tp} does not divide the {n} {what}"
            for n, what in sizes if n % engine_tp]


def _batch_problems(cfg: Config, arch: ArchSpec, shape: BatchShape) -> list[str]:
    problems, pp, mbs = [], cfg.parallel.pp, f"parallel.micro_batch_size={shape.micro_batch}"
    if shape.packed:
        pass  # token-budget micro-batches: any count of sequences, split to at least PP micro-batches
    elif shape.sequences_per_update % shape.micro_batch:
        problems.append(f"{mbs} does not divide the {shape.sequences_per_update} sequences per data-parallel "
                        "rank and update")
    elif pp > 1 and shape.micro_batches < pp:
        problems.append(f"{mbs} leaves {shape.micro_batches} micro-batches per update, fewer than the "
                        f"parallel.pp={pp} pipeline stages")
    if shape.seq_len > arch.max_position_embeddings:
        problems.append(f"rollout.max_prompt_tokens + max_response_tokens = {shape.seq_len} exceeds the "
                        f"model's {arch.max_position_embeddings} positions")
    return problems


def _node_warnings(cfg: Config, cluster: Hardware) -> list[str]:
    groups = {f"parallel.tp={cfg.parallel.tp}": cfg.parallel.tp,
              f"rollout.engine_tp={cfg.rollout.engine_tp}": cfg.rollout.engine_tp}
    return [f"{name} does not fit inside one node of {cluster.gpus_per_node} GPUs: its all-reduces cross "
            "nodes" for name, size in groups.items() if cluster.gpus_per_node % size]


def layout_problems(cfg: Config, arch: ArchSpec, cluster: Hardware) -> list[str]:
    """Every reason this config cannot run on this cluster (empty when it can)."""
    p, padded = cfg.parallel, arch.padded_vocab_size(cfg.model.vocab_multiple)
    return (_world_problems(cfg, cluster)
            + layout_errors(arch, tp=p.tp, pp=p.pp, padded_vocab=padded)
            + _engine_problems(arch, cfg.rollout.engine_tp, padded)
            + _batch_problems(cfg, arch, BatchShape.of(cfg)))


# ---------------------------------------------------------------------------------------------- counting


@dataclass(frozen=True)
class RankParams:
    """What the GPTModel of one (tp_rank, pp_rank) holds, counted on the meta-device build."""

    tp_rank: int
    pp_rank: int
    first_layer: int
    num_layers: int
    params: int  # every parameter on the rank (padded vocab rows, tied copy included)
    unique: int  # those no other rank holds too (TP-replicated norms only on tp_rank 0, no tied copy)
    embedding: bool  # holds the word embeddings (first stage)
    last_stage: bool  # computes the logits (tied and PP = 1: with the embedding itself)
    output: bool  # holds an output-layer weight (last stage; untied, or the tied copy when PP > 1)
    tied_copy: bool  # that weight is the last stage's copy of the tied embedding (PP > 1)

    @property
    def layers(self) -> str:
        return f"{self.first_layer}-{self.first_layer + self.num_layers - 1}" if self.num_layers else "-"


class _KeepMeta(TorchFunctionMode):
    """Megatron moves the tied embedding to the GPU before its first/last-stage all-reduce; a meta tensor
    stays on the meta device instead (it has no data to move, and this machine may have no GPU)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.cuda and args[0].is_meta:
            return args[0]
        return func(*args, **(kwargs or {}))


@contextmanager
def _as_rank(tp: int, pp: int, tp_rank: int, pp_rank: int) -> Iterator[None]:
    """Makes this process (tp_rank, pp_rank) of a TP x PP world for Megatron: a "fake" process group of that
    size, then Megatron's own group construction. DP = 1: data-parallel replicas hold the same model."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if dist.is_initialized() or ps.model_parallel_is_initialized():
        raise RuntimeError("the planner simulates its own process group: run it in a process without one")
    # Megatron orders ranks tp fastest, then dp, then pp.
    dist.init_process_group("fake", rank=tp_rank + tp * pp_rank, world_size=tp * pp)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                     create_gloo_process_groups=False)
        got = (ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank())
        assert got == (tp_rank, pp_rank), f"Megatron placed the rank at {got}, not {(tp_rank, pp_rank)}"
        yield
    finally:
        if ps.model_parallel_is_initialized():
            ps.destroy_model_parallel()
        dist.destroy_process_group()


def _count(model, arch: ArchSpec, tp_rank: int, pp_rank: int) -> RankParams:
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

    from harmony_mcore.mcore.model import layer_offset

    params = list(model.parameters())  # a tied weight on one stage is one Parameter, counted once
    tied_copy = arch.tied_embeddings and model.post_process and not model.pre_process
    copy = model.output_layer.weight.numel() if tied_copy else 0
    return RankParams(
        tp_rank=tp_rank, pp_rank=pp_rank, first_layer=layer_offset(model),
        num_layers=len(model.decoder.layers), params=sum(p.numel() for p in params),
        unique=sum(p.numel() for p in params if param_is_not_tensor_parallel_duplicate(p)) - copy,
        embedding=model.pre_process, last_stage=model.post_process,
        output=model.post_process and (tied_copy or not arch.tied_embeddings), tied_copy=tied_copy)


@cache
def count_rank_params(arch: ArchSpec, padded_vocab: int, tp: int, pp: int,
                      dtype: str = "bfloat16") -> tuple[RankParams, ...]:
    """Parameters of every (tp_rank, pp_rank), from the real Megatron model built on the meta device."""
    from harmony_mcore.mcore.model import build_gpt

    counts = []
    for pp_rank in range(pp):
        for tp_rank in range(tp):
            with (_as_rank(tp, pp, tp_rank, pp_rank), warnings.catch_warnings(), torch.device("meta"),
                  _KeepMeta()):
                warnings.simplefilter("ignore")  # Megatron's deprecation notices, once per build
                model = build_gpt(arch, padded_vocab, dtype=dtype, spec="local")
                counts.append(_count(model, arch, tp_rank, pp_rank))
    return tuple(counts)


def unpadded_total(arch: ArchSpec, padded_total: int, padded_vocab: int) -> int:
    """The published count: Megatron's total less the padding rows of the embedding (and untied output)."""
    vocab_matrices = 1 if arch.tied_embeddings else 2
    return padded_total - (padded_vocab - arch.vocab_size) * arch.hidden_size * vocab_matrices


# ------------------------------------------------------------------------------------------------ memory


@dataclass(frozen=True)
class ActivationModel:
    """The Korthikanti et al. terms (see the module docstring) for one architecture, TP and batch shape."""

    arch: ArchSpec
    tp: int
    vocab: int  # padded
    shape: BatchShape
    attention: str  # "te" (TransformerEngine), "sdpa" (torch's fused kernels) or "unfused" (Megatron local)
    recompute: bool  # Megatron full/uniform recompute
    weight_bytes: int = 2  # w: logits and their gradient are in the parameters' dtype

    def layer(self) -> int:
        """Bytes one layer keeps for its backward, one micro-batch of T = s*b tokens (or the token budget)."""
        a, T, s, t = self.arch, self.shape.tokens, self.shape.seq_len, self.tp
        kv_heads = a.num_query_groups if self.attention == "te" else a.num_heads  # SDPA may expand K/V for GQA
        sharded = (2 * a.head_dim * (2 * a.num_heads + 2 * kv_heads)
                   + 2 * a.head_dim * (a.num_heads + a.num_query_groups) * a.qk_norm
                   + 6 * a.ffn_hidden_size)
        scores = 5 * a.num_heads * s * T // t if self.attention == "unfused" else 0  # T / s sequences x s^2
        return T * (10 * a.hidden_size + sharded // t) + scores

    def ends(self, first: bool, last: bool) -> int:
        """Embedding output (first stage); final-norm and output-layer inputs, the logits and, at the backward
        of the log-prob path, their gradient plus three fp32 chunks of at most an eighth of them
        (harmony_mcore.mcore.logprobs) (last stage)."""
        from harmony_mcore.mcore.logprobs import CHUNK_BYTES, CHUNKS_AT_LEAST

        T, h = self.shape.tokens, self.arch.hidden_size
        logits = T * self.vocab // self.tp
        chunk = min(CHUNK_BYTES, 4 * logits // CHUNKS_AT_LEAST)
        return first * 2 * T * h + last * (4 * T * h + 2 * self.weight_bytes * logits + 3 * chunk)

    def stage(self, rank: RankParams, pp: int) -> int:
        """Bytes of activations stage `rank.pp_rank` holds at its peak under 1F1B."""
        inflight = min(pp - rank.pp_rank, self.shape.micro_batches)
        ends = self.ends(rank.embedding, rank.last_stage)
        if not self.recompute:
            return inflight * (rank.num_layers * self.layer() + ends)
        layer_input = 2 * self.shape.tokens * self.arch.hidden_size
        return inflight * (rank.num_layers * layer_input + ends) + self.layer() * (rank.num_layers > 0)


@dataclass(frozen=True)
class TrainingMemory:
    """Megatron's bytes on one GPU (formulas in the module docstring)."""

    weights: int
    grads: int
    optimizer: int
    reference: int
    activations: int
    overhead: int = TRAIN_OVERHEAD

    @property
    def resident(self) -> int:
        return self.weights + self.grads + self.optimizer + self.reference + self.overhead

    @property
    def peak(self) -> int:
        return self.resident + self.activations


def training_memory(cfg: Config, rank: RankParams, activations: ActivationModel) -> TrainingMemory:
    weight, n, p = WEIGHT_BYTES[cfg.model.dtype], rank.params, cfg.parallel
    return TrainingMemory(
        weights=weight * n, grads=GRAD_BYTES * n, optimizer=ADAM_BYTES[cfg.model.dtype] * n // p.dp,
        reference=weight * n if cfg.grpo.kl_coef > 0 else 0, activations=activations.stage(rank, p.pp))


@dataclass(frozen=True)
class VllmMemory:
    """One GPU of a vLLM engine (formulas in the module docstring)."""

    engine_tp: int
    reservation: int
    weights: int
    workspace: int
    kv_per_token: int
    seq_len: int

    @property
    def kv_cache(self) -> int:
        return self.reservation - self.weights - self.workspace

    @property
    def kv_tokens(self) -> int:
        return max(self.kv_cache, 0) // self.kv_per_token

    @property
    def sequences(self) -> int:
        """Full-length sequences the engine's KV cache holds at once."""
        return self.kv_tokens // self.seq_len


def vllm_memory(cfg: Config, arch: ArchSpec, padded_vocab: int, cluster: Hardware) -> VllmMemory:
    a, e = arch, cfg.rollout.engine_tp
    shard = count_rank_params(arch, padded_vocab, e, 1, cfg.model.dtype)[0]
    profile_per_token = 2 * (2 * a.hidden_size + ((a.num_heads + 2 * a.num_query_groups) * a.head_dim
                                                  + 3 * a.ffn_hidden_size) // e)
    batched_tokens = max(BatchShape.of(cfg).seq_len, MIN_BATCHED_TOKENS)
    workspace = (batched_tokens * profile_per_token + VLLM_MAX_SEQS * padded_vocab * 8 + VLLM_RUNTIME
                 + (0 if cfg.rollout.enforce_eager else VLLM_CUDA_GRAPHS))
    return VllmMemory(
        engine_tp=e, reservation=int(cfg.rollout.gpu_memory_utilization * cluster.gpu_mem),
        weights=WEIGHT_BYTES[cfg.model.dtype] * shard.params, workspace=workspace,
        kv_per_token=2 * a.num_layers * (a.num_query_groups // e) * a.head_dim * KV_BYTES,
        seq_len=BatchShape.of(cfg).seq_len)


@dataclass(frozen=True)
class GpuPhases:
    """Bytes on one GPU while Megatron trains and while vLLM generates; peak is what the GPU must hold."""

    train: int
    rollout: int  # 0 where no engine shares the GPU

    @property
    def peak(self) -> int:
        return max(self.train, self.rollout)

    @property
    def worst_phase(self) -> str:
        return "training" if self.train >= self.rollout else "rollout"


def gpu_phases(cfg: Config, train: TrainingMemory, vllm: VllmMemory) -> GpuPhases:
    r = cfg.rollout
    if r.placement == "disaggregated":
        return GpuPhases(train=train.peak, rollout=0)
    asleep = VLLM_SLEEP_RESIDUE if r.sleep_while_training else vllm.reservation
    return GpuPhases(train=train.peak + asleep,
                     rollout=train.resident + vllm.reservation + r.sync_bucket_mb * MIB)


# -------------------------------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class RankPlan:
    params: RankParams
    memory: TrainingMemory
    phases: GpuPhases

    @property
    def name(self) -> str:
        return f"tp {self.params.tp_rank} pp {self.params.pp_rank}"


@dataclass(frozen=True)
class Plan:
    config: Config
    cluster: Hardware
    arch: ArchSpec
    source: str  # where the architecture came from
    padded_vocab: int
    total_padded: int
    total: int  # unpadded vocab: the published count
    shape: BatchShape
    attention: str  # te | sdpa | unfused
    ranks: tuple[RankPlan, ...]
    vllm: VllmMemory
    warnings: tuple[str, ...]

    def worst(self) -> RankPlan:
        return max(self.ranks, key=lambda r: r.phases.peak)

    def problems(self) -> list[str]:
        """Why it does not fit (empty when it does)."""
        out, worst = [], self.worst()
        over = sum(r.phases.peak > self.cluster.gpu_mem for r in self.ranks)
        if over:
            out.append(f"rank {worst.name} needs {_gib(worst.phases.peak)} GiB in the "
                       f"{worst.phases.worst_phase} phase > {self.cluster.gpu_mem_gib:g} GiB ({over} of "
                       f"{len(self.ranks)} ranks over)")
        if self.vllm.sequences < 1:
            out.append(f"the vLLM KV cache of {_gib(self.vllm.kv_cache)} GiB per GPU cannot hold one "
                       f"{self.shape.seq_len}-token sequence (raise rollout.gpu_memory_utilization or "
                       "rollout.engine_tp)")
        return out

    @property
    def fits(self) -> bool:
        return not self.problems()


def make_plan(cfg: Config, cluster: Hardware) -> Plan:
    """Check the layout, count every rank's parameters, estimate every GPU's memory. PlanError: bad layout."""
    try:
        arch = arch_for(cfg.model)
    except (PresetError, ArchError) as err:
        raise PlanError(str(err)) from None
    problems = layout_problems(cfg, arch, cluster)
    if problems:
        raise PlanError("impossible layout: " + "; ".join(problems))
    p, padded, shape = cfg.parallel, arch.padded_vocab_size(cfg.model.vocab_multiple), BatchShape.of(cfg)
    # auto and te resolve to TransformerEngine on a GPU; the local spec's attention is model.attention
    attention = "te" if cfg.model.layer_spec != "local" else cfg.model.attention
    activations = ActivationModel(arch, p.tp, padded, shape, attention, cfg.model.recompute,
                                  WEIGHT_BYTES[cfg.model.dtype])
    vllm = vllm_memory(cfg, arch, padded, cluster)
    counts = count_rank_params(arch, padded, p.tp, p.pp, cfg.model.dtype)
    ranks = []
    for rank in counts:
        memory = training_memory(cfg, rank, activations)
        ranks.append(RankPlan(rank, memory, gpu_phases(cfg, memory, vllm)))
    total_padded = sum(r.unique for r in counts)
    return Plan(config=cfg, cluster=cluster, arch=arch, source=arch_source(cfg.model), padded_vocab=padded,
                total_padded=total_padded, total=unpadded_total(arch, total_padded, padded), shape=shape,
                attention=attention, ranks=tuple(ranks), vllm=vllm, warnings=tuple(_node_warnings(cfg, cluster)))


# ------------------------------------------------------------------------------------------------ report


def _gib(n: int) -> str:
    return f"{n / GIB:.1f}"


def _holds(rank: RankParams) -> str:
    parts = ["emb" + ("=out" if rank.last_stage and not rank.output else "")] if rank.embedding else []
    parts.append(f"L{rank.layers}")
    if rank.output:
        parts.append("out(tied copy)" if rank.tied_copy else "out")
    return "+".join(parts)


def _grouped(ranks: Sequence[RankPlan]) -> list[tuple[str, RankPlan]]:
    """Table rows: the TP ranks of one stage with identical counts and memory share a row."""
    groups: list[list[RankPlan]] = []
    for r in ranks:
        head = groups[-1][0] if groups else None
        if head and (head.params.pp_rank, head.params.params, head.memory) == (
                r.params.pp_rank, r.params.params, r.memory):
            groups[-1].append(r)
        else:
            groups.append([r])
    return [(f"tp {g[0].params.tp_rank}{f'-{g[-1].params.tp_rank}' if len(g) > 1 else ''} "
             f"pp {g[0].params.pp_rank}", g[0]) for g in groups]


COLUMNS = ("rank", "holds", "params", "weights", "grads", "optim", "ref", "act", "other", "train", "rollout",
           "peak", "free")


def _table(plan: Plan) -> list[str]:
    mem = plan.cluster.gpu_mem
    rows = [COLUMNS]
    for label, r in _grouped(plan.ranks):
        m, ph = r.memory, r.phases
        rows.append((label, _holds(r.params), f"{r.params.params / 1e9:.3f}B",
                     *map(_gib, (m.weights, m.grads, m.optimizer, m.reference, m.activations, m.overhead,
                                 ph.train)),
                     _gib(ph.rollout) if ph.rollout else "-", _gib(ph.peak), _gib(mem - ph.peak)))
    if plan.config.rollout.placement == "disaggregated":
        v = plan.vllm
        rows.append(("vLLM GPU", f"engine TP {v.engine_tp}", "", _gib(v.weights), "", "", "", "",
                     _gib(v.workspace), "-", *map(_gib, (v.reservation, v.reservation, mem - v.reservation))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.ljust(w) if i < 2 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))) for row in rows]
    return lines + ["(GiB per GPU; other = CUDA context, NCCL and allocator slack)"]


def _header(plan: Plan) -> list[str]:
    a, c, p, r, s = plan.arch, plan.cluster, plan.config.parallel, plan.config.rollout, plan.shape
    tied = "tied" if a.tied_embeddings else "untied"
    sleep = ", asleep while training" if r.placement == "colocated" and r.sleep_while_training else ""
    attention = {"te": "TransformerEngine (flash)", "sdpa": "torch SDPA (flash)", "unfused": "unfused"}[
        plan.attention]
    recompute = "full recompute" if plan.config.model.recompute else "no recompute"
    return [
        f"model       {a.family} ({plan.source}): {a.num_layers} layers, hidden {a.hidden_size}, "
        f"{a.num_heads} heads / {a.num_query_groups} query groups, ffn {a.ffn_hidden_size}, vocab "
        f"{a.vocab_size} (padded {plan.padded_vocab}), {tied} embeddings",
        f"parameters  {plan.total:,} (with the padded vocab: {plan.total_padded:,})",
        f"cluster     {c.nodes} node(s) x {c.gpus_per_node} GPUs x {c.gpu_mem_gib:g} GiB",
        f"layout      TP {p.tp} x PP {p.pp} x DP {p.dp} training GPUs; {r.engines} vLLM engine(s) x TP "
        f"{r.engine_tp}, {r.placement}{sleep}",
        f"batch       {s.sequences_per_update} sequences of up to {s.seq_len} tokens per DP rank and update, "
        + (f"micro-batches of at most {s.tokens:,} padded tokens" if s.packed else
           f"{s.micro_batches} micro-batches of {s.micro_batch}") + f"; attention {attention}, {recompute}",
    ]


def _notes(plan: Plan) -> list[str]:
    v = plan.vllm
    lines = [f"vLLM        per engine GPU: reservation {_gib(v.reservation)} GiB = weights "
             f"{_gib(v.weights)} + workspace {_gib(v.workspace)} + KV cache {_gib(v.kv_cache)} GiB "
             f"({v.kv_tokens:,} tokens = {v.sequences} sequences of {v.seq_len} at once per engine)"]
    copy = next((r.params for r in plan.ranks if r.params.tied_copy), None)
    if copy is not None:
        lines.append(f"note        the last stage trains a copy of the tied embedding "
                     f"({copy.params - copy.unique:,} parameters per TP rank), kept equal to the first "
                     "stage's by an all-reduce of their gradients")
    return lines + [f"warning: {w}" for w in plan.warnings]


def verdict(plan: Plan) -> str:
    problems = plan.problems()
    if problems:
        return "VERDICT: DOES NOT FIT: " + "; ".join(problems)
    worst = plan.worst()
    return (f"VERDICT: FITS: peak {_gib(worst.phases.peak)} GiB of {plan.cluster.gpu_mem_gib:g} GiB on rank "
            f"{worst.name} ({worst.phases.worst_phase} phase)")


def render(plan: Plan) -> str:
    return "\n".join(_header(plan) + [""] + _table(plan) + _notes(plan) + [verdict(plan)])


# --------------------------------------------------------------------------------------------------- CLI


def add_plan_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `plan` subcommand's options (for the top-level `harmony-mcore` parser to reuse); sets func."""
    parser.add_argument("--config", required=True,
                        help="run config YAML; a top-level `base: <path>` extends another file (the recipes "
                             "extend configs/recipes/base/self_harmony_math500.yaml). The first line printed "
                             "names the file and its bases")
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--gpus-per-node", type=int, required=True)
    parser.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument("--show-config", action="store_true",
                        help="also list every key the file, its bases or the overrides set, with its "
                             "resolved value and where it comes from (precedence: base < file < command "
                             "line; keys not listed keep their defaults in harmony_mcore/config.py)")
    parser.add_argument("overrides", nargs="*",
                        help="config overrides, key.sub=value (they win over the files)")
    parser.set_defaults(func=run_plan)
    return parser


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan of args.config on the cluster; 0 fits, 1 does not, 2 config or layout error."""
    if min(args.nodes, args.gpus_per_node) < 1 or not (math.isfinite(args.gpu_mem_gib) and args.gpu_mem_gib > 0):
        print("harmony-mcore plan: need --nodes >= 1, --gpus-per-node >= 1 and a finite --gpu-mem-gib > 0 (got "
              f"--nodes {args.nodes} --gpus-per-node {args.gpus_per_node} --gpu-mem-gib {args.gpu_mem_gib:g})",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        plan = make_plan(cfg, Hardware(args.nodes, args.gpus_per_node, args.gpu_mem_gib))
    except (ConfigError, PlanError) as err:
        where = "" if str(args.config) in str(err) else f"{Path(args.config).name}: "  # file errors name it
        print(f"harmony-mcore plan: {where}{err}", file=sys.stderr)
        return 2
    print("\n".join(config_lines(cfg, args.config, args.overrides, every_key=args.show_config)))
    print(render(plan))
    return 0 if plan.fits else 1


def config_lines(cfg: Config, path: str | Path, overrides: Sequence[str], every_key: bool) -> list[str]:
    """The `config` line: the file and its `base:` chain. With every_key, each key the files or overrides set,
    its value in cfg (the resolved config) and the last layer that set it (a base, the file, the command
    line)."""
    files = config_layers(path)
    lines = [f"config      {', extends '.join(str(file) for file, _ in reversed(files))}"
             + (f"; {len(overrides)} command-line override(s)" if overrides else "")]
    if not every_key:
        return lines
    here = Path(path).parent
    layers = [(os.path.relpath(file, here), OmegaConf.to_container(node)) for file, node in files]
    layers.append(("command line", OmegaConf.to_container(OmegaConf.from_dotlist(list(overrides)))))
    source = {key: where for where, tree in layers for key in _leaf_keys(tree)}  # the last layer wins
    shown = []
    for key in _leaf_keys(OmegaConf.to_container(OmegaConf.structured(cfg))):  # in the config's own order
        if key in source:
            text = json.dumps(reduce(getattr, key.split("."), cfg))
            shown.append((f"{key} = {text if len(text) <= 48 else text[:45] + '...'}", source[key]))
    width = max((len(setting) for setting, _ in shown), default=0)
    title = (f"resolved    key = value (set by; files relative to {here}/), every other key at its default "
             "(harmony_mcore/config.py):")
    return [*lines, title, *(f"  {setting:<{width}}  ({where})" for setting, where in shown), ""]


def _leaf_keys(tree: dict, prefix: str = "") -> Iterator[str]:
    """Dotted keys of a nested mapping's values (a list is one value)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_plan_arguments(argparse.ArgumentParser(
        prog="harmony-mcore plan", description="Check a parallel layout and estimate per-GPU memory."))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
