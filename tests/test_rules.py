"""Closed forms of the entropy and branching rules (ARPO and AEPO rollout) against hand-computed
numbers."""
import math

import pytest
import torch

from aepo import (aepo_branch_probability, aepo_should_branch, arpo_branch_probability,
                  arpo_should_branch, global_budget, segment_entropy)
from loss import token_entropy


def test_token_entropy_uniform_and_onehot():
    assert token_entropy(torch.zeros(4)).item() == pytest.approx(math.log(4))
    logits = torch.tensor([0.0, -math.inf, -math.inf])
    assert token_entropy(logits).item() == 0.0                   # stable with -inf: no nan


def test_token_entropy_hand_value_and_batch_shape():
    # p = (0.5, 0.25, 0.25): H = 0.5 ln 2 + 2 * 0.25 ln 4 = 1.5 ln 2
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [1 / 3, 1 / 3, 1 / 3]]))
    h = token_entropy(logits)
    assert h.shape == (2,)
    torch.testing.assert_close(h, torch.tensor([1.5 * math.log(2), math.log(3)]))
    assert token_entropy(logits.to(torch.bfloat16)).dtype == torch.float32


def test_segment_entropy_window_and_normaliser():
    h = [1.0, 2.0, 3.0, 4.0]
    assert segment_entropy(h, w=2, vocab_size=100) == pytest.approx(3.0 / math.log(100))
    assert segment_entropy(h, w=20, vocab_size=math.e ** 2) == pytest.approx(10.0 / 2)
    assert segment_entropy([], w=20, vocab_size=10) == 0.0


@pytest.mark.parametrize("dh,expected",
                         [(0.0, 0.5), (1.0, 0.7), (-1.0, 0.3), (5.0, 1.0), (-5.0, 0.0)])
def test_arpo_probability(dh, expected):
    assert arpo_branch_probability(dh, tau=0.5, gamma=0.2) == pytest.approx(expected)


@pytest.mark.parametrize("dh,l,expected", [
    (0.0, 0, 0.5),                          # 1 + 0 - 0.5 / 1
    (1.0, 0, 0.7),                          # 1 + 0.2 - 0.5
    (0.0, 2, 1 - 0.5 / 0.9),                # c = 0.9
    (0.0, 10, 0.0),                         # c = 0.5: 1 - 0.5 / 0.5 = 0
    (0.0, 20, 0.0),                         # c = 0: branching forbidden
    (0.0, 30, 0.0),                         # c clipped at 0
    (3.0, 0, 1.0),                          # clipped at 1
    (-5.0, 0, 0.0),                         # clipped at 0
])
def test_aepo_probability(dh, l, expected):
    assert aepo_branch_probability(dh, tau=0.5, gamma=0.2, l=l) == pytest.approx(expected)


@pytest.mark.parametrize("tau", [-0.2, 0.0, 0.3, 0.5, 1.0, 1.2])
@pytest.mark.parametrize("dh,l", [(0.0, 0), (1.0, 0), (-1.0, 3), (0.5, 5), (0.0, 12), (2.0, 19),
                                  (0.0, 20), (3.0, 25)])
def test_single_draws_match_closed_forms_everywhere(dh, l, tau):
    """The per-draw rules select exactly the probability mass of the closed forms (u on a fine
    grid), the edges included: tau = 0 and 1, tau out of [0, 1], and the penalty's c = 0."""
    grid = [(i + 0.5) / 10000 for i in range(10000)]
    arpo = sum(arpo_should_branch(u, dh, tau, 0.2) for u in grid) / len(grid)
    aepo = sum(aepo_should_branch(u, dh, tau, 0.2, l) for u in grid) / len(grid)
    assert arpo == pytest.approx(arpo_branch_probability(dh, tau, 0.2), abs=2e-4)
    assert aepo == pytest.approx(aepo_branch_probability(dh, tau, 0.2, l), abs=2e-4)


def test_the_penalty_at_c_zero_forbids_branching_even_at_tau_zero():
    assert aepo_branch_probability(5.0, tau=0.0, gamma=0.2, l=20) == 0.0
    assert not aepo_should_branch(0.99, 5.0, tau=0.0, gamma=0.2, l=20)
    assert aepo_should_branch(0.0, -1.0, tau=0.0, gamma=0.2, l=19)      # c = 0.05 > 0, tau = 0


def test_global_budget_released_formula():
    # floor(8 * sigmoid(0)) + 1 = 5
    assert global_budget(8, 1.0, 1.0, beta=0.5) == 5
    # floor(12 * sigmoid(0.5 * 2)) + 1 = floor(12 * 0.7311) + 1 = 9
    assert global_budget(12, 3.0, 1.0, beta=0.5) == 9
    # floor(12 * sigmoid(-1)) + 1 = floor(3.227) + 1 = 4
    assert global_budget(12, 1.0, 3.0, beta=0.5) == 4
    assert global_budget(8, 100.0, 0.0, beta=0.5) == 8          # clamped to k
    assert global_budget(8, 0.0, 100.0, beta=0.5) == 1          # at least 1
    assert global_budget(1, 0.0, 0.0, beta=0.5) == 1
