"""LabelConfig / RewardConfig / CollapseConfig: published defaults, validation naming the field, OmegaConf."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from harmony_mcore.labels import CollapseConfig, LabelConfig, RewardConfig


def test_defaults_are_the_published_settings():
    labels, rewards = LabelConfig(), RewardConfig()
    assert (labels.strategy, labels.smoothing, labels.warmup_steps) == ("harmonic", 0.0, 0)
    assert labels.views == ["solver", "reframe"] and labels.strategy_at(0) == "harmonic"
    assert (rewards.kind, rewards.reframe_reward, rewards.soft_rank_top) == ("match", True, 8)
    # defined as 0.1 but never applied by the published code: off by default, see RewardConfig
    assert (rewards.format_penalty, rewards.sharpness_coef) == (0.0, 0.0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: LabelConfig(prior_pi=1.5), "labels.prior_pi: must be in (0, 1), got 1.5"),
        (lambda: LabelConfig(strategy="vote"), "labels.strategy: must be one of harmonic, majority"),
        (lambda: LabelConfig(warmup_strategy="vote"), "labels.warmup_strategy: must be one of"),
        (lambda: LabelConfig(views=["solver"]), "labels.views: must name at least two distinct views"),
        (
            lambda: LabelConfig(view_weights=[1.0]),
            "labels.view_weights: must hold one positive weight per view (2)",
        ),
        (
            lambda: LabelConfig(majority_view="critic"),
            "labels.majority_view: must be one of ['solver', 'reframe']",
        ),
        (lambda: LabelConfig(smoothing=-1), "labels.smoothing: must be >= 0, got -1"),
        (lambda: LabelConfig(lam=-0.5), "labels.lam: must be >= 0"),
        (lambda: LabelConfig(choice_letters="abc"), "labels.choice_letters: must be upper-case letters"),
        (lambda: LabelConfig(verify_timeout_s=0), "labels.verify_timeout_s: must be >= 1"),
        (lambda: RewardConfig(kind="binary"), "rewards.kind: must be one of match, soft_rank, score"),
        (lambda: RewardConfig(format_penalty=-0.1), "rewards.format_penalty: must be >= 0"),
        (lambda: RewardConfig(soft_rank_top=0), "rewards.soft_rank_top: must be >= 1"),
        (lambda: CollapseConfig(action="panic"), "collapse.action: must be one of warn, stop, rollback"),
        (lambda: CollapseConfig(patience=0), "collapse.patience: must be >= 1"),
        (lambda: CollapseConfig(max_accuracy_drop=2.0), "collapse.max_accuracy_drop: must be in [0, 1]"),
    ],
)
def test_invalid_values_name_the_field(make, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        make()


def test_warmup_strategy_applies_to_the_first_steps_only():
    cfg = LabelConfig(warmup_steps=3, warmup_strategy="majority")
    assert [cfg.strategy_at(step) for step in range(5)] == ["majority"] * 3 + ["harmonic"] * 2


@pytest.mark.parametrize("cls", [LabelConfig, RewardConfig, CollapseConfig])
def test_structured_config_round_trip(cls):
    tree = OmegaConf.merge(
        OmegaConf.structured(cls), OmegaConf.create(OmegaConf.to_yaml(OmegaConf.structured(cls)))
    )
    assert OmegaConf.to_object(tree) == cls()


def test_structured_config_checks_types_and_runs_validation():
    tree = OmegaConf.structured(LabelConfig)
    with pytest.raises(ValidationError):
        tree.strategy = "vote"  # Literal checked by OmegaConf itself
    tree.prior_pi = 2.0
    with pytest.raises(ValueError, match="labels.prior_pi"):
        OmegaConf.to_object(tree)
    overridden = OmegaConf.merge(tree, {"prior_pi": 0.7, "views": ["a", "b"], "majority_view": "a"})
    assert OmegaConf.to_object(overridden).views == ["a", "b"]
