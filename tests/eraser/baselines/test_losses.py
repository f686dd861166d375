"""The baselines' losses against hand-computed numbers, and the signs of their gradients."""
from __future__ import annotations

import math

import pytest
import torch

from eraser.baselines import losses as L
from interp.model import sequence_nll


def test_ga_is_negative_mean_nll_and_its_descent_raises_nll():
    nll = torch.tensor([1.0, 3.0], requires_grad=True)
    loss = L.ga_loss(nll)
    assert loss.item() == pytest.approx(-2.0)
    loss.backward()
    assert nll.grad.tolist() == pytest.approx([-0.5, -0.5])  # a descent step increases the forget NLL


def test_grad_diff_and_kl_min_numbers_and_signs():
    f = torch.tensor([1.0, 3.0], requires_grad=True)
    r = torch.tensor([0.5, 1.5], requires_grad=True)
    loss = L.grad_diff_loss(f, r, retain_weight=2.0)
    assert loss.item() == pytest.approx(-2.0 + 2.0 * 1.0)
    loss.backward()
    assert f.grad.tolist() == pytest.approx([-0.5, -0.5])
    assert r.grad.tolist() == pytest.approx([1.0, 1.0])  # descent lowers the retain NLL
    kl = torch.tensor([0.25, 0.75])
    assert float(L.kl_min_loss(torch.tensor([1.0, 3.0]), kl, retain_weight=0.5)) == pytest.approx(-2.0 + 0.25)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_at_the_reference_is_two_over_beta_log_two(beta):
    lp = torch.tensor([-3.0, -7.5])
    assert float(L.npo_loss(lp, lp.clone(), beta)) == pytest.approx((2 / beta) * math.log(2), rel=1e-6)


def test_npo_hand_numbers_and_gradient():
    beta = 0.1
    ref = torch.tensor([-5.0, -5.0])
    theta = torch.tensor([-15.0, 5.0], requires_grad=True)  # log ratios -10 and +10
    loss = L.npo_loss(theta, ref, beta)
    # -(2/beta) log sigmoid(-beta r): r=-10 -> -20 log sigmoid(1) = 6.265234; r=+10 -> -20 log sigmoid(-1) = 26.265234
    assert loss.item() == pytest.approx((6.265234 + 26.265234) / 2, abs=1e-5)
    loss.backward()
    # d/dr = 2 sigmoid(beta r) (> 0: descent lowers log p_theta), averaged over the batch
    expected = [2 * torch.sigmoid(torch.tensor(beta * r)).item() / 2 for r in (-10.0, 10.0)]
    assert theta.grad.tolist() == pytest.approx(expected, rel=1e-6)
    assert all(g > 0 for g in theta.grad.tolist())
    # the gradient shrinks once the forget answer is already unlikely (bounded, unlike GA)
    assert theta.grad[0] < theta.grad[1]


def test_npo_retain_term_and_bad_beta():
    lp = torch.tensor([-2.0])
    base = float(L.npo_loss(lp, lp, 1.0))
    with_rt = float(L.npo_loss(lp, lp, 1.0, retain_nll=torch.tensor([0.4, 0.6]), retain_weight=2.0))
    assert with_rt == pytest.approx(base + 1.0)
    with pytest.raises(ValueError):
        L.npo_loss(lp, lp, 0.0)


def _logits_for(probs: list[list[float]]) -> torch.Tensor:
    """[1, pos, vocab] logits whose softmax at each position is ``probs``."""
    return torch.tensor(probs).log().unsqueeze(0)


def test_sequence_logprob_sums_answer_tokens_and_matches_sequence_nll():
    # positions 0..3; labels at positions 2 and 3 -> predicted from positions 1 and 2
    logits = _logits_for([[0.9, 0.1], [0.25, 0.75], [0.5, 0.5], [0.3, 0.7]])
    labels = torch.tensor([[-100, -100, 1, 0]])
    lp = L.sequence_logprob(logits, labels)
    assert float(lp) == pytest.approx(math.log(0.75) + math.log(0.5), rel=1e-6)
    assert float(-lp / 2) == pytest.approx(float(sequence_nll(logits, labels)), rel=1e-6)


def test_token_kl_hand_number_and_masking():
    ref = _logits_for([[0.5, 0.5], [0.5, 0.5], [0.1, 0.9]])
    theta = _logits_for([[0.9, 0.1], [0.25, 0.75], [0.1, 0.9]])
    labels = torch.tensor([[-100, 1, 0]])  # positions 0 and 1 predict labelled tokens; position 2 predicts nothing
    kl = L.token_kl(theta, ref, labels)
    kl0 = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert float(kl) == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    masked = L.token_kl(theta, ref, torch.tensor([[-100, -100, 0]]))
    assert float(masked) == pytest.approx(kl1, rel=1e-5)


def test_token_kl_is_zero_at_the_reference_with_zero_gradient():
    torch.manual_seed(0)
    ref = torch.randn(2, 5, 7)
    theta = ref.clone().requires_grad_(True)
    labels = torch.tensor([[-100, -100, 3, 4, 1], [-100, 2, 2, 0, -100]])
    kl = L.token_kl(theta, ref, labels)
    assert kl.abs().max() < 1e-6
    kl.sum().backward()
    assert theta.grad.abs().max() < 1e-6
    assert float(L.token_kl(torch.randn(2, 5, 7), ref, labels).min()) > 0
