"""The plain-PyTorch hook backend gives exactly what the nnsight backend gives, and detaches cleanly."""
from __future__ import annotations

import pytest
import torch


def _steer(vec, prefill_only):
    def fn(x, ctx):
        if prefill_only and ctx.step > 0:
            return None
        return x + vec * ctx.last_token_mask(x).unsqueeze(-1) if ctx.is_prefill else x + vec

    return fn


def test_forward_parity_and_clean_detach(tiny_model, two_prompts):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = torch.linspace(-2, 2, tiny_model.d_model)
    spec = [("blocks.1.hook_resid_pre", _steer(vec, True)), ("blocks.0.hook_attn_out", lambda x, c: x * 1.5)]
    vanilla = tiny_model.run_with_hooks(inputs, [])
    via_nnsight = tiny_model.run_with_hooks(inputs, spec)
    with tiny_model.hooks(spec, backend="torch"):
        via_torch = tiny_model.run_with_hooks(inputs, [])
    with tiny_model.hooks(spec, backend="nnsight"):
        via_persistent = tiny_model.run_with_hooks(inputs, [])
    assert torch.equal(via_nnsight, via_torch) and torch.equal(via_nnsight, via_persistent)
    assert (via_nnsight - vanilla).abs().max() > 1e-3
    assert torch.equal(tiny_model.run_with_hooks(inputs, []), vanilla)  # detached bit for bit


@pytest.mark.parametrize("every_step", [False, True])
def test_generation_parity(tiny_model, two_prompts, every_step):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = 3 * torch.linspace(-1, 1, tiny_model.d_model)
    fn = _steer(vec, prefill_only=not every_step)
    a = tiny_model.generate(inputs, max_new_tokens=6, hooks=[("blocks.1.hook_resid_pre", fn)], every_step=every_step,
                            eos_token_id=None)
    with tiny_model.hooks([("blocks.1.hook_resid_pre", fn)], backend="torch"):
        b = tiny_model.generate(inputs, max_new_tokens=6, eos_token_id=None)
    assert torch.equal(a.sequences, b.sequences)


def test_hooks_are_removed_on_error(tiny_llava):
    inputs = tiny_llava.encode(prompts=["who is he"])
    vanilla = tiny_llava.run_with_hooks(inputs, [])
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x + 1)], backend="torch"):
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x + 1)], backend="nnsight"):
            raise RuntimeError("boom")
    assert torch.equal(tiny_llava.run_with_hooks(inputs, []), vanilla)
    assert not tiny_llava.hf_model.model.language_model.layers[0]._forward_pre_hooks


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_blocks_detached_out_of_order_remove_their_own_hooks(tiny_llava, backend):
    """Enter A, enter B, exit A: B's hooks alone remain (the nnsight backend used to drop the last entries,
    i.e. B's, and keep A's)."""
    import contextlib

    inputs = tiny_llava.encode(prompts=["who is he"])
    a = [("blocks.0.hook_resid_pre", lambda x, c: x + 1.0)]
    b = [("blocks.1.hook_resid_pre", lambda x, c: x * 0.5)]
    vanilla = tiny_llava.run_with_hooks(inputs, [])
    only_b = tiny_llava.run_with_hooks(inputs, b)
    outer, inner = contextlib.ExitStack(), contextlib.ExitStack()
    outer.enter_context(tiny_llava.hooks(a, backend=backend))
    inner.enter_context(tiny_llava.hooks(b, backend=backend))
    outer.close()
    try:
        assert torch.equal(tiny_llava.run_with_hooks(inputs, []), only_b)
    finally:
        inner.close()
    assert torch.equal(tiny_llava.run_with_hooks(inputs, []), vanilla)


def test_unknown_backend_and_names_fail_before_attaching(tiny_llava):
    with pytest.raises(ValueError, match="backend"):
        with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x)], backend="jax"):
            pass
    from interp import HookNameError

    with pytest.raises(HookNameError):
        with tiny_llava.hooks([("blocks.0.hook_resid_prex", lambda x, c: x)]):
            pass


def test_raw_call_outside_hookedvlm_is_a_clear_error(tiny_llava):
    inputs = tiny_llava.encode(prompts=["who is he"])
    with tiny_llava.hooks([("blocks.0.hook_resid_pre", lambda x, c: x)], backend="torch"):
        with pytest.raises(RuntimeError, match="outside a HookedVLM call"):
            with torch.no_grad():
                tiny_llava.hf_model(**inputs.model_kwargs())


def _recorder(seen, tag):
    def fn(x, ctx):
        seen.append((tag, ctx.step))

    return fn


