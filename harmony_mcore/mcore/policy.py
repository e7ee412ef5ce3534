"""One rank of the Megatron-Core policy: the trainer runs TP x PP x DP of these as Ray actors.

Each rank holds its pipeline stage's shard of the policy (Megatron DDP + optimizer + lr scheduler) and of the frozen
reference model. Per step the driver calls, on every rank:
    score(rollouts, questions, step)  distributed pseudo-labels (DP reduction), rewards, GRPO advantages
    compute_logprobs()                old-policy and reference log-probs of the batch (forward-only schedule)
    train_step()                      the GRPO update(s) through Megatron's pipeline schedule
    push_weights(engines)             HF-named buckets into the vLLM engines
Ranks with the same DP rank receive the same rollouts; TP/PP replicas compute identical labels.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from harmony_mcore import sync
from harmony_mcore import batching
from harmony_mcore.config import Config
from harmony_mcore.console import redirect_output
from harmony_mcore.labels.batch import AnswerSample
from harmony_mcore.labels.reduce import label_batch
from harmony_mcore.labels.rewards import compute_rewards
from harmony_mcore.mcore import checkpoint, optimizer, parallel
from harmony_mcore.mcore.forward import causal_mask
from harmony_mcore.mcore.hf_weights import iter_hf_groups, load_hf_weights
from harmony_mcore.mcore.logprobs import token_logprobs
from harmony_mcore.mcore.model import build_gpt
from harmony_mcore.records import Question, Rollout
from harmony_mcore.runtime import CPU, Runtime
from harmony_mcore.rl import grpo
from harmony_mcore.sync.protocol import RankLayout, RayEngines, WeightSender
from harmony_mcore.weights import hf_dir
from harmony_mcore.weights.arch import ArchSpec

PAD_MULTIPLE = 16  # micro-batches are right-padded to a multiple of this many tokens


@dataclass(frozen=True)
class TrainSequence:
    """One sample as Megatron trains on it. tokens = prompt + response; advantage is per sequence;
    rollout_logprobs: the engine's log-prob of each response token when it sampled them (empty: unknown)."""

    tokens: tuple[int, ...]
    prompt_len: int
    advantage: float
    rollout_logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class MicroBatch:
    """Which sequences of the list it was cut from (their positions), and their tensors (Policy._tensors)."""

    index: tuple[int, ...]
    data: dict[str, torch.Tensor]


@dataclass(frozen=True)
class ScoreReport:
    rewards: list[float]  # per input rollout, input order
    advantages: list[float]
    labels: dict[str, str]  # qid -> pseudo-label ("" empty)
    diagnostics: dict[str, float]
    kept: int  # sequences kept for training (dynamic sampling may drop zero-variance groups)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with NaN/inf loss or gradients."""


