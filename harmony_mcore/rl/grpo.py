"""GRPO: group-normalised advantages and the clipped policy-gradient loss with a KL-to-reference term.

Self-Harmony normalises advantages per question WITHIN EACH VIEW (solver samples against solver samples, reframe
against reframe), so a group is a (question id, view) pair. Notation per response token t of sample i:
    r_t = exp(logp_t - old_logp_t)                          importance ratio
    pg_t = max(-A_i r_t, -A_i clip(r_t, 1 - eps_low, 1 + eps_high))          clipped surrogate (PPO)
    dual clip (c > 1, Ye et al. 2020): for A_i < 0, pg_t = min(pg_t, -c A_i)
    KL k1: logp_t - ref_t;  k3 (Schulman's low-variance estimator): exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss_t = w_t * pg_t + beta * kl_t - alpha * entropy_t
    w_t = min(exp(old_logp_t - rollout_logp_t), C)   truncated importance sampling (grpo.tis_cap = C), else 1
TIS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training") corrects for the
inference engine sampling from a slightly different distribution than the trainer computes (bf16 kernels, another
TP layout): rollout_logp_t is the engine's log-prob of the sampled token, old_logp_t the trainer's (detached)
log-prob under the weights that were synced into the engine; the weight is detached and capped (default C = 2 in
the published recipe; off here unless set). Not in the Self-Harmony paper: an opt-in deviation.
Aggregation: token_mean sums loss_t over every response token of the global batch and divides by their count;
seq_mean averages each sequence over its tokens, then averages sequences.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence

import torch


def group_advantages(rewards: Sequence[float], groups: Sequence[Hashable], *, std_normalize: bool = True,
                     eps: float = 1e-6) -> list[float]:
    """A_i = (R_i - mean_g) / (std_g + eps) within each group g (std_normalize=False: Dr. GRPO, A_i = R_i - mean_g).

    std is the population standard deviation (ddof=0). A group of one sample, or of equal rewards, gets A = 0.
    """
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        members[g].append(i)
    adv = [0.0] * len(rewards)
    for idx in members.values():
        r = torch.tensor([float(rewards[i]) for i in idx], dtype=torch.float64)
        centred = r - r.mean()
        std = r.std(unbiased=False)
        if std_normalize and std > 0:  # equal rewards: exactly 0 whatever eps is
            centred = centred / (std + eps)
        for i, a in zip(idx, centred.tolist()):
            adv[i] = a
    return adv


def zero_variance_groups(rewards: Sequence[float], groups: Sequence[Hashable]) -> set[Hashable]:
    """Groups whose rewards are all equal (no learning signal): dropped by dynamic sampling (DAPO)."""
    seen: dict[Hashable, set[float]] = defaultdict(set)
    for r, g in zip(rewards, groups):
        seen[g].add(float(r))
    return {g for g, values in seen.items() if len(values) == 1}


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL estimate of pi_theta against pi_ref (same shape as logp); exactly 0 where logp == ref_logp."""
    if kind == "k1":
        return logp - ref_logp
    if kind == "k3":
        log_ratio = ref_logp - logp
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"grpo.kl_type: {kind!r} (expected k1 or k3)")


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, *, clip_low: float,
                clip_high: float, dual_clip: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped surrogate pg_t and a 0/1 tensor marking tokens where clipping was active.

    logp, old_logp: (..., T); advantages broadcastable to them (one value per sequence: (..., 1)).
    """
    ratio = torch.exp(logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    loss = torch.maximum(unclipped, clipped)
    was_clipped = (clipped > unclipped).float()
    if dual_clip is not None:
        bound = -dual_clip * advantages
        capped = torch.minimum(loss, bound)
        loss = torch.where(advantages < 0, capped, loss)
    return loss, was_clipped


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of the aggregation over a micro-batch; the caller divides the global sum by the global count.

    per_token, mask: (B, T). token_mean: sum over tokens, count = tokens. seq_mean: sum over sequences of each
    sequence's token mean, count = sequences with at least one token.
    """
    mask = mask.to(per_token.dtype)
    if mode == "token_mean":
        return (per_token * mask).sum(), mask.sum()
    if mode == "seq_mean":
        tokens = mask.sum(-1)
        has_tokens = tokens > 0
        seq = (per_token * mask).sum(-1) / tokens.clamp(min=1)
        return seq[has_tokens].sum(), has_tokens.sum().to(per_token.dtype)
    raise ValueError(f"grpo.loss_agg: {mode!r} (expected token_mean or seq_mean)")


def truncated_is_weight(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """w_t = min(exp(old_logp_t - rollout_logp_t), cap), detached (a weight on the loss, not a path for
    gradients). old_logp, rollout_logp: (B, T)."""
    return torch.clamp(torch.exp(old_logp.detach() - rollout_logp), max=cap)


def rollout_mismatch(logp: torch.Tensor, rollout_logp: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """How far the trainer's log-probs of the sampled tokens are from the engine's, over the masked tokens:
    sums (divide by `count` after summing over micro-batches and ranks) and a max.

        abs_sum   = sum_t |logp_t - rollout_logp_t|          (mean |delta log-prob| once divided)
        ratio_sum = sum_t exp(logp_t - rollout_logp_t)       (mean per-token probability ratio p_trainer/p_rollout)
        abs_max   = max_t |logp_t - rollout_logp_t|
    logp, rollout_logp, mask: (B, T). The first sign of a wrong weight sync or layout on a cluster.
    """
    mask = mask.to(logp.dtype)
    delta = (logp.detach() - rollout_logp) * mask
    abs_delta = delta.abs()
    return {"abs_sum": abs_delta.sum(), "ratio_sum": (torch.exp(delta) * mask).sum(),
            "abs_max": abs_delta.max() if abs_delta.numel() else torch.zeros((), dtype=logp.dtype),
            "count": mask.sum()}