def test_nested_blocks_on_one_site_count_steps_once(tiny_llava):
    """Two ``model.hooks`` blocks on the same site both see the prefill pass as step 0 (one count per module call)."""
    inputs = tiny_llava.encode(prompts=["who is he"])
    seen: list = []
    with tiny_llava.hooks([("blocks.1.hook_resid_pre", _recorder(seen, "outer"))], backend="torch"):
        with tiny_llava.hooks([("blocks.1.hook_resid_pre", _recorder(seen, "inner")),
                               ("blocks.1.hook_resid_pre", _recorder(seen, "inner2"))], backend="torch"):
            tiny_llava.generate(inputs, max_new_tokens=3, eos_token_id=None)
    assert seen == [("outer", 0), ("inner", 0), ("inner2", 0), ("outer", 1), ("inner", 1), ("inner2", 1),
                    ("outer", 2), ("inner", 2), ("inner2", 2)]


def test_prefill_only_hooks_step_aside_for_decoding_and_come_back(tiny_llava):
    from interp import prefill_only

    inputs = tiny_llava.encode(prompts=["who is he", "who is she now"])
    layer = tiny_llava.hf_model.model.language_model.layers[1]
    seen: list = []
    vec = 3 * torch.linspace(-1, 1, tiny_llava.d_model)
    marked = prefill_only(_steer(vec, prefill_only=True))
    with tiny_llava.hooks([("blocks.1.hook_resid_pre", _recorder(seen, "plain"))], backend="torch"):
        tiny_llava.generate(inputs, max_new_tokens=4, eos_token_id=None)
    assert [s for _, s in seen] == [0, 1, 2, 3]  # an unmarked hook runs at every step

    calls: list = []
    probe = prefill_only(lambda x, ctx: calls.append(ctx.step))
    during: list = []  # how many pre-hooks the layer holds at each of its calls (this counter included)
    counter = layer.register_forward_pre_hook(lambda m, a: during.append(len(layer._forward_pre_hooks)))
    try:
        with tiny_llava.hooks([("blocks.1.hook_resid_pre", probe), ("blocks.1.hook_resid_pre", marked)],
                              backend="torch"):
            fast = tiny_llava.generate(inputs, max_new_tokens=4, eos_token_id=None)
            again = tiny_llava.generate(inputs, max_new_tokens=4, eos_token_id=None)
            assert len(layer._forward_pre_hooks) == 2  # put back after each call
    finally:
        counter.remove()
    assert calls == [0, 0]  # called at prefill only, once per generate
    # Ours runs first (prepended) and steps aside at prefill, before the counter runs: so the counter never
    # sees it, and during decoding there is no hook of ours left to dispatch.
    assert during == [1] * 8
    assert torch.equal(fast.sequences, again.sequences)
    reference = tiny_llava.generate(inputs, max_new_tokens=4, eos_token_id=None,
                                    hooks=[("blocks.1.hook_resid_pre", marked)])
    assert torch.equal(fast.sequences, reference.sequences)  # same as the nnsight graph, prefill only
    steered = tiny_llava.run_with_hooks(inputs, [("blocks.1.hook_resid_pre", marked)])
    assert (steered - tiny_llava.run_with_hooks(inputs, [])).abs().max() > 1e-3  # the hook does steer
    assert not layer._forward_pre_hooks


def _first_steps_steer(vec, last):
    """Steers the prompt's last token, then every new token up to step ``last``; None after."""
    def fn(x, ctx):
        if ctx.step > last:
            return None
        return x + vec * ctx.last_token_mask(x).unsqueeze(-1) if ctx.is_prefill else x + vec

    return fn


@pytest.mark.parametrize("last", [0, 2])
def test_first_steps_hooks_stop_after_their_last_step_on_both_backends(tiny_model, two_prompts, nnsight_handoffs,
                                                                       last):
    from interp import first_steps

    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = 3 * torch.linspace(-1, 1, tiny_model.d_model)
    steps: list = []

    def probe(x, ctx):
        steps.append(ctx.step)

    marked = [("blocks.1.hook_resid_pre", first_steps(_first_steps_steer(vec, last), last)),
              ("blocks.1.hook_resid_pre", first_steps(probe, last))]
    unmarked = [("blocks.1.hook_resid_pre", _first_steps_steer(vec, last))]
    reference = tiny_model.generate(inputs, max_new_tokens=6, hooks=unmarked, every_step=True, eos_token_id=None)
    with tiny_model.hooks(marked, backend="torch"):
        fast = tiny_model.generate(inputs, max_new_tokens=6, eos_token_id=None)
    assert steps == list(range(last + 1))  # dispatched up to its last step, never after
    calls = nnsight_handoffs
    counts = []
    for n in (last + 1, 6):
        calls["n"] = 0
        graph = tiny_model.generate(inputs, max_new_tokens=n, hooks=marked, every_step=True, eos_token_id=None)
        counts.append(calls["n"])
    assert counts[0] == counts[1] > 0  # the trace stood down after step ``last``
    assert torch.equal(fast.sequences, reference.sequences) and torch.equal(graph.sequences, reference.sequences)
    short = tiny_model.generate(inputs, max_new_tokens=1, hooks=marked, every_step=True, eos_token_id=None)
    assert torch.equal(short.sequences, reference.sequences[:, :inputs.input_ids.shape[1] + 1])  # fewer steps than marked


