"""Configuration of the pseudo-labeller, the rewards and the collapse detector.

Plain dataclasses whose field types OmegaConf structured configs accept (the lead composes them into the root
config tree as `labels`, `rewards` and `collapse`). Defaults are the published Self-Harmony settings, except
where a docstring says otherwise. `__post_init__` validates every value in the project's one validation style
(`harmony_mcore.checks.require`: ConfigError "key: message", a ValueError); OmegaConf runs it when the tree
is turned into objects (`OmegaConf.to_object`), and the `label` CLI when it builds a LabelConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from harmony_mcore.checks import is_finite, require
from harmony_mcore.records import REFRAME, SOLVER

Strategy = Literal[
    "harmonic", "majority", "arithmetic", "geometric", "power_mean", "penalized_mean", "prior", "co_reward"
]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
TWO_VIEW_STRATEGIES: tuple[str, ...] = ("penalized_mean", "prior")
RewardKind = Literal["match", "soft_rank", "score"]
CollapseAction = Literal["warn", "stop", "rollback"]


def _at_least(value: float | None, low: float, key: str, *, optional: bool = False) -> None:
    """value is a finite number >= low (or None when optional)."""
    if optional and value is None:
        return
    require(is_finite(value) and value >= low, key, f"must be >= {low:g}{' (or null)' if optional else ''}, "
            f"got {value!r}")


def _fraction(value: float | None, key: str, *, optional: bool = False) -> None:
    """value is in [0, 1] (or None when optional)."""
    if optional and value is None:
        return
    require(is_finite(value) and 0 <= value <= 1, key, f"must be in [0, 1]{' (or null)' if optional else ''}, "
            f"got {value!r}")


@dataclass
class LabelConfig:
    """How answers are extracted, grouped and turned into one pseudo-label per question.

    strategy: the selector (formulas in `harmony_mcore.labels.selectors`):
        harmonic        weighted harmonic mean of the per-view answer frequencies (the paper's default);
        majority        frequency in `majority_view` only (TTRL baseline);
        arithmetic, geometric: weighted means of the frequencies;
        power_mean      generalised mean M_q with q = 1 - lam (lam=0 arithmetic, 1 geometric, 2 harmonic);
        penalized_mean  AM - lam * (p0 - p1)^2 / (2 (p0 + p1)) (lam=0 arithmetic, 1 harmonic; two views);
        prior           pbar - pi (1 - pi) (p0 - p1)^2 / pbar, pbar = pi p0 + (1 - pi) p1 (two views);
        co_reward       each view is rewarded against the majority answer of the other views (Co-Reward).
    views: view names, in order; view 0 is the one whose frequencies come first in every formula.
    view_weights: w_k for the weighted means (harmonic, arithmetic, geometric, power_mean), one per view.
    lam: lambda of `power_mean` and `penalized_mean` (the paper's two parameterisations; see selectors).
    prior_pi: pi of `prior`, the weight of view 0.
    majority_view: the view `majority` votes in.
    smoothing: Laplace pseudo-count added to every (answer, view) count; 0 (published default) disables it, so
        an answer seen in one view only scores 0 under harmonic and cannot become the label.
    warmup_steps / warmup_strategy: steps [0, warmup_steps) use warmup_strategy (None: the same strategy).
    choice_letters: letters a multiple-choice answer may be.
    verify_timeout_s: time limit of one math-verify parse or comparison, in seconds (integer: SIGALRM).
    verify_max_chars: normalised answers longer than this are compared by exact string only (bounds the cost
        of symbolic comparison; also the guard where no time limit can interrupt a comparison).
    """

    strategy: Strategy = "harmonic"
    views: list[str] = field(default_factory=lambda: [SOLVER, REFRAME])
    view_weights: list[float] = field(default_factory=lambda: [1.0, 1.0])
    lam: float = 1.0
    prior_pi: float = 0.5
    majority_view: str = SOLVER
    smoothing: float = 0.0
    warmup_steps: int = 0
    warmup_strategy: Strategy | None = None
    choice_letters: str = "ABCDEFGHIJ"
    verify_timeout_s: int = 5
    verify_max_chars: int = 512

    def __post_init__(self) -> None:
        for key in ("strategy", "warmup_strategy"):
            value = getattr(self, key)
            require(
                value in STRATEGIES or (key == "warmup_strategy" and value is None),
                f"labels.{key}",
                f"must be one of {', '.join(STRATEGIES)}, got {value!r}",
            )
        views = list(self.views)
        require(
            len(views) >= 2 and len(set(views)) == len(views),
            "labels.views",
            f"must name at least two distinct views, got {views!r}",
        )
        weights = list(self.view_weights)
        require(
            len(weights) == len(views) and all(is_finite(w) and w > 0 for w in weights),
            "labels.view_weights",
            f"must hold one positive weight per view ({len(views)}), got {weights!r}",
        )
        for strategy in (self.strategy, self.warmup_strategy):
            require(
                strategy not in TWO_VIEW_STRATEGIES or len(views) == 2,
                "labels.views",
                f"must name exactly two views for strategy {strategy!r}, got {views!r}",
            )
        _at_least(self.lam, 0, "labels.lam")
        require(
            is_finite(self.prior_pi) and 0 < self.prior_pi < 1,
            "labels.prior_pi",
            f"must be in (0, 1), got {self.prior_pi!r}",
        )
        require(
            self.majority_view in views,
            "labels.majority_view",
            f"must be one of {views}, got {self.majority_view!r}",
        )
        _at_least(self.smoothing, 0, "labels.smoothing")
        _at_least(self.warmup_steps, 0, "labels.warmup_steps")
        require(
            len(self.choice_letters) > 0 and self.choice_letters.isalpha() and self.choice_letters.isupper(),
            "labels.choice_letters",
            f"must be upper-case letters, got {self.choice_letters!r}",
        )
        _at_least(self.verify_timeout_s, 1, "labels.verify_timeout_s")
        _at_least(self.verify_max_chars, 1, "labels.verify_max_chars")

    def strategy_at(self, step: int) -> str:
        """The selector of training step `step` (0-based): the warm-up one during the first warmup_steps."""
        if step < self.warmup_steps and self.warmup_strategy is not None:
            return self.warmup_strategy
        return self.strategy


@dataclass
class RewardConfig:
    """Per-sample reward from the pseudo-label (formulas in `harmony_mcore.labels.rewards`).

    kind: "match" 1/0 against the view's target; "soft_rank" 1 - rank / (soft_rank_top - 1) for the answer's
        rank among the selector's candidates (published option: top 8); "score" the selector score itself.
    reframe_reward: False gives every reframe-view sample the constant reward 0 (zero advantage).
    format_penalty: subtracted, times the share of missing sections, from reframe samples lacking the
        STRATEGY / REWRITTEN PROBLEM / SOLUTION sections. Default 0: the published code defines 0.1 but never
        applies it, so its results were obtained without it; 0.1 is the value its authors intended.
    sharpness_coef: matching samples get reward (1 + coef * sharpness). Default 0 for the same reason (the
        published 0.1 is never applied).
    """

    kind: RewardKind = "match"
    soft_rank_top: int = 8
    reframe_reward: bool = True
    format_penalty: float = 0.0
    sharpness_coef: float = 0.0

    def __post_init__(self) -> None:
        require(
            self.kind in get_args(RewardKind),
            "rewards.kind",
            f"must be one of {', '.join(get_args(RewardKind))}, got {self.kind!r}",
        )
        _at_least(self.soft_rank_top, 1, "rewards.soft_rank_top")
        _at_least(self.format_penalty, 0, "rewards.format_penalty")
        _at_least(self.sharpness_coef, 0, "rewards.sharpness_coef")


@dataclass
class CollapseConfig:
    """When the per-step label diagnostics count as a training collapse, and what to do then.

    A signal fires on a step when one of its thresholds is crossed (None disables that signal):
        min_entropy: mean answer entropy over the views (nats, averaged over questions) below this;
        max_accuracy_drop: label accuracy against ground truth (only where the data has it) more than this
            below its best value so far: confident, consistent and wrong (the SRT failure mode);
        max_empty_share: share of questions with an empty label above this.
    Collapse is declared after `patience` consecutive steps with a signal, and never before `min_step`.
    action: "warn" logs, "stop" ends the run, "rollback" restores the last good checkpoint.
    """

    enabled: bool = True
    action: CollapseAction = "warn"
    min_entropy: float | None = 0.01
    max_accuracy_drop: float | None = 0.1
    max_empty_share: float | None = 0.9
    patience: int = 3
    min_step: int = 0

    def __post_init__(self) -> None:
        require(
            self.action in get_args(CollapseAction),
            "collapse.action",
            f"must be one of {', '.join(get_args(CollapseAction))}, got {self.action!r}",
        )
        _at_least(self.min_entropy, 0, "collapse.min_entropy", optional=True)
        _fraction(self.max_accuracy_drop, "collapse.max_accuracy_drop", optional=True)
        _fraction(self.max_empty_share, "collapse.max_empty_share", optional=True)
        _at_least(self.patience, 1, "collapse.patience")
        _at_least(self.min_step, 0, "collapse.min_step")
