"""interp.gradients: activation gradients from one backward pass, checked against finite differences."""
from __future__ import annotations

import pytest
import torch

from interp.gradients import frozen_weights, run_with_grads
from interp.names import HookNameError
from interp.patching import answer_logprob, logit_diff
from tests.conftest import random_image

PROMPTS = ["what is the name of the person in this image ?", "who is he"]


def _inputs(model):
    size = 32 if model.arch == "llava" else 64
    return model.encode(images=[random_image(size, 1), random_image(size, 2)], prompts=PROMPTS)


@pytest.mark.parametrize("name", ["blocks.1.hook_resid_mid", "blocks.0.attn.hook_z", "projector.hook_out",
                                  "vision.blocks.0.hook_mlp_out"])
def test_gradient_matches_central_finite_differences(tiny_model, name):
    """<grad, v> equals (m(x + eps v) - m(x - eps v)) / 2 eps for a random direction v at each kind of site."""
    model = tiny_model
    inputs = _inputs(model)
    metric = logit_diff(5, 7)
    run = run_with_grads(model, inputs, [name], metric)
    g = run.grads[name]
    v = torch.randn(g.shape, generator=torch.Generator().manual_seed(0))
    eps = 1e-3  # small: a random direction over every position moves the activation a lot per unit

    def shifted(sign):
        logits = model.run_with_hooks(inputs, [(name, lambda x, ctx: x + sign * eps * v.to(x))])
        return metric(logits, inputs).sum().item()

    fd = (shifted(1) - shifted(-1)) / (2 * eps)
    analytic = float((g * v).sum())
    assert abs(analytic) > 1e-3
    assert abs(fd - analytic) <= 2e-2 * abs(analytic)


def test_the_forward_pass_is_unchanged_and_activations_match_run_with_cache(tiny_model):
    model = tiny_model
    inputs = _inputs(model)
    metric = answer_logprob(3)
    names = ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    run = run_with_grads(model, inputs, names, metric)
    logits, cache = model.run_with_cache(inputs, names=names)
    assert torch.allclose(run.values, metric(logits, inputs), atol=1e-5)
    for n in names:
        assert torch.allclose(run.acts[n], cache[n], atol=1e-5)
        assert run.grads[n].shape == cache[n].shape
    same = model.run_with_grads(inputs, names, metric)  # the method is the function
    assert all(torch.equal(same.grads[n], run.grads[n]) for n in names)
    # rows do not interact: row 0's gradient is the gradient of row 0's metric alone
    only_first = run_with_grads(model, inputs, names, lambda lg, inp: metric(lg, inp) * torch.tensor([1.0, 0.0]))
    assert torch.allclose(only_first.grads[names[0]][0], run.grads[names[0]][0], atol=1e-6)
    assert float(only_first.grads[names[0]][1].abs().max()) == 0.0
    # modality slicing works on the gradients: image positions carry gradient, padding none
    assert float(run.grads.image(names[0], padded=True)[0].abs().sum()) > 0


def test_reads_are_activations_without_gradients(tiny_llava):
    inputs = _inputs(tiny_llava)
    metric = answer_logprob(3)
    names, reads = ["blocks.1.hook_resid_post"], ["hook_embed", "blocks.0.attn.hook_z", "blocks.1.hook_resid_post"]
    run = run_with_grads(tiny_llava, inputs, names, metric, reads=reads)
    plain = run_with_grads(tiny_llava, inputs, names, metric)
    _, cache = tiny_llava.run_with_cache(inputs, names=reads)
    assert set(run.acts.names) == set(reads) and run.grads.names == names
    assert torch.equal(run.grads[names[0]], plain.grads[names[0]]) and torch.equal(run.values, plain.values)
    for n in reads:
        assert torch.allclose(run.acts[n], cache[n], atol=1e-6)
    with pytest.raises(HookNameError):
        run_with_grads(tiny_llava, inputs, names, metric, reads=["blocks.9.hook_resid_pre"])


def test_weights_flags_mode_and_grads_are_restored(tiny_llava):
    model = tiny_llava
    hf = model.hf_model
    flags = [p.requires_grad for p in hf.parameters()]
    first = next(hf.parameters())
    first.requires_grad_(not flags[0])  # a mixed pattern, to see it restored as it was
    hf.train()
    try:
        run_with_grads(model, _inputs(model), "blocks.*.hook_resid_post", logit_diff(5, 7))
        assert first.requires_grad == (not flags[0])
        assert all(p.requires_grad == f for p, f in list(zip(hf.parameters(), flags))[1:])
        assert hf.training
        assert all(p.grad is None for p in hf.parameters())
    finally:
        first.requires_grad_(flags[0])
        hf.eval()
    with frozen_weights(hf):
        assert not any(p.requires_grad for p in hf.parameters()) and not hf.training


def test_hooks_act_before_the_gradient_is_taken(tiny_llava):
    model = tiny_llava
    inputs = _inputs(model)
    steer = [("blocks.0.hook_resid_post", lambda x, ctx: x * 1.5)]
    run = run_with_grads(model, inputs, ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                         logit_diff(5, 7), hooks=steer)
    _, cache = model.run_with_cache(inputs, names=["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"],
                                    hooks=steer)
    for n in cache.names:
        assert torch.allclose(run.acts[n], cache[n], atol=1e-5)
    # hooks attached for a block on the plain-PyTorch backend (an eraser.attached block) act the same way
    with model.hooks(steer, backend="torch"):
        attached = run_with_grads(model, inputs, cache.names, logit_diff(5, 7))
    for n in cache.names:
        assert torch.allclose(attached.acts[n], run.acts[n], atol=1e-6)
        assert torch.allclose(attached.grads[n], run.grads[n], atol=1e-6)


def test_bad_requests_are_clear_errors(tiny_llava):
    model = tiny_llava
    inputs = _inputs(model)
    metric = logit_diff(5, 7)
    with pytest.raises(ValueError, match="hook_q"):
        run_with_grads(model, inputs, ["blocks.0.attn.hook_pattern"], metric)
    assert "blocks.0.attn.hook_pattern" not in run_with_grads(model, inputs, "blocks.0.attn.*", metric).acts
    text_only = model.encode(images=[None], prompts=["who is he"])
    with pytest.raises(ValueError, match="no images"):
        run_with_grads(model, text_only, ["projector.hook_out"], metric)
    with pytest.raises(ValueError, match="one value per row"):
        run_with_grads(model, inputs, ["blocks.0.hook_resid_post"], lambda lg, inp: metric(lg, inp).sum())
    with pytest.raises(ValueError, match="differentiably"):
        run_with_grads(model, inputs, ["blocks.0.hook_resid_post"], lambda lg, inp: torch.zeros(2))
    with pytest.raises(Exception, match="hook_resid_pst|closest|did you mean"):
        run_with_grads(model, inputs, ["blocks.0.hook_resid_pst"], metric)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="inference_mode"):
        run_with_grads(model, inputs, ["blocks.0.hook_resid_post"], metric)
    with torch.no_grad():  # lifted for the call
        assert run_with_grads(model, inputs, ["blocks.0.hook_resid_post"], metric).grads["blocks.0.hook_resid_post"].abs().sum() > 0
    with model.hooks([("blocks.0.hook_resid_post", lambda x, ctx: x)], backend="nnsight"):
        with pytest.raises(ValueError, match="backend='torch'"):
            run_with_grads(model, inputs, ["blocks.0.hook_resid_post"], metric)