def test_first_steps_rejects_a_negative_step_and_plans_take_the_latest():
    from interp import first_steps, prefill_only
    from interp.hooks import last_step, plan_last_step

    with pytest.raises(ValueError, match="last step"):
        first_steps(lambda x, c: None, -1)
    assert last_step(prefill_only(lambda x, c: None)) == 0
    assert plan_last_step([first_steps(lambda x, c: None, 3), prefill_only(lambda x, c: None)]) == 3
    assert plan_last_step([first_steps(lambda x, c: None, 3), lambda x, c: None]) is None


def test_removal_inside_a_call_and_after_an_error_leaves_no_hook(tiny_llava):
    from interp import prefill_only

    inputs = tiny_llava.encode(prompts=["who is he"])
    layer = tiny_llava.hf_model.model.language_model.layers[0]

    def boom(x, ctx):
        raise RuntimeError("boom")

    with tiny_llava.hooks([("blocks.0.hook_resid_pre", prefill_only(lambda x, c: None))], backend="torch"):
        tiny_llava.generate(inputs, max_new_tokens=2)
        with pytest.raises(RuntimeError, match="boom"):
            with tiny_llava.hooks([("blocks.0.hook_resid_pre", boom)], backend="torch"):
                tiny_llava.generate(inputs, max_new_tokens=2)
        assert len(layer._forward_pre_hooks) == 1
    assert not layer._forward_pre_hooks


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_a_hook_returning_the_wrong_thing_fails_at_the_hook_on_both_backends(tiny_model, two_prompts, backend):
    from interp.torch_hooks import has_hooks

    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    n_pos = inputs.input_ids.shape[1]
    cases = [
        (lambda x, c: x[:, :1], ValueError,
         rf"hook on 'blocks.1.hook_resid_pre' returned shape \(2, 1, 128\), expected \(2, {n_pos}, 128\)"),
        (lambda x, c: 3, TypeError, r"hook on 'blocks.1.hook_resid_pre' returned int; return a tensor"),
    ]
    vanilla = tiny_model.run_with_hooks(inputs, [])
    for fn, error, message in cases:
        with pytest.raises(error, match=message):
            with tiny_model.hooks([("blocks.1.hook_resid_pre", fn)], backend=backend):
                tiny_model.run_with_hooks(inputs, [])
        assert not has_hooks(tiny_model)  # the failed block left nothing attached
    assert torch.equal(tiny_model.run_with_hooks(inputs, []), vanilla)


@pytest.mark.parametrize("backend", ["torch", "nnsight"])
def test_a_hook_computing_in_another_dtype_is_cast_back_and_integers_are_refused(tiny_model, two_prompts, backend):
    images, prompts = two_prompts
    inputs = tiny_model.encode(images=images, prompts=prompts)
    vec = torch.randn(tiny_model.d_model, dtype=torch.float64)
    in_f64 = lambda x, c: x.double() + vec  # float64 maths on a float32 model: cast back, same result
    in_f32 = lambda x, c: x + vec.float()
    with tiny_model.hooks([("blocks.1.hook_resid_pre", in_f64)], backend=backend):
        a = tiny_model.run_with_hooks(inputs, [])
    with tiny_model.hooks([("blocks.1.hook_resid_pre", in_f32)], backend=backend):
        b = tiny_model.run_with_hooks(inputs, [])
    assert a.dtype == torch.float32 and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(TypeError, match=r"hook on 'blocks.1.hook_resid_pre' returned a torch.int64 tensor for a "
                                        r"torch.float32 site"):
        with tiny_model.hooks([("blocks.1.hook_resid_pre", lambda x, c: (x * 100).long())], backend=backend):
            tiny_model.run_with_hooks(inputs, [])


