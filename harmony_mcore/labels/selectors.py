"""Pseudo-label selectors: score every answer class of one question, then pick the label.

Notation, for one question with A answer classes and K views (view 0 = the solver view by default):
    c_k(a)  samples of view k whose answer is in class a          counts: (A, K)
    n_k     samples of view k, including those without an answer  totals: (K,)
    p_k(a)  = (c_k(a) + alpha) / (n_k + alpha A)                   proportions: (A, K); alpha: smoothing
A view without samples has p_k = 0 for every class (1/A with smoothing).

Every score function maps proportions (A, K) to scores (A,). An answer qualifies when its score is > 0; the
label is the qualifying answer with the highest score, ties broken by the higher total count sum_k c_k(a),
then by canonical order (class index). No qualifying answer -> no label (index -1, the empty label "").
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import ArrayLike

from harmony_mcore.labels.config import LabelConfig

# Scores closer than this are a tie (the same score computed along two float paths must not decide the label).
SCORE_DECIMALS = 12


def view_proportions(counts: np.ndarray, totals: np.ndarray, smoothing: float = 0.0) -> np.ndarray:
    """p_k(a) = (c_k(a) + alpha) / (n_k + alpha A). counts: (A, K), totals: (K,) -> (A, K) float64.

    A view with n_k = 0 gets p_k(a) = 0 (alpha = 0) or 1/A (alpha > 0).
    """
    counts = np.asarray(counts, dtype=np.float64)
    denominator = np.asarray(totals, dtype=np.float64) + smoothing * counts.shape[0]
    return np.divide(counts + smoothing, denominator, out=np.zeros_like(counts), where=denominator > 0)


def power_mean(p: np.ndarray, weights: Sequence[float], exponent: float) -> np.ndarray:
    """Weighted generalised mean M_q(a) = (sum_k w_k p_k(a)^q / sum_k w_k)^(1/q). p: (A, K) -> (A,).

    q = 1 arithmetic, q -> 0 geometric prod_k p_k^(w_k / sum w), q = -1 harmonic. For q <= 0 an answer absent
    from a view (p_k = 0) scores 0, the limit of the formula.
    """
    p = np.asarray(p, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    if exponent > 0:
        return (p**exponent @ w) ** (1.0 / exponent)
    present = np.all(p > 0, axis=1)
    safe = np.where(present[:, None], p, 1.0)
    with np.errstate(over="ignore"):  # p -> 0 with q < 0: p^q overflows to inf, and inf^(1/q) = 0, the limit
        mean = np.exp(np.log(safe) @ w) if exponent == 0 else (safe**exponent @ w) ** (1.0 / exponent)
    return np.where(present, mean, 0.0)


def harmonic_mean(p: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """Self-Harmony's score: sum_k w_k / sum_k (w_k / p_k(a)); with two equal weights 2 p0 p1 / (p0 + p1).

    Equals 1/2 [(p0 + p1) - (p0 - p1)^2 / (p0 + p1)]: self-consistency minus a view-disagreement penalty.
    0 for an answer missing from any view.
    """
    return power_mean(p, weights, -1.0)


def arithmetic_mean(p: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k p_k(a) / sum_k w_k. Equal weights and equal n_k: majority voting over the pooled views."""
    return power_mean(p, weights, 1.0)


