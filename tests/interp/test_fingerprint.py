"""The weight fingerprint: stable for the same weights, changed by any write to a sampled tensor, cached between."""
from __future__ import annotations

import pytest
import torch

import interp.fingerprint as fingerprint
from interp.fingerprint import fingerprint_mismatch, model_fingerprint
from interp.tiny import tiny_vlm


@pytest.fixture(scope="module")
def model():
    return tiny_vlm("llava", seed=0)


def test_fingerprint_is_stable_and_names_the_model(model):
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(model)
    assert (fp["arch"], fp["d_model"], fp["n_layers"]) == ("llava", model.d_model, model.n_layers)
    assert fp["vocab_size"] == model.hf_model.get_input_embeddings().weight.shape[0]
    other = model_fingerprint(tiny_vlm("llava", seed=1))
    assert fingerprint_mismatch(fp, other) == [f"weights: artifact has {fp['weights']!r}, model has {other['weights']!r}"]


def test_a_repeat_reuses_the_hash_and_any_write_recomputes_it(model, monkeypatch):
    calls = []
    sample = fingerprint._sample
    monkeypatch.setattr(fingerprint, "_sample", lambda t, *a: calls.append(1) or sample(t, *a))
    base = model_fingerprint(model)["weights"]
    calls.clear()
    assert model_fingerprint(model)["weights"] == base and calls == []  # cached: nothing sampled
    state = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    emb = model.hf_model.get_input_embeddings().weight
    try:
        with torch.no_grad():  # an in-place edit (what an optimizer step does)
            emb[0, 0] += 1.0
        edited = model_fingerprint(model)["weights"]
        assert edited != base and len(calls) == 4
        head = model.hf_model.lm_head
        opt = torch.optim.SGD([head.weight], lr=0.1)
        head.weight.grad = torch.ones_like(head.weight)
        opt.step()
        stepped = model_fingerprint(model)["weights"]
        assert stepped not in (base, edited)
        head.weight.grad = None
        swapped = head.weight.data.clone()
        swapped[0, 0] += 1.0
        head.weight.data = swapped  # new storage under the same Parameter (its version counter is not the signal)
        swapped_hash = model_fingerprint(model)["weights"]
        assert swapped_hash not in (base, edited, stepped)
        head.weight = torch.nn.Parameter(head.weight.detach() * 2)  # a new tensor object (e.g. a reload)
        assert model_fingerprint(model)["weights"] not in (base, edited, stepped, swapped_hash)
    finally:
        model.hf_model.load_state_dict(state)  # a write too: back to the original weights and hash
    assert model_fingerprint(model)["weights"] == base


def test_dtype_is_named_and_old_fingerprints_without_it_still_match(tiny_llava):
    import copy

    fp = model_fingerprint(tiny_llava)
    assert fp["dtype"] == "float32"
    old = {k: v for k, v in fp.items() if k != "dtype"}  # an artifact saved before dtype was recorded
    assert fingerprint_mismatch(old, fp) == []
    half = copy.deepcopy(tiny_llava.hf_model).to(torch.bfloat16)
    from interp import HookedVLM

    wrapped = HookedVLM.from_hf(half, tokenizer=tiny_llava.tokenizer, image_processor=tiny_llava.image_processor)
    diffs = fingerprint_mismatch(fp, model_fingerprint(wrapped))
    assert diffs[0] == "dtype: artifact has 'float32', model has 'bfloat16'" and diffs[1].startswith("weights")


def test_each_sampled_tensor_is_in_the_hash():
    """From a mutation audit: hashing the first decoder layer twice instead of the first and the last went unseen.
    A change to the embeddings, the first or the last decoder layer, or the unembedding must change the hash."""
    import copy

    from interp.adapters import get_module

    base = tiny_vlm("llava", seed=0)
    want = model_fingerprint(base)["weights"]
    layers = lambda m: get_module(m.hf_model, m.adapter.lm_layers)  # noqa: E731
    picks = {"embeddings": lambda m: m.hf_model.get_input_embeddings().weight,
             "first layer": lambda m: next(layers(m)[0].parameters()),
             "last layer": lambda m: next(layers(m)[-1].parameters()),
             "unembedding": lambda m: get_module(m.hf_model, m.adapter.lm_head).weight}
    for what, pick in picks.items():
        changed = copy.deepcopy(base)
        with torch.no_grad():
            pick(changed).add_(1e-3)
        assert model_fingerprint(changed)["weights"] != want, what
    assert model_fingerprint(copy.deepcopy(base))["weights"] == want  # a copy alone changes nothing
