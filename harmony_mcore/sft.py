"""Supervised warm start with the project's own Megatron policy (no Ray, no vLLM: gloo processes).

Supervised fine-tuning is the on-policy, single-update case of the GRPO surrogate with advantage 1 on every target
token and no KL term: the ratio r = exp(logp - sg(logp)) equals 1, and grad(-A r) = -grad(logp), the cross-entropy
gradient (token mean over the batch). So SFT runs through exactly the training path RL uses (Megatron DDP, the
pipeline schedule, the optimizer and its lr schedule), and `loss/nll` reports the cross-entropy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from harmony_mcore.config import Config


@dataclass(frozen=True)
class SupervisedExample:
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]  # the response, ending with EOS


def sft_steps(num_examples: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps: full batches only (each epoch drops its last partial batch, a different one per epoch)."""
    return (num_examples // batch_size) * epochs


def sft_worker(rank: int, world: int, cfg: Config, examples: Sequence[SupervisedExample], batch_size: int,
               epochs: int, out_hf: str) -> list[dict[str, float]]:
    """Train on `examples` for `epochs` (a fixed permutation per epoch; batches split evenly over DP ranks), then
    write the policy as an HF directory. Returns the per-step metrics of the last pipeline stage (else [])."""
    from harmony_mcore.mcore.policy import Policy, TrainSequence
    from harmony_mcore.weights.presets import arch_for

    if cfg.grpo.kl_coef != 0 or cfg.grpo.updates_per_step != 1:
        raise ValueError("supervised warm start needs grpo.kl_coef=0 and grpo.updates_per_step=1")
    total = sft_steps(len(examples), batch_size, epochs)
    policy = Policy(cfg, arch_for(cfg.model), total, rank=rank, world=world, master_addr="", master_port=0)
    dp, dp_rank = cfg.parallel.dp, policy.ps.get_data_parallel_rank()
    history = []
    bar = tqdm(total=total, unit="step", desc="warm start", disable=rank != 0 or not cfg.logging.progress)
    for epoch in range(epochs):
        order = np.random.default_rng([cfg.train.seed, epoch]).permutation(len(examples))
        for start in range(0, len(order) - batch_size + 1, batch_size):
            batch = [examples[i] for i in order[start:start + batch_size]]
            mine = batch[dp_rank::dp]
            policy.batch = [TrainSequence(e.prompt_ids + e.target_ids, len(e.prompt_ids), 1.0) for e in mine]
            metrics = policy.train_step()
            if metrics.get("tokens"):
                history.append({"epoch": epoch, **metrics})
            bar.update()
            if "loss/nll" in metrics:
                bar.set_postfix(nll=f"{metrics['loss/nll']:.3f}", refresh=False)
    bar.close()
    policy.export_hf(out_hf)
    return history