class Policy:
    """runtime (harmony_mcore.runtime): where Megatron runs and which wire the weight sync takes; the cluster passes
    the run's. Without Ray (tests, tools/gpu_check.py, the demo's warm start) the caller chooses; CPU by default."""

    def __init__(self, cfg: Config, arch: ArchSpec, total_steps: int, *, rank: int, world: int, master_addr: str,
                 master_port: int, local_rank: int = 0, runtime: Runtime = CPU, log_file: str | None = None):
        redirect_output(log_file)  # logging.console=ours: Megatron's and torch's messages to the run's logs
        if runtime.on_gpu:  # before CUDA starts: Megatron orders its TP communication on one hardware queue
            os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR=master_addr,
                          MASTER_PORT=str(master_port), LOCAL_RANK=str(local_rank))
        torch.set_num_threads(cfg.parallel.threads_per_rank)
        self.cfg, self.arch, self.runtime = cfg, arch, runtime
        p, m = cfg.parallel, cfg.model
        parallel.check_layout(arch, tp=p.tp, pp=p.pp, world=world, padded_vocab=arch.padded_vocab_size(m.vocab_multiple))
        parallel.init_parallel(p.tp, p.pp, device=runtime.device, seed=cfg.train.seed)
        from megatron.core import parallel_state as ps

        self.ps = ps
        self.device = parallel.torch_device(runtime.device)
        self.padded_vocab = arch.padded_vocab_size(m.vocab_multiple)
        self.max_tokens = micro_batch_tokens(cfg)
        # Every parameter is loaded next (from mcore_path or hf_path), so Megatron's random init is skipped.
        self.gpt = build_gpt(arch, self.padded_vocab, dtype=m.dtype, spec=m.layer_spec, recompute=m.recompute,
                             init_weights=False, device=runtime.device, attention=m.attention)
        self._load_initial_weights()
        self.ref = self._frozen_copy() if cfg.grpo.kl_coef > 0 else None
        self.model, self.optimizer, self.scheduler = optimizer.build(self.gpt, cfg,
                                                                     total_steps * cfg.grpo.updates_per_step)
        self.batch = []  # this step's sequences; setting it plans their micro-batches (step_plan)
        self.old_logp: list[torch.Tensor] = []  # per micro-batch (b, S), last pipeline stage only
        self.ref_logp: list[torch.Tensor] = []
        self.nonfinite_in_row = 0
        self._sender: WeightSender | None = None  # this rank's end of the weight sync

    # --- setup ---------------------------------------------------------------------------------------------

    def _load_initial_weights(self) -> None:
        m = self.cfg.model
        if m.mcore_path:
            checkpoint.load_model(m.mcore_path, self.gpt, self.arch, self.padded_vocab)
        else:
            load_hf_weights(self.gpt, hf_dir.HFWeights(m.hf_path), self.arch, self.padded_vocab)

    def _frozen_copy(self):
        m = self.cfg.model
        ref = build_gpt(self.arch, self.padded_vocab, dtype=m.dtype, spec=m.layer_spec, init_weights=False,
                        device=self.runtime.device, attention=m.attention)
        ref.load_state_dict(self.gpt.state_dict())
        ref.requires_grad_(False)
        return ref.eval()

    def ping(self) -> dict[str, int]:
        return parallel.ranks()

    # --- labels, rewards, advantages -----------------------------------------------------------------------

    def score(self, rollouts: list[Rollout], questions: dict[str, Question], step: int) -> ScoreReport:
        """Pseudo-labels over the whole batch (counts all-reduced across DP ranks), rewards and per-(question,
        view) GRPO advantages of this DP rank's rollouts; keeps the sequences to train on."""
        samples = [AnswerSample.from_rollout(r, questions[r.qid]) for r in rollouts]
        group = self.ps.get_data_parallel_group_gloo(with_context_parallel=False)  # labels are CPU work
        labels = label_batch(samples, self.cfg.labels, step, group)
        rewards = compute_rewards(samples, labels, self.cfg.rewards)
        groups = [(r.qid, r.view) for r in rollouts]
        g = self.cfg.grpo
        advantages = grpo.group_advantages(rewards, groups, std_normalize=g.adv_norm == "grpo")
        dropped = grpo.zero_variance_groups(rewards, groups) if g.dynamic_sampling else set()
        self.batch = [TrainSequence(r.prompt_ids + r.response_ids, len(r.prompt_ids), a, r.logprobs)
                      for r, a, key in zip(rollouts, advantages, groups) if key not in dropped]
        return ScoreReport(rewards, advantages, {q: labels.label(q) for q in labels.questions},
                           dict(labels.diagnostics), len(self.batch))

    # --- tensors -------------------------------------------------------------------------------------------

    @property
    def batch(self) -> list[TrainSequence]:
        return self._batch

    @batch.setter
    def batch(self, seqs: list[TrainSequence]) -> None:
        """The step's sequences, and their plan, built once for compute_logprobs and train_step."""
        self._batch = seqs
        self.step_plan = self._plan(seqs, updates=self.cfg.grpo.updates_per_step)

    def _plan(self, seqs: list[TrainSequence] | None = None, updates: int = 1) -> list[list[MicroBatch]]:
        """Sequences (default: this rank's batch) as `updates` consecutive mini-batches, each cut into
        micro-batches: of at most parallel.max_tokens_per_micro_batch padded tokens, longest first
        (parallel.micro_batching=tokens, harmony_mcore.batching.pack), or of micro_batch_size sequences in order
        (fixed). The same sequences always give the same plan (log-probs and the update must line up)."""
        everything = self.batch if seqs is None else seqs
        per_update = -(-len(everything) // updates) if everything else 0
        return [self._pack(everything, list(range(u * per_update, min((u + 1) * per_update, len(everything)))))
                for u in range(updates)]

    def _pack(self, seqs: list[TrainSequence], indices: list[int]) -> list[MicroBatch]:
        p = self.cfg.parallel
        if not indices:
            return []
        if p.micro_batching == "fixed":
            groups = [indices[i:i + p.micro_batch_size] for i in range(0, len(indices), p.micro_batch_size)]
        else:
            lengths = [len(seqs[i].tokens) for i in indices]
            groups = [[indices[j] for j in g] for g in batching.pack(lengths, self.max_tokens, pad_multiple=PAD_MULTIPLE,
                                                                       min_batches=p.pp)]
        return [MicroBatch(tuple(g), self._tensors([seqs[i] for i in g])) for g in groups]

    def _tensors(self, seqs: list[TrainSequence]) -> dict[str, torch.Tensor]:
        """One micro-batch, right-padded to a multiple of PAD_MULTIPLE tokens.

        tokens (b, S); targets (b, S) = tokens shifted left (position t predicts token t+1); loss_mask (b, S) 1
        where the target is a response token; advantages (b, 1); rollout_logp (b, S) the engine's log-prob of
        each target response token, rollout_mask (b, S) 1 where that is known.
        """
        S = batching.padded_len(max(len(s.tokens) for s in seqs), PAD_MULTIPLE)
        tokens = torch.zeros(len(seqs), S, dtype=torch.long)
        loss_mask = torch.zeros(len(seqs), S)
        rollout_logp, rollout_mask = torch.zeros(len(seqs), S), torch.zeros(len(seqs), S)
        for i, s in enumerate(seqs):
            tokens[i, :len(s.tokens)] = torch.tensor(s.tokens)
            loss_mask[i, s.prompt_len - 1:len(s.tokens) - 1] = 1.0
            if s.rollout_logprobs:
                span = slice(s.prompt_len - 1, s.prompt_len - 1 + len(s.rollout_logprobs))
                rollout_logp[i, span] = torch.tensor(s.rollout_logprobs)
                rollout_mask[i, span] = 1.0
        targets = torch.roll(tokens, -1, dims=1)
        advantages = torch.tensor([[s.advantage] for s in seqs])
        return {k: v.to(self.device) for k, v in dict(tokens=tokens, targets=targets, loss_mask=loss_mask,
                                                      advantages=advantages, rollout_logp=rollout_logp,
                                                      rollout_mask=rollout_mask).items()}

    def _token_logprobs(self, logits: torch.Tensor, targets: torch.Tensor, with_entropy: bool):
        """Vocab-parallel log p(target) and entropy per position. logits (b, S, V/tp) -> (b, S), (b, S) | None.

        Padded vocab rows (ids >= the real vocab) are excluded, so the distribution matches transformers and vLLM
        exactly; about one logits-sized buffer at a time (harmony_mcore.mcore.logprobs)."""
        shard = logits.shape[-1]
        return token_logprobs(logits, targets, vocab_start=self.ps.get_tensor_model_parallel_rank() * shard,
                              real_vocab=self.arch.vocab_size, group=self.ps.get_tensor_model_parallel_group(),
                              with_entropy=with_entropy)

    def _run_schedule(self, model, batches, loss_fn, forward_only: bool) -> list[dict]:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        dev = self.device

        def step(data_iterator, model_chunk):
            mb = next(data_iterator)
            b, S = mb["tokens"].shape
            positions = torch.arange(S, device=dev).expand(b, S)
            logits = model_chunk(mb["tokens"], positions, causal_mask(S, dev))
            return logits, lambda output: loss_fn(output, mb)

        return get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter(batches), model=[model], num_microbatches=len(batches),
            seq_length=max(b["tokens"].shape[1] for b in batches),
            micro_batch_size=max(b["tokens"].shape[0] for b in batches), forward_only=forward_only,
        )

    # --- log-probs -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def _logprobs_of(self, model, batches: list[MicroBatch]) -> list[torch.Tensor]:
        """Per micro-batch, log p of every target token (b, S) (last pipeline stage; [] elsewhere)."""
        def collect(logits, mb):
            logp, _ = self._token_logprobs(logits, mb["targets"], with_entropy=False)
            return torch.zeros((), device=logits.device), torch.ones((), dtype=torch.int), {"logp": logp}

        if not batches:
            return []
        model.eval()
        results = self._run_schedule(model, [mb.data for mb in batches], collect, forward_only=True)
        return [r["logp"] for r in results] if self.ps.is_pipeline_last_stage() else []

    def response_logprobs(self, seqs: list[TrainSequence]) -> list[list[float]]:
        """The current policy's log-prob of each response token of each sequence, in input order (last pipeline
        stage; [] elsewhere)."""
        batches = self._plan(seqs)[0]
        rows: dict[int, torch.Tensor] = {}
        for mb, logp in zip(batches, self._logprobs_of(self.model, batches)):
            rows.update(zip(mb.index, logp))
        if not rows:
            return []
        return [rows[i][s.prompt_len - 1:len(s.tokens) - 1].float().tolist() for i, s in enumerate(seqs)]

    def rollout_logprobs(self, rollouts: list[Rollout]) -> list[list[float]]:
        """Megatron's log-probs of each rollout's response tokens (last pipeline stage; [] elsewhere): the
        trainer-side view of what vLLM reported as `Rollout.logprobs`."""
        return self.response_logprobs([TrainSequence(r.prompt_ids + r.response_ids, len(r.prompt_ids), 0.0)
                                       for r in rollouts])

    def compute_logprobs(self) -> dict[str, float]:
        """Reference log-probs (KL term) and, when the batch is used for more than one update, old-policy
        log-probs, per micro-batch of the step's plan. With one update per step the old policy IS the current one:
        its log-probs are the detached current ones (ratio 1, exact on-policy GRPO) and this forward pass is
        skipped."""
        start = time.perf_counter()
        batches = [mb for update in self.step_plan for mb in update]
        self.old_logp = self._logprobs_of(self.model, batches) if self.cfg.grpo.updates_per_step > 1 else []
        self.ref_logp = self._logprobs_of(self.ref, batches) if self.ref is not None else []
        return {"logprob_s": time.perf_counter() - start}

    # --- the update ----------------------------------------------------------------------------------------

    def _grpo_loss(self, logits, mb, old_logp, ref_logp):
        """GRPO loss of one micro-batch as (sum, count, metric sums); Megatron divides by the global count.
        The train/rollout mismatch compares the engine's log-probs with the old policy's, i.e. the weights the
        engine sampled with (formulas in harmony_mcore.rl.grpo)."""
        g = self.cfg.grpo
        logp, entropy = self._token_logprobs(logits, mb["targets"], with_entropy=True)
        old = old_logp if old_logp is not None else logp.detach()
        pg, clipped = grpo.policy_loss(logp, old, mb["advantages"], clip_low=g.clip_low, clip_high=g.clip_high,
                                       dual_clip=g.dual_clip)
        known = mb["rollout_mask"]
        if g.tis_cap is not None:
            weight = grpo.truncated_is_weight(old, mb["rollout_logp"], g.tis_cap)
            pg = pg * torch.where(known > 0, weight, torch.ones_like(weight))
        per_token = pg
        kl = grpo.kl_penalty(logp, ref_logp, g.kl_type) if ref_logp is not None else torch.zeros_like(logp)
        if ref_logp is not None:
            per_token = per_token + g.kl_coef * kl
        if g.entropy_coef:
            per_token = per_token - g.entropy_coef * entropy
        mask = mb["loss_mask"]
        loss_sum, count = grpo.aggregate(per_token, mask, g.loss_agg)
        sums = {name: grpo.aggregate(value.detach(), mask, g.loss_agg)[0]
                for name, value in (("pg", pg), ("kl", kl), ("entropy", entropy), ("clipfrac", clipped),
                                    ("nll", -logp))}
        sums["count"] = count.detach()
        mismatch = grpo.rollout_mismatch(old, mb["rollout_logp"], mask * known)
        sums |= {f"mismatch_{k}": v for k, v in mismatch.items()}
        return loss_sum, count.to(torch.int), {k: v.clone() for k, v in sums.items()}

    def train_step(self) -> dict[str, float]:
        """`grpo.updates_per_step` optimizer steps over the batch. A step whose loss or gradients are not finite
        on any rank is skipped everywhere (no update, counted); too many in a row stop the run."""
        start = time.perf_counter()
        metrics: dict[str, float] = {}
        self.model.train()
        first = 0  # index of the update's first micro-batch in the step (old_logp / ref_logp are per micro-batch)
        for update in self.step_plan:
            chunk, first = range(first, first + len(update)), first + len(update)
            if not update:
                continue
            data = [dict(mb.data, _old=self.old_logp[i] if self.old_logp else None,
                         _ref=self.ref_logp[i] if self.ref_logp else None) for mb, i in zip(update, chunk)]
            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            results = self._run_schedule(self.model, data, lambda out, mb: self._grpo_loss(out, mb, mb["_old"],
                                                                                          mb["_ref"]),
                                         forward_only=False)
            if not self._all_finite(results):
                self.nonfinite_in_row += 1
                metrics["skipped_updates"] = metrics.get("skipped_updates", 0) + 1
                if self.nonfinite_in_row >= self.cfg.train.max_nonfinite_steps:
                    raise NonFiniteError(f"{self.nonfinite_in_row} consecutive updates with non-finite loss or "
                                         "gradients (train.max_nonfinite_steps); the last checkpoint is intact")
                continue
            self.nonfinite_in_row = 0
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
            metrics["grad_norm"] = float(grad_norm) if grad_norm is not None else 0.0
            for key, value in self._reduce_metrics(results).items():
                metrics[key] = value
        metrics["lr"] = self.optimizer.param_groups[0]["lr"]
        metrics["update_s"] = time.perf_counter() - start
        return metrics

    def _all_finite(self, results: list[dict]) -> bool:
        """Loss (last stage) and every local gradient finite, agreed over all ranks."""
        finite = all(bool(torch.isfinite(torch.stack([r["pg"], r["kl"]])).all()) for r in results)
        for buffer in self.model.buffers:
            finite = finite and bool(torch.isfinite(buffer.grad_data).all())
        flag = torch.tensor([1.0 if finite else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _reduce_metrics(self, results: list[dict]) -> dict[str, float]:
        """Global means of the loss terms (sum over micro-batches and DP ranks / global count), last stage."""
        if not self.ps.is_pipeline_last_stage():
            return {}
        keys = ("pg", "kl", "entropy", "clipfrac", "nll", "count", "mismatch_abs_sum", "mismatch_ratio_sum",
                "mismatch_count")
        sums = dict(zip(keys, torch.stack([sum(r[k] for r in results) for k in keys]).double()))
        worst = torch.stack([r["mismatch_abs_max"] for r in results]).max().double()
        group = self.ps.get_data_parallel_group()
        packed = torch.stack(list(sums.values()))
        dist.all_reduce(packed, group=group)
        dist.all_reduce(worst, op=dist.ReduceOp.MAX, group=group)
        sums = dict(zip(keys, packed.tolist()))
        count, known = max(sums["count"], 1.0), sums["mismatch_count"]
        metrics = {f"loss/{k}": sums[k] / count for k in keys[:5]} | {"tokens": sums["count"]}
        if known:  # rollouts carry the engine's log-probs (not in direct Policy use)
            metrics |= {"mismatch/abs_mean": sums["mismatch_abs_sum"] / known, "mismatch/abs_max": float(worst),
                        "mismatch/ratio_mean": sums["mismatch_ratio_sum"] / known}
        return metrics

    # --- weight sync ---------------------------------------------------------------------------------------

    def _weight_sender(self, kind: str | None = None) -> WeightSender:
        """This rank's weight sender, of the runtime's wire (harmony_mcore.runtime)."""
        if kind is None:
            kind = self.runtime.transport
        if self._sender is None or self._sender.kind != kind:
            if self._sender is not None:
                self._sender.close()
            self._sender = sync.make_sender(kind, RankLayout.from_megatron(self.runtime.device),
                                            bucket_bytes=self.cfg.rollout.sync_bucket_mb * 2**20)
        return self._sender

    def weight_endpoint(self, kind: str) -> dict | None:
        """NCCL rendezvous of this rank (each pipeline stage's sender; None elsewhere and for other kinds)."""
        return self._weight_sender(kind).endpoint()

    def connect_weights(self, kind: str, world_size: int) -> None:
        self._weight_sender(kind).connect(world_size)

    def release_memory(self) -> None:
        """Hand GPU memory back before colocated engines re-allocate theirs: the weight sender's last buffer (CUDA
        IPC, once the engines released it) and the allocator's cached blocks (activations of the update)."""
        if self._sender is not None:
            self._sender.release()
        if self.runtime.on_gpu:
            torch.cuda.empty_cache()

    def disconnect_weights(self) -> None:
        if self._sender is not None:
            self._sender.disconnect()

    def push_weights(self, engines: list, bucket_mb: int) -> dict[str, float]:
        """Stream this stage's weights, HF-named through the shared table, into every engine (Ray actor handles)
        in buckets.

        Called on every rank; the wire decides the roles (harmony_mcore.sync): shm and NCCL send from each stage's
        TP rank 0 of DP replica 0 (the other TP ranks join the gathers), CUDA IPC goes through every rank (each
        GPU's engine worker maps that GPU's copy).
        """
        return self._weight_sender().push(lambda: iter_hf_groups(self.gpt, self.arch, lockstep=True),
                                          RayEngines(engines), bucket_mb * 2**20)

    # --- checkpoints ---------------------------------------------------------------------------------------

    def _train_state(self, metadata: dict[str, Any], is_loading: bool) -> dict[str, Any]:
        """Model, optimizer, scheduler and RNG as one sharded state dict, built with the checkpoint metadata
        (harmony_mcore.mcore.checkpoint) that both the model's and the optimizer's sharded_state_dict receive."""
        from megatron.core.dist_checkpointing.mapping import ShardedObject

        ps = self.ps
        if is_loading:
            optimizer.prepare_load(self.optimizer)
        model_sd = self.gpt.sharded_state_dict(metadata=metadata)  # unwrapped: DDP would prefix "module."
        rng = ShardedObject("rng_state", {"torch": torch.get_rng_state()},
                            (ps.get_pipeline_model_parallel_world_size(), ps.get_tensor_model_parallel_world_size()),
                            (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()),
                            replica_id=ps.get_data_parallel_rank())
        return {"model": model_sd,
                "optimizer": self.optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=metadata),
                "scheduler": self.scheduler.state_dict(), "rng": rng}

    def save_checkpoint(self, path: str, extra: dict[str, Any]) -> None:
        meta = checkpoint.CheckpointMeta(self.arch, self.padded_vocab, self.cfg.model.dtype,
                                         extra | {"tp": self.cfg.parallel.tp, "pp": self.cfg.parallel.pp})
        metadata = checkpoint.sharded_metadata()
        checkpoint.save(path, self._train_state(metadata, is_loading=False), meta,
                        hf_meta_src=self.cfg.model.hf_dir(), metadata=metadata)

    def load_checkpoint(self, path: str) -> dict[str, Any]:
        """Restore model, optimizer, scheduler (and RNG when the layout is unchanged); returns the driver state.
        Any TP/PP/DP layout loads (the optimizer state is stored fully reshardable)."""
        meta = checkpoint.read_meta(path)
        checkpoint.check_compatible(meta, self.arch, self.padded_vocab, path)
        same_layout = (meta.extra.get("tp"), meta.extra.get("pp")) == (self.cfg.parallel.tp, self.cfg.parallel.pp)
        state = self._train_state(checkpoint.resume_metadata(path, same_layout), is_loading=True)
        if not same_layout:
            state.pop("rng")  # per-(pp, tp) RNG states do not map onto another layout
        loaded = checkpoint.load(path, state)
        checkpoint.load_model_state(self.gpt, loaded["model"], path)
        with torch.no_grad():  # fp32 master weights are views of the (leaf) model parameters
            self.optimizer.load_state_dict(loaded["optimizer"])
        optimizer.finish_load(self.optimizer)
        self.scheduler.load_state_dict(loaded["scheduler"])
        if same_layout:
            torch.set_rng_state(loaded["rng"]["torch"])
        return meta.extra

    def export_hf(self, out: str) -> None:
        """The current policy as an HF directory (same table and writer as tools/convert_mcore_to_hf.py)."""
        from harmony_mcore.mcore.convert import write_hf_dir

        write_hf_dir(self.gpt, self.arch, self.cfg.model.dtype, out, hf_meta_src=self.cfg.model.hf_dir())

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
        parallel.destroy_parallel()

    def push_weights_or_drain(self, engines: list, bucket_mb: int) -> dict[str, float]:
        """`push_weights` as the trainer calls it (Cluster.sync_weights), which survives an engine dying mid-sync:
        when this rank's push fails, the rank still runs the rest of its stage's TP gathers before it raises, so
        the stage's other TP ranks (blocked in those gathers otherwise, until the process-group timeout) finish
        their part too, and every rank is ready for the repeated sync."""
        opened = []

        def groups():
            opened.append(iter_hf_groups(self.gpt, self.arch, lockstep=True))
            return opened[-1]

        try:
            return self._weight_sender().push(groups, RayEngines(engines), bucket_mb * 2**20)
        except Exception:
            for rest in opened:
                for _ in rest:  # this rank's remaining TP gathers
                    pass
            raise


def micro_batch_tokens(cfg: Config) -> int:
    """The padded-token budget of a micro-batch: parallel.max_tokens_per_micro_batch, or by default as many tokens
    as micro_batch_size sequences of the longest possible length take (the fixed layout's worst case, so memory
    never exceeds it, while short sequences share a micro-batch)."""
    p, r = cfg.parallel, cfg.rollout
    return p.max_tokens_per_micro_batch or p.micro_batch_size * batching.padded_len(
        r.max_prompt_tokens + r.max_response_tokens, PAD_MULTIPLE)
