"""Draft-length choice: expected tokens per unit of cost, and the decayed acceptance estimate behind it."""

import pytest

from metaspec.workers.draft_length import Acceptance, best_length, expected_tokens


def test_expected_tokens_matches_the_geometric_sum():
    assert expected_tokens(0.5, 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens(1.0, 4) == 5
    assert expected_tokens(0.0, 6) == 1


def test_best_length_is_the_argmax_of_tokens_per_cost():
    for alpha in (0.1, 0.4, 0.63, 0.8, 0.95):
        for cost in (0.02, 0.19, 0.5):
            k = best_length(alpha, cost, 8)
            ratios = [expected_tokens(alpha, j) / (1 + j * cost) for j in range(1, 9)]
            assert ratios[k - 1] == max(ratios)


def test_best_length_grows_with_acceptance_and_shrinks_with_cost():
    assert best_length(0.3, 0.2, 8) < best_length(0.7, 0.2, 8) < best_length(0.95, 0.2, 8)
    assert best_length(0.8, 0.6, 8) < best_length(0.8, 0.2, 8) < best_length(0.8, 0.02, 8)
    assert best_length(0.99, 0.0, 5) == 5 and best_length(0.0, 1.0, 5) == 1


def test_acceptance_follows_recent_steps():
    a = Acceptance(prior=0.5, weight=2.0, decay=0.8)
    assert a.alpha == 0.5
    for _ in range(20):
        a.update(4, 4)           # every draft fully accepted
    high = a.alpha
    assert high > 0.9
    for _ in range(20):
        a.update(0, 4)           # now every draft rejected at once
    assert a.alpha < 0.3 < high
