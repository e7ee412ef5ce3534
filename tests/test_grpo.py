"""GRPO maths against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from harmony_mcore.rl import grpo


def test_advantages_are_normalised_per_question_and_view():
    # Two groups: (q, solver) rewards 1, 0, 1, 0 -> mean 0.5, std 0.5 -> +-1; (q, reframe) all 1 -> 0.
    rewards = [1, 0, 1, 0, 1, 1]
    groups = [("q", "solver")] * 4 + [("q", "reframe")] * 2
    adv = grpo.group_advantages(rewards, groups, eps=0.0)
    assert adv == pytest.approx([1, -1, 1, -1, 0, 0])


def test_dr_grpo_keeps_the_scale():
    adv = grpo.group_advantages([1, 0, 0, 0], ["g"] * 4, std_normalize=False)
    assert adv == pytest.approx([0.75, -0.25, -0.25, -0.25])


def test_single_sample_group_and_interleaved_order():
    adv = grpo.group_advantages([3.0, 1.0, 5.0], ["a", "b", "a"], eps=0.0)
    assert adv == pytest.approx([-1.0, 0.0, 1.0])


def test_zero_variance_groups():
    assert grpo.zero_variance_groups([1, 1, 0, 1], ["a", "a", "b", "b"]) == {"a"}


def test_kl_estimators_hand_computed_and_zero_at_equality():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -2.0])
    assert grpo.kl_penalty(logp, ref, "k1").tolist() == pytest.approx([0.5, 0.0])
    # k3 = exp(ref - logp) - (ref - logp) - 1 = exp(-0.5) + 0.5 - 1
    assert grpo.kl_penalty(logp, ref, "k3")[0].item() == pytest.approx(math.exp(-0.5) - 0.5)
    same = torch.randn(5)
    assert torch.equal(grpo.kl_penalty(same, same, "k3"), torch.zeros(5))
    with pytest.raises(ValueError, match="grpo.kl_type"):
        grpo.kl_penalty(same, same, "k2")


def test_clipped_surrogate_clip_higher():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.1, 1.5]))  # ratios
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, clipped = grpo.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.28)
    # A>0, r=1.5: max(-1.5, -1.28) = -1.28 (clipped); A<0, r=0.5: max(0.5, 0.8) = 0.8 (clipped);
    # A>0, r=1.1 inside: -1.1; A<0, r=1.5: max(1.5, 1.28) = 1.5 (unclipped side wins).
    assert loss.tolist() == pytest.approx([-1.28, 0.8, -1.1, 1.5])
    assert clipped.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_dual_clip_bounds_negative_advantages():
    old = torch.zeros(2)
    logp = torch.log(torch.tensor([10.0, 10.0]))
    adv = torch.tensor([-1.0, 1.0])
    loss, _ = grpo.policy_loss(logp, old, adv, clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    assert loss.tolist() == pytest.approx([3.0, -1.2])  # -A*r = 10 capped at 3; positive A untouched


def test_aggregation_token_and_sequence_mean():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    s, n = grpo.aggregate(per_token, mask, "token_mean")
    assert (s.item(), n.item()) == (10.0, 4.0)  # token mean 2.5
    s, n = grpo.aggregate(per_token, mask, "seq_mean")
    assert (s.item(), n.item()) == (6.0, 2.0)  # (2 + 4) / 2 = 3


def test_truncated_is_weight_hand_computed():
    # ratios p_trainer / p_rollout: e^0 = 1, e^0.5 = 1.6487, e^1 = 2.7183 (capped at 2), e^-1 = 0.3679
    old = torch.tensor([[0.0, 0.5, 1.0, -1.0]], requires_grad=True)
    rollout = torch.zeros(1, 4)
    w = grpo.truncated_is_weight(old, rollout, cap=2.0)
    assert w.tolist()[0] == pytest.approx([1.0, 1.6487213, 2.0, 0.3678794], abs=1e-6)
    assert not w.requires_grad, "a weight on the loss, not a path for gradients"


def test_rollout_mismatch_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, -1.0, 0.0]])
    rollout = torch.tensor([[-1.1, -2.0, -0.2], [-3.0, -1.5, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the last token is padding
    m = grpo.rollout_mismatch(logp, rollout, mask)
    # deltas on the 5 real tokens: 0.1, 0, -0.3, 0, 0.5
    assert float(m["count"]) == 5
    assert float(m["abs_sum"]) == pytest.approx(0.9, abs=1e-6)
    assert float(m["abs_max"]) == pytest.approx(0.5, abs=1e-6)
    expected_ratio = math.exp(0.1) + 1 + math.exp(-0.3) + 1 + math.exp(0.5)
    assert float(m["ratio_sum"]) == pytest.approx(expected_ratio, abs=1e-5)
    same = grpo.rollout_mismatch(logp, logp, mask)
    assert float(same["abs_sum"]) == 0 and float(same["ratio_sum"]) == 5, "no mismatch: |d| 0, ratio 1"
