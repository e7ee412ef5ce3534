"""Score functions and label selection (harmony_mcore.labels.selectors), on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harmony_mcore.labels.config import LabelConfig
from harmony_mcore.labels.selectors import (
    arithmetic_mean,
    geometric_mean,
    harmonic_mean,
    lambda_power_mean,
    penalized_mean,
    pooled_other_views,
    prior_invariant_score,
    rank_answers,
    score_answers,
    select_label,
    view_proportions,
)

EQUAL = [1.0, 1.0]
proportion_pairs = st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=6).map(np.array)


def label_of(counts, totals, strategy="harmonic", **cfg):
    """Label class index of one question under `strategy`. counts: (A, K)."""
    counts = np.asarray(counts)
    scores = score_answers(counts, np.asarray(totals), strategy, LabelConfig(strategy=strategy, **cfg))
    return select_label(scores[0], counts.sum(axis=1))


def test_harmonic_hand_computed():
    p = np.array([[0.8, 0.1], [0.2, 0.5], [0.0, 0.4]])
    # 2 p0 p1 / (p0 + p1)
    np.testing.assert_allclose(harmonic_mean(p, EQUAL), [0.16 / 0.9, 0.2 / 0.7, 0.0])


def test_answer_popular_in_one_view_loses_to_a_stable_one():
    # A: 8/10 solver, 1/10 reframe (9 votes); B: 2/10 and 5/10 (7 votes). Majority picks A, harmonic B:
    # HM(A) = 0.16 / 0.9 = 0.178 < HM(B) = 0.2 / 0.7 = 0.286.
    counts, totals = [[8, 1], [2, 5]], [10, 10]
    assert label_of(counts, totals, "arithmetic") == 0
    assert label_of(counts, totals, "harmonic") == 1


def test_lambda_zero_equals_majority_voting_over_both_views():
    counts, totals = [[8, 1], [2, 5], [0, 4]], [10, 10]
    pooled = np.asarray(counts).sum(axis=1)
    assert label_of(counts, totals, "power_mean", lam=0.0) == int(np.argmax(pooled)) == 0
    assert label_of(counts, totals, "penalized_mean", lam=0.0) == 0
    assert label_of(counts, totals, "power_mean", lam=2.0) == label_of(counts, totals, "harmonic") == 1


def test_k_views_with_weights():
    p = np.array([[0.5, 0.25, 1.0]])
    weights = [2.0, 1.0, 1.0]
    # sum w / sum (w / p) = 4 / (4 + 4 + 1)
    np.testing.assert_allclose(harmonic_mean(p, weights), [4 / 9])
    np.testing.assert_allclose(arithmetic_mean(p, weights), [(1.0 + 0.25 + 1.0) / 4])
    np.testing.assert_allclose(geometric_mean(p, weights), [(0.5**2 * 0.25 * 1.0) ** 0.25])


def test_prior_invariant_score_hand_computed():
    p = np.array([[0.5, 0.25], [0.4, 0.0]])
    # pi = 0.75: pbar = 0.4375, penalty = 0.1875 * 0.0625 / 0.4375; view-0-only answer: (2 pi - 1) p0 = 0.2
    np.testing.assert_allclose(prior_invariant_score(p, 0.75), [0.4375 - 0.1875 * 0.0625 / 0.4375, 0.2])
    assert prior_invariant_score(p, 0.25)[1] < 0  # favours view 1: a view-0-only answer does not qualify


def test_laplace_smoothing_hand_computed():
    counts, totals = np.array([[3, 0], [1, 2]]), np.array([4, 4])
    # (c + alpha) / (n + alpha * A) with alpha = 1, A = 2
    np.testing.assert_allclose(view_proportions(counts, totals, 1.0), [[4 / 6, 1 / 6], [2 / 6, 3 / 6]])
    np.testing.assert_allclose(view_proportions(counts, np.array([4, 0])), [[0.75, 0.0], [0.25, 0.0]])


def test_one_view_answer_needs_smoothing_to_become_the_label():
    counts, totals = [[6, 0], [1, 1]], [8, 8]
    assert label_of(counts, totals) == 1
    # alpha = 1: HM(7/10, 1/10) = 0.175 < HM(2/10, 2/10) = 0.2; alpha = 4: HM(10/16, 4/16) = 0.357 > 0.3125
    assert label_of(counts, totals, smoothing=1.0) == 1
    assert label_of(counts, totals, smoothing=4.0) == 0
    assert label_of([[6, 0]], [8, 8]) == -1
    assert label_of([[6, 0]], [8, 8], smoothing=1.0) == 0


def test_majority_over_one_view_and_co_reward():
    counts, totals = np.array([[5, 1], [3, 6]]), np.array([8, 8])
    assert label_of(counts, totals, "majority") == 0
    assert label_of(counts, totals, "majority", majority_view="reframe") == 1
    scores = score_answers(counts, totals, "co_reward", LabelConfig(strategy="co_reward"))
    # the solver view is scored by the reframe view's frequencies, and vice versa
    np.testing.assert_allclose(scores, [[1 / 8, 6 / 8], [5 / 8, 3 / 8]])
    three = np.array([[1, 2, 3], [4, 0, 0]])
    np.testing.assert_allclose(pooled_other_views(three, np.array([5, 2, 3]), 0), [5 / 5, 0.0])


def test_ties_break_by_total_count_then_canonical_order():
    # HM(3/12, 3/12) = 1/4 = HM(6/12, 2/12); class 1 has 8 samples against 6
    counts, totals = [[3, 3], [6, 2]], [12, 12]
    assert label_of(counts, totals) == 1
    assert label_of([[2, 2], [2, 2]], [4, 4]) == 0
    assert rank_answers(np.array([0.5, 0.5, 0.0, 0.7]), np.array([2, 2, 5, 1])) == [3, 0, 1]


def test_no_qualifying_answer_gives_the_empty_label():
    assert label_of(np.zeros((0, 2), dtype=int), [4, 4]) == -1
    assert label_of([[4, 0], [0, 4]], [4, 4]) == -1


@settings(deadline=None)
@given(proportion_pairs)
def test_hm_below_gm_below_am(p):
    hm, gm, am = harmonic_mean(p, EQUAL), geometric_mean(p, EQUAL), arithmetic_mean(p, EQUAL)
    assert np.all(hm <= gm + 1e-12) and np.all(gm <= am + 1e-12)


@settings(deadline=None)
@given(proportion_pairs)
def test_both_lambda_parameterisations_meet_at_the_named_means(p):
    hm, am = harmonic_mean(p, EQUAL), arithmetic_mean(p, EQUAL)
    np.testing.assert_allclose(lambda_power_mean(p, EQUAL, 2.0), hm, atol=1e-12)
    np.testing.assert_allclose(lambda_power_mean(p, EQUAL, 1.0), geometric_mean(p, EQUAL), atol=1e-12)
    np.testing.assert_allclose(lambda_power_mean(p, EQUAL, 0.0), am, atol=1e-12)
    np.testing.assert_allclose(penalized_mean(p, 1.0), hm, atol=1e-12)
    np.testing.assert_allclose(penalized_mean(p, 0.0), am, atol=1e-12)
    np.testing.assert_allclose(prior_invariant_score(p, 0.5), hm, atol=1e-12)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8)), min_size=1, max_size=5),
    st.sampled_from(["harmonic", "geometric", "power_mean"]),
    st.floats(1.0, 4.0),
)
def test_label_is_in_both_views_without_smoothing(counts, strategy, lam):
    counts = np.array(counts)
    label = label_of(counts, counts.sum(axis=0) + 1, strategy, lam=lam)
    assert label == -1 or np.all(counts[label] > 0)
    if label == -1:
        assert not np.any(np.all(counts > 0, axis=1))


@pytest.mark.parametrize("strategy", ["penalized_mean", "prior"])
def test_two_view_formulas_refuse_other_view_counts(strategy):
    with pytest.raises(ValueError, match="labels.views: must name exactly two views"):
        LabelConfig(strategy=strategy, views=["a", "b", "c"], view_weights=[1, 1, 1], majority_view="a")