def test_attached_hooks_visit_the_same_generation_steps_on_both_backends(tiny_llava):
    """In a block (``model.hooks``), a function acts on every step unless marked, on either backend; passed to
    ``generate`` itself, an unmarked function acts on the prefill only (``every_step=False``)."""
    from interp import first_steps, prefill_only

    inputs = tiny_llava.encode(images=[None], prompts=["who is this person"])
    marks = {"unmarked": (lambda f: f, [0, 1, 2, 3, 4]), "prefill_only": (prefill_only, [0]),
             "first_steps(2)": (lambda f: first_steps(f, 2), [0, 1, 2])}
    for backend in ("torch", "nnsight"):
        for label, (mark, expected) in marks.items():
            steps: list = []
            hook = mark(lambda x, c, steps=steps: steps.append(c.step) if c.step == 0 or label != "prefill_only" else None)
            with tiny_llava.hooks([("blocks.1.hook_resid_pre", hook)], backend=backend):
                tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None)
            assert steps == expected, (backend, label)
    steps = []
    tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None,
                        hooks=[("blocks.1.hook_resid_pre", lambda x, c: steps.append(c.step))])
    assert steps == [0]


@pytest.mark.parametrize("site", ["vision.blocks.0.hook_resid_post", "vision.blocks.0.hook_mlp_out"])
def test_an_edit_where_llava_reads_its_vision_features_reaches_the_projector_on_both_backends(tiny_llava, site):
    # The tiny LLaVA's projector reads hidden_states[-2], block 0's output, which transformers records with
    # its own forward hook: the torch backend's hook must run before that record (it ran after, unseen).
    assert tiny_llava.hf_model.config.vision_feature_layer == -2 and tiny_llava.n_vision_layers == 2
    from tests.conftest import random_image

    inputs = tiny_llava.encode(images=[random_image(32, 3)], prompts=["who is this"])
    vec = 0.5 * torch.linspace(-1, 1, tiny_llava.hf_model.config.vision_config.hidden_size)
    spec = [(site, lambda x, c: x + vec)]
    vanilla = tiny_llava.run_with_hooks(inputs, [])
    via_nnsight = tiny_llava.run_with_hooks(inputs, spec)
    with tiny_llava.hooks(spec, backend="torch"):
        via_torch, cache = tiny_llava.run_with_cache(inputs, names=["projector.hook_in"])
    _, clean = tiny_llava.run_with_cache(inputs, names=["projector.hook_in", "vision.blocks.0.hook_resid_post"])
    assert (via_nnsight - vanilla).abs().max() > 1e-2
    assert torch.allclose(via_torch, via_nnsight, atol=1e-5)
    expected = clean["vision.blocks.0.hook_resid_post"][:, 1:] + vec  # CLS row dropped by the projector's read
    assert torch.allclose(cache["projector.hook_in"], expected, atol=1e-5)


@pytest.mark.parametrize("mark", ["every_step", "attached", "first_steps"])
def test_a_vision_hook_beside_a_language_model_hook_keeps_it_acting_after_the_prefill(tiny_model, mark):
    """From an audit: with any vision-side hook in the plan, the nnsight trace waited on decode steps for the
    vision tower (which runs on the prefill only) and skipped the rest of each step, so the language-model hook
    acted on step 0 alone ([0] instead of [0..5]) and gave other tokens than the torch backend, silently."""
    from interp import first_steps
    from tests.conftest import random_image

    inputs = tiny_model.encode(images=[random_image(32, 1)], prompts=["who is the person in this image"])
    vision_width = tiny_model.hf_model.config.vision_config.hidden_size
    vec = 0.5 * torch.linspace(-1, 1, tiny_model.d_model)
    runs = {}
    for backend in ("nnsight", "torch"):
        steps: list = []

        def lm(x, c, steps=steps):
            steps.append(c.step)
            return x + vec

        lm_fn = first_steps(lm, 3) if mark == "first_steps" else lm
        spec = [("vision.blocks.0.hook_resid_post", lambda x, c: x + 0.1 * torch.ones(vision_width)
                 if c.is_prefill else None), ("blocks.2.hook_resid_pre", lm_fn)]
        if mark == "every_step" and backend == "nnsight":
            out = tiny_model.generate(inputs, max_new_tokens=6, eos_token_id=None, hooks=spec, every_step=True)
        else:
            with tiny_model.hooks(spec, backend=backend):
                out = tiny_model.generate(inputs, max_new_tokens=6, eos_token_id=None)
        runs[backend] = (sorted(set(steps)), out)
    assert runs["nnsight"][0] == runs["torch"][0] == ([0, 1, 2, 3] if mark == "first_steps" else list(range(6)))
    assert torch.equal(runs["nnsight"][1].sequences, runs["torch"][1].sequences)
    # only vision-side hooks, every step: served on the prefill, and the generate ends (an empty step never would)
    seen: list = []
    tiny_model.generate(inputs, max_new_tokens=3, eos_token_id=None, every_step=True,
                        hooks=[("vision.blocks.0.hook_resid_post", lambda x, c: seen.append(c.step))])
    assert seen == [0]
