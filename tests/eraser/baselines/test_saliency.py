"""MMUnlearner's weight saliency: importance from squared gradients, the ratio mask, masking gradients."""
from __future__ import annotations

import pytest
import torch

from eraser.baselines.saliency import mask_fraction, mask_gradients, saliency_mask, squared_grad_importance


def test_importance_is_the_mean_squared_batch_gradient_and_leaves_no_grad():
    lin = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, -1.0]]))
    params = dict(lin.named_parameters())
    batches = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])]
    # loss = (w . x)^2 -> grad 2 (w . x) x: batch 1: (2, 0); batch 2: (0, 2 * -3 * 3) = (0, -18)
    imp = squared_grad_importance(params, batches, lambda x: (lin(x) ** 2).sum())
    assert imp["weight"].tolist() == [[2.0, 162.0]]  # (4 + 0) / 2, (0 + 324) / 2
    assert lin.weight.grad is None
    with pytest.raises(ValueError, match="no batches"):
        squared_grad_importance(params, [], lambda x: x)


def test_mask_selects_where_forget_importance_outweighs_keep():
    forget = {"a": torch.tensor([3.0, 1.0, 0.0, 5.0]), "b": torch.tensor([[0.5]])}
    keep = {"a": torch.tensor([1.0, 1.0, 0.0, 0.0]), "b": torch.tensor([[1.0]])}
    m = saliency_mask(forget, keep, threshold=2.0)
    assert m["a"].tolist() == [True, False, False, True] and m["b"].tolist() == [[False]]
    assert mask_fraction(m) == pytest.approx(2 / 5)
    assert saliency_mask(forget, keep, threshold=0.4)["b"].tolist() == [[True]]
    with pytest.raises(ValueError, match="threshold"):
        saliency_mask(forget, keep, threshold=0.0)
    with pytest.raises(ValueError, match="different parameters"):
        saliency_mask(forget, {"a": keep["a"]})
    with pytest.raises(ValueError, match="forget importance"):
        saliency_mask({"a": torch.ones(2)}, {"a": torch.ones(3)})


def test_mask_gradients_zeroes_outside_the_mask():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([1.0, -2.0, 3.0])
    q = torch.nn.Parameter(torch.zeros(1))  # no gradient: skipped
    mask_gradients({"p": p, "q": q}, {"p": torch.tensor([True, False, True]), "q": torch.tensor([False])})
    assert p.grad.tolist() == [1.0, 0.0, 3.0] and q.grad is None