def geometric_mean(p: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """prod_k p_k(a)^(w_k / sum w); 0 for an answer missing from any view."""
    return power_mean(p, weights, 0.0)


def lambda_power_mean(p: np.ndarray, weights: Sequence[float], lam: float) -> np.ndarray:
    """The paper's generalised mean M_k, k = 1 - lambda: lambda = 0 arithmetic, 1 geometric, 2 harmonic."""
    return power_mean(p, weights, 1.0 - lam)


def penalized_mean(p: np.ndarray, lam: float) -> np.ndarray:
    """The parameterisation of docs/labels.md: AM(a) - lambda (p0 - p1)^2 / (2 (p0 + p1)), two views. (A, 2) -> (A,).

    lambda = 0 arithmetic mean, lambda = 1 harmonic mean (AM - HM = (p0 - p1)^2 / (2 (p0 + p1))); larger
    lambda penalises view disagreement harder and can go negative (such answers do not qualify).
    """
    p0, p1 = np.asarray(p, dtype=np.float64).T
    total = p0 + p1
    penalty = np.divide((p0 - p1) ** 2, 2 * total, out=np.zeros_like(total), where=total > 0)
    return total / 2 - lam * penalty


def prior_invariant_score(p: np.ndarray, pi: float) -> np.ndarray:
    """Weighted invariant score with prior pi on view 0: pbar - pi (1 - pi) (p0 - p1)^2 / pbar, two views.

    pbar = pi p0 + (1 - pi) p1. pi = 1/2 gives the harmonic mean. Unlike the harmonic mean, an answer seen in
    view 0 only scores (2 pi - 1) p0, which is positive (so it qualifies) when pi > 1/2.
    """
    p0, p1 = np.asarray(p, dtype=np.float64).T
    pbar = pi * p0 + (1 - pi) * p1
    penalty = np.divide(pi * (1 - pi) * (p0 - p1) ** 2, pbar, out=np.zeros_like(pbar), where=pbar > 0)
    return pbar - penalty


def pooled_other_views(
    counts: np.ndarray, totals: np.ndarray, view: int, smoothing: float = 0.0
) -> np.ndarray:
    """Co-Reward's score for view `view`: the answer's frequency in all other views pooled. -> (A,).

    sum_{j != view} c_j(a) / sum_{j != view} n_j (with smoothing: view_proportions of the pooled counts).
    """
    others = [k for k in range(np.shape(counts)[1]) if k != view]
    pooled = np.asarray(counts)[:, others].sum(axis=1, keepdims=True)
    return view_proportions(pooled, np.asarray(totals)[others].sum(keepdims=True), smoothing)[:, 0]


def score_answers(counts: np.ndarray, totals: np.ndarray, strategy: str, cfg: LabelConfig) -> np.ndarray:
    """Scores of every class for every view's target, by `strategy`. counts: (A, K), totals: (K,) -> (K, A).

    Row k ranks the answers for the reward target of view k. All rows are equal except under co_reward, where
    view k is scored by the other views' majority.
    """
    num_views = len(cfg.views)
    if strategy == "co_reward":
        return np.stack([pooled_other_views(counts, totals, k, cfg.smoothing) for k in range(num_views)])
    p = view_proportions(counts, totals, cfg.smoothing)
    if strategy == "harmonic":
        scores = harmonic_mean(p, cfg.view_weights)
    elif strategy == "arithmetic":
        scores = arithmetic_mean(p, cfg.view_weights)
    elif strategy == "geometric":
        scores = geometric_mean(p, cfg.view_weights)
    elif strategy == "power_mean":
        scores = lambda_power_mean(p, cfg.view_weights, cfg.lam)
    elif strategy == "penalized_mean":
        scores = penalized_mean(p, cfg.lam)
    elif strategy == "prior":
        scores = prior_invariant_score(p, cfg.prior_pi)
    elif strategy == "majority":
        scores = p[:, cfg.views.index(cfg.majority_view)]
    else:
        raise ValueError(f"unknown label strategy {strategy!r}")
    return np.broadcast_to(scores, (num_views, len(scores)))


def rank_answers(scores: ArrayLike, total_counts: ArrayLike) -> list[int]:
    """Qualifying classes (score > 0), best first. scores, total_counts: (A,) -> class indices.

    Order: higher score (rounded to SCORE_DECIMALS), then higher total count, then lower class index
    (canonical order). Deterministic: depends on the values only.
    """
    score_list = np.asarray(scores, dtype=np.float64).tolist()
    total_list = np.asarray(total_counts).tolist()
    keys = sorted((-round(score, SCORE_DECIMALS), -total, a)
                  for a, (score, total) in enumerate(zip(score_list, total_list, strict=True)))
    return [a for negated_score, _, a in keys if negated_score < 0]


def select_label(scores: ArrayLike, total_counts: ArrayLike) -> int:
    """Class index of the label: the best of `rank_answers`, or -1 (empty label) when none qualifies."""
    ranked = rank_answers(scores, total_counts)
    return ranked[0] if ranked else -1
