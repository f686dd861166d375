"""Training-based unlearning baselines: mechanics on a random tiny model, measured effects on the quick model."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from PIL import Image

from eraser.baselines import METHODS, unlearn, unlearning_data
from eraser.backend import nll_fn


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.RandomState(seed).randint(0, 255, (32, 32, 3), dtype=np.uint8))


FORGET = [(_image(1), "what is the name of the person in this image ?", "red"),
          (None, "what is the job of ann ?", "a"), (None, "where was ann born ?", "blue city")]
RETAIN = [(_image(2), "who is this person ?", "green"), (None, "what is the job of bob ?", "b"),
          (None, "where was bob born ?", "white")]


def _state(model):
    return {k: v.detach().clone() for k, v in model.hf_model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _mean_nll(model, rows):
    return float(np.mean(nll_fn(model)([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])))


# ----------------------------------------------------------------------------- mechanics (random tiny model)

@pytest.mark.parametrize("method", sorted(METHODS))
def test_trains_a_copy_and_leaves_the_original_bit_identical(tiny_llava, method):
    before, grads = _state(tiny_llava), [p.requires_grad for p in tiny_llava.hf_model.parameters()]
    mode = tiny_llava.hf_model.training
    new, info = unlearn(tiny_llava, method, FORGET, RETAIN, lr=1e-3, epochs=2, batch_size=2, progress=False)
    assert _same(before, _state(tiny_llava))
    assert [p.requires_grad for p in tiny_llava.hf_model.parameters()] == grads
    assert tiny_llava.hf_model.training == mode
    assert new.hf_model is not tiny_llava.hf_model and not new.hf_model.training
    assert not _same(before, _state(new))
    steps = 2 if method == "mmunlearner" else 4  # MMUnlearner ascends on the one forget row with an image
    assert info["steps"] == steps and len(info["history"]) == steps and info["fit_s"] > 0
    assert info["method"] == method and info["retain_weight"] == METHODS[method]


def test_ga_raises_forget_nll_and_npo_lowers_forget_probability(tiny_llava):
    start = _mean_nll(tiny_llava, FORGET)
    ga, _ = unlearn(tiny_llava, "ga", FORGET, [], lr=1e-3, epochs=3, batch_size=3, progress=False)
    assert _mean_nll(ga, FORGET) > start + 0.5
    npo, info = unlearn(tiny_llava, "npo", FORGET, [], lr=1e-3, epochs=3, batch_size=3, progress=False)
    assert _mean_nll(npo, FORGET) > start + 0.5  # exp(-NLL), the answer probability, fell
    hist = info["history"]
    assert hist[0]["forget_log_ratio"] == pytest.approx(0.0, abs=1e-4)  # starts at the reference
    assert hist[0]["loss"] == pytest.approx(2 / 0.1 * np.log(2), rel=1e-4)
    assert hist[-1]["forget_log_ratio"] < -1.0 and hist[-1]["loss"] < hist[0]["loss"]


def test_seeded_and_epoch_checkpoints_equal_shorter_runs(tiny_llava):
    a, _ = unlearn(tiny_llava, "grad_diff", FORGET, RETAIN, lr=1e-3, epochs=2, batch_size=2, seed=3, progress=False)
    b, _ = unlearn(tiny_llava, "grad_diff", FORGET, RETAIN, lr=1e-3, epochs=2, batch_size=2, seed=3, progress=False)
    assert _same(_state(a), _state(b))
    seen = {}

    def on_epoch(epoch, model, info):
        seen[epoch] = (_state(model), info["steps"])

    unlearn(tiny_llava, "grad_diff", FORGET, RETAIN, lr=1e-3, epochs=3, batch_size=2, seed=3, progress=False,
            on_epoch=on_epoch)
    assert sorted(seen) == [1, 2, 3] and seen[2][1] == 4
    assert _same(seen[2][0], _state(a))  # constant lr + epoch-by-epoch batch order: epoch sweeps need one run


def test_batch_loss_is_each_methods_formula(tiny_llava):
    """From a mutation audit: GradDiff reduced to GA (retain term dropped, retain forward still run) passed every
    test.  Each method's loss is its formula over the forget NLL and the retain NLL / KL, read independently."""
    import copy

    from eraser.baselines import losses as L
    from eraser.baselines.finetune import Example, batch_loss
    from interp import HookedVLM

    forget = [Example(*r) for r in FORGET[1:]]
    retain = [Example(*r) for r in RETAIN[1:]]
    ref_hf = copy.deepcopy(tiny_llava.hf_model)
    with torch.no_grad():
        for prm in ref_hf.parameters():
            prm.add_(0.02 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(prm.numel())))
    reference = HookedVLM.from_hf(ref_hf, tokenizer=tiny_llava.tokenizer, image_processor=tiny_llava.image_processor)

    def nll(rows):
        enc = tiny_llava.encode([r.image for r in rows], [r.prompt for r in rows], answers=[r.answer for r in rows])
        return float(tiny_llava.answer_nll(enc).mean())

    with torch.no_grad():
        f_nll, r_nll = nll(forget), nll(retain)
        parts = {m: batch_loss(m, tiny_llava, reference, forget, retain)[1] for m in METHODS}
        gd_half = batch_loss("grad_diff", tiny_llava, reference, forget, retain, retain_weight=0.5)[1]
        gd_zero = batch_loss("grad_diff", tiny_llava, reference, forget, retain, retain_weight=0.0)[1]
        npo_self = batch_loss("npo", tiny_llava, tiny_llava, forget, retain)[1]
    assert r_nll > 1.0  # a retain term that cannot hide in the tolerance (float32 sums: abs 1e-5)
    for m in ("grad_diff", "mmunlearner"):
        assert parts[m]["forget_nll"] == pytest.approx(f_nll, rel=1e-5)
        assert parts[m]["retain_nll"] == pytest.approx(r_nll, rel=1e-5)
        assert parts[m]["loss"] == pytest.approx(-f_nll + r_nll, abs=1e-5)
    assert gd_half["loss"] == pytest.approx(-f_nll + 0.5 * r_nll, abs=1e-5)
    assert gd_zero["loss"] == pytest.approx(-f_nll, rel=1e-5) and "retain_nll" not in gd_zero
    assert parts["ga"]["loss"] == pytest.approx(-f_nll, rel=1e-5) and set(parts["ga"]) == {"forget_nll", "loss"}
    kl = parts["kl_min"]["retain_kl"]
    assert kl > 1e-4  # the perturbed reference differs from the model
    assert parts["kl_min"]["loss"] == pytest.approx(-f_nll + kl, abs=1e-5)
    # NPO at its reference: (2 / beta) log 2 exactly; against the perturbed reference, the formula of its log-ratios
    assert npo_self["loss"] == pytest.approx(2 / 0.1 * np.log(2), rel=1e-5)
    assert npo_self["forget_log_ratio"] == pytest.approx(0.0, abs=1e-5) and "retain_nll" not in parts["npo"]
    with torch.no_grad():
        def logp(model):
            enc = model.encode([r.image for r in forget], [r.prompt for r in forget],
                               answers=[r.answer for r in forget])
            return L.sequence_logprob(model.hf_model(**enc.model_kwargs()).logits, enc.labels)

        ratio = logp(tiny_llava) - logp(reference)
    assert parts["npo"]["forget_log_ratio"] == pytest.approx(float(ratio.mean()), rel=1e-4, abs=1e-5)
    by_hand = -(2 / 0.1) * torch.nn.functional.logsigmoid(-0.1 * ratio).mean()
    assert parts["npo"]["loss"] == pytest.approx(float(by_hand), rel=1e-5)


def test_bad_arguments(tiny_llava):
    with pytest.raises(ValueError, match="unknown method"):
        unlearn(tiny_llava, "sgd", FORGET, RETAIN, lr=1e-3, epochs=1, batch_size=2)
    with pytest.raises(ValueError, match="needs retain"):
        unlearn(tiny_llava, "grad_diff", FORGET, [], lr=1e-3, epochs=1, batch_size=2)
    with pytest.raises(ValueError):
        unlearn(tiny_llava, "ga", [], RETAIN, lr=1e-3, epochs=1, batch_size=2)
    # NaN and infinities trained NaN weights; a negative or NaN retain weight turned GradDiff into GA silently
    for kwargs, match in [({"lr": float("inf")}, "finite lr"), ({"lr": float("nan")}, "finite lr"),
                          ({"beta": float("nan")}, "beta"), ({"retain_weight": -1.0}, "retain_weight"),
                          ({"retain_weight": float("nan")}, "retain_weight"), ({"weight_decay": -0.1}, "weight_decay"),
                          ({"grad_clip": float("nan")}, "grad_clip")]:
        with pytest.raises(ValueError, match=match):
            unlearn(tiny_llava, "grad_diff", FORGET, RETAIN, **{"lr": 1e-3, **kwargs}, epochs=1, batch_size=2)
    for kwargs in ({"epochs": 1.5}, {"epochs": "2"}, {"lr": "1e-3"}, {"batch_size": True}):
        with pytest.raises(ValueError, match="must be integers and lr a number"):  # were raw TypeErrors
            unlearn(tiny_llava, "ga", FORGET, RETAIN, **{"lr": 1e-3, "epochs": 1, "batch_size": 2, **kwargs})
    with pytest.raises(ValueError, match="forget row 1 needs a non-empty prompt and answer"):  # trained on EOS alone
        unlearn(tiny_llava, "ga", [FORGET[0], (None, "what is the job of ann ?", " ")], RETAIN, lr=1e-3, epochs=1,
                batch_size=2)


def test_the_reference_runs_in_eval_mode_and_the_callers_mode_is_restored(tiny_llava, monkeypatch):
    # NPO and KL_Min read the caller's model as their frozen reference: with dropout in train mode two reads
    # of the same batch differed (0.76 in the logits on an audit's model with attention dropout 0.5)
    from eraser.baselines import finetune

    modes = []
    real = finetune._forward

    def spy(model, rows):
        if model is tiny_llava:
            modes.append(model.hf_model.training)
        return real(model, rows)

    monkeypatch.setattr(finetune, "_forward", spy)
    tiny_llava.hf_model.train()
    try:
        unlearn(tiny_llava, "npo", FORGET, RETAIN, lr=1e-4, epochs=1, batch_size=2)
        assert modes and not any(modes)  # every reference read in eval mode
        assert tiny_llava.hf_model.training  # the caller's mode is back
    finally:
        tiny_llava.hf_model.eval()


def test_mmunlearner_moves_only_the_salient_entries(tiny_llava):
    before = _state(tiny_llava)
    new, info = unlearn(tiny_llava, "mmunlearner", FORGET, RETAIN, lr=1e-2, epochs=3, batch_size=2,
                        progress=False, saliency_threshold=1.0)
    assert info["forget_text"] == "keep" and info["n_forget"] == 1 and info["n_retain"] == len(RETAIN) + 2
    after = _state(new)
    changed = sum(int((before[k] != after[k]).sum()) for k in before)
    total = sum(v.numel() for v in before.values())
    # Entries outside the mask get a zero gradient and, without weight decay, no Adam update: they stay bit-identical.
    assert 0 < info["mask_fraction"] < 1
    assert 0 < changed <= info["mask_fraction"] * total
    strict, strict_info = unlearn(tiny_llava, "mmunlearner", FORGET, RETAIN, lr=1e-2, epochs=3, batch_size=2,
                                  progress=False, saliency_threshold=100.0)
    n_strict = sum(int((before[k] != _state(strict)[k]).sum()) for k in before)
    assert strict_info["mask_fraction"] < info["mask_fraction"] and n_strict < changed  # a higher threshold frees fewer
    assert _same(before, _state(tiny_llava))


def test_mmunlearner_bad_settings(tiny_llava):
    for kwargs, match in [({"lora": True}, "full fine-tuning"), ({"weight_decay": 0.01}, "weight_decay"),
                          ({"forget_text": "drop"}, "forget_text"), ({"saliency_threshold": 0}, "saliency")]:
        with pytest.raises(ValueError, match=match):
            unlearn(tiny_llava, "mmunlearner", FORGET, RETAIN, lr=1e-3, epochs=1, batch_size=2, **kwargs)
    with pytest.raises(ValueError, match="mask is empty"):
        unlearn(tiny_llava, "mmunlearner", FORGET, RETAIN, lr=1e-3, epochs=1, batch_size=2,
                saliency_threshold=1e300)  # no ratio is that high: training would change nothing
    with pytest.raises(ValueError, match="saliency_threshold"):
        unlearn(tiny_llava, "mmunlearner", FORGET, RETAIN, lr=1e-3, epochs=1, batch_size=2, saliency_threshold="2")
    with pytest.raises(ValueError, match="MMUnlearner's settings"):
        unlearn(tiny_llava, "ga", FORGET, RETAIN, lr=1e-3, epochs=1, batch_size=2, forget_text="forget")
    with pytest.raises(ValueError, match=r"must be \(image or None, prompt, answer\)"):
        unlearn(tiny_llava, "ga", [(None, "who is ann")], RETAIN, lr=1e-3, epochs=1, batch_size=2)
    # a row with an empty image list is a text-only row, kept like one
    _, info = unlearn(tiny_llava, "mmunlearner", FORGET + [([], "where was ann born ?", "blue city")], RETAIN,
                      lr=1e-3, epochs=1, batch_size=2, progress=False)
    assert info["n_forget"] == 1 and info["n_retain"] == len(RETAIN) + 3
    text_only = [r for r in FORGET if r[0] is None]
    with pytest.raises(ValueError, match="with an image"):
        unlearn(tiny_llava, "mmunlearner", text_only, RETAIN, lr=1e-3, epochs=1, batch_size=2)
    _, info = unlearn(tiny_llava, "mmunlearner", text_only, RETAIN, lr=1e-3, epochs=1, batch_size=2,
                      forget_text="forget", progress=False)
    assert info["n_forget"] == 2 and info["steps"] == 1


def test_lora_trains_adapters_only_and_merges(tiny_llava):
    pytest.importorskip("peft")
    before = _state(tiny_llava)
    new, info = unlearn(tiny_llava, "ga", FORGET, [], lr=3e-3, epochs=2, batch_size=3, progress=False, lora=True,
                        lora_rank=4)
    assert _same(before, _state(tiny_llava))
    assert 0 < info["n_trainable"] < 0.2 * sum(p.numel() for p in tiny_llava.hf_model.parameters())
    after = _state(new)
    assert after.keys() == before.keys()  # merged back into a plain model
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("language_model" in k and "proj" in k for k in changed)
    assert _mean_nll(new, FORGET) > _mean_nll(tiny_llava, FORGET) + 0.5


# ----------------------------------------------------------------------------- measured effects (quick model)

@pytest.fixture(scope="module")
def quick():
    """The quick tiny LLaVA trained on MiniMLLMU, from the model cache (``$MLLMERASER_CACHE`` or
    ``~/.cache/mllmeraser``); trained there once per machine, shared with every other test and the CLI."""
    from eraser.zoo import Recipe, load_or_train

    recipe = Recipe.quick("llava")
    return load_or_train(recipe, progress=False), recipe.benchmark(5), recipe.mini()


def test_unlearning_data_uses_the_benchmark_questions(quick):
    from eraser.evaluate import build_items

    _, bench, _ = quick
    forget, retain = unlearning_data(bench)
    items = build_items(bench.forget)
    assert [(r.prompt, r.answer) for r in forget] == [(i.prompt, i.reference) for i in items]
    assert {r.answer for r, i in zip(forget, items) if i.task == "classification"} <= set("ABCD")
    assert len(retain) == len(build_items(bench.retain)) + len(build_items(bench.celebrity))
    sub = unlearning_data(bench, n_retain=10, seed=1)[1]
    assert len(sub) == 10 and sub == unlearning_data(bench, n_retain=10, seed=1)[1]


def test_retain_terms_keep_retain_nll_closer_to_its_start_than_ga(quick):
    model, bench, _ = quick
    forget, retain = unlearning_data(bench)
    held, train = retain[::7], [r for i, r in enumerate(retain) if i % 7]  # scored retain rows are never trained on
    f0, r0 = _mean_nll(model, forget), _mean_nll(model, held)
    drift, forgot = {}, {}
    for method in ("ga", "grad_diff", "kl_min", "npo"):
        new, _ = unlearn(model, method, forget, train, lr=1e-3, epochs=2, batch_size=16, progress=False)
        forgot[method] = _mean_nll(new, forget) - f0
        drift[method] = abs(_mean_nll(new, held) - r0)
    # measured on the zoo-2 quick model (ga / grad_diff / kl_min / npo): held-out retain NLL drift
    # 0.36 / 0.28 / 0.21 / 0.31 (an earlier, weaker quick model: 0.95 / 0.05 / 0.09 / 0.81)
    assert all(v > 0.3 for v in forgot.values()), forgot
    assert drift["grad_diff"] < drift["ga"] and drift["kl_min"] < drift["ga"], drift
    assert forgot["ga"] > forgot["grad_diff"]  # the retain term also brakes forgetting: the trade-off the paper reports


def test_mmunlearner_forgets_the_visual_questions_and_keeps_the_rest(quick):
    """The paper's reformulation on the quick model: ascend on the forget people's questions with an image,
    keep their text-only questions and the retain set.  Measured (lr 1e-3, 3 epochs, 2 threads, AMD EPYC): NLL
    of the forget visual answers 0.001 -> 0.20, forget text 0.0004 -> 0.00, held-out retain 0.002 -> 0.00, with
    6.6 % of the entries free to move; GA at the same setting: 5.7 / 5.2 / 1.14 (it forgets everything and wrecks
    retain)."""
    model, bench, _ = quick
    forget, retain = unlearning_data(bench)
    visual, text = [r for r in forget if r.image is not None], [r for r in forget if r.image is None]
    held, train = retain[::7], [r for i, r in enumerate(retain) if i % 7]
    v0, t0, r0 = _mean_nll(model, visual), _mean_nll(model, text), _mean_nll(model, held)
    new, info = unlearn(model, "mmunlearner", forget, train, lr=1e-3, epochs=3, batch_size=16, progress=False)
    v1, t1, r1 = _mean_nll(new, visual), _mean_nll(new, text), _mean_nll(new, held)
    assert 0.01 < info["mask_fraction"] < 0.3, info["mask_fraction"]
    assert v1 - v0 > 0.1, (v0, v1)
    assert t1 - t0 < 0.05 and r1 - r0 < 0.05, (t0, t1, r0, r1)
    assert v1 - v0 > 5 * max(t1 - t0, r1 - r0, 0.0)


# ----------------------------------------------------------------------------- the hyper-parameter sweep

def _row(lr, epochs, f_cls, r_cls, f_ref=0.0):
    return {"lr": lr, "epochs": epochs, "forget": {"cls_acc": f_cls, "refusal_rate": f_ref},
            "retain": {"cls_acc": r_cls, "refusal_rate": 0.0}}


def test_selection_rule():
    from eraser.baselines.select import annotate, choose

    vanilla = {"forget": {"cls_acc": 0.9, "refusal_rate": 0.0}, "retain": {"cls_acc": 0.9, "refusal_rate": 0.0}}
    rows = [annotate(r, vanilla, 0.03) for r in (
        _row(1e-4, 1, 0.8, 0.90), _row(1e-4, 2, 0.5, 0.88), _row(3e-4, 1, 0.5, 0.87, f_ref=0.2),
        _row(1e-3, 1, 0.0, 0.40))]
    row, ok, _ = choose(rows)
    assert ok and (row["lr"], row["epochs"]) == (3e-4, 1)  # ties on forget accuracy broken by refusal
    rows = [annotate(r, vanilla, 0.03) for r in (_row(1e-3, 1, 0.9, 0.95), _row(1e-3, 2, 0.9, 0.8),
                                                  _row(1e-3, 4, 0.2, 0.5), _row(3e-3, 4, 0.1, 0.6))]
    row, ok, reason = choose(rows[1:])
    assert not ok and (row["lr"], row["epochs"]) == (3e-3, 4) and "forget" in reason  # best retain among forgetters
    row, ok, _ = choose(rows)
    assert ok and (row["lr"], row["epochs"]) == (1e-3, 1)  # feasible even though it forgets nothing


def test_selection_breaks_multiple_choice_ties_by_generation_forgetting():
    """No feasible setting moves multiple choice (as on the quick model an Intel Xeon trains): the one that forgets
    generation most wins, not the cheapest no-op; a 0.004 ROUGE-L difference is noise and does not count."""
    from eraser.baselines.select import annotate, choose

    def row(lr, epochs, gen, r_cls=0.99):
        r = _row(lr, epochs, 1.0, r_cls)
        r["forget"]["gen_rougeL"] = gen
        return r

    vanilla = {"forget": {"cls_acc": 1.0, "refusal_rate": 0.0, "gen_rougeL": 0.98},
               "retain": {"cls_acc": 1.0, "refusal_rate": 0.0}}
    rows = [annotate(r, vanilla, 0.03) for r in (row(1e-4, 1, 0.98), row(3e-4, 2, 0.70), row(1e-3, 2, 0.35),
                                                  row(1e-3, 4, 0.0, r_cls=0.4))]
    best, ok, reason = choose(rows)
    assert ok and (best["lr"], best["epochs"]) == (1e-3, 2) and "ROUGE-L" in reason
    rows = [annotate(r, vanilla, 0.03) for r in (row(1e-4, 1, 0.980), row(3e-4, 1, 0.976))]
    assert choose(rows)[0]["lr"] == 1e-4  # within 0.01: the cheaper setting
    assert not rows[1]["forgets"]


def test_selection_holds_retain_generation_within_its_tolerance():
    """A setting that forgets generation by losing retain generation too (retain ROUGE-L 0.98 -> 0.45, multiple
    choice intact) is infeasible; the one within GEN_TOLERANCE wins, and without any feasible one the fallback
    prefers the better retain generation."""
    from eraser.baselines.select import annotate, choose

    def row(lr, epochs, f_gen, r_gen):
        r = _row(lr, epochs, 1.0, 0.99)
        r["forget"]["gen_rougeL"], r["retain"]["gen_rougeL"] = f_gen, r_gen
        return r

    vanilla = {"forget": {"cls_acc": 1.0, "refusal_rate": 0.0, "gen_rougeL": 0.98},
               "retain": {"cls_acc": 1.0, "refusal_rate": 0.0, "gen_rougeL": 0.98}}
    rows = [annotate(r, vanilla, 0.03) for r in (row(1e-4, 1, 0.98, 0.98), row(3e-4, 2, 0.60, 0.94),
                                                  row(1e-3, 2, 0.15, 0.45))]
    assert [r["feasible"] for r in rows] == [True, True, False]
    best, ok, reason = choose(rows)
    assert ok and (best["lr"], best["epochs"]) == (3e-4, 2) and "retain gen ROUGE-L >= vanilla - 0.05" in reason
    assert annotate(row(3e-4, 2, 0.60, 0.92), vanilla, 0.03)["feasible"] is False  # 0.06 below: outside
    assert annotate(row(3e-4, 2, 0.60, 0.92), vanilla, 0.03, gen_tolerance=0.1)["feasible"] is True
    rows = [annotate(r, vanilla, 0.03) for r in (row(1e-3, 1, 0.30, 0.60), row(1e-3, 2, 0.10, 0.40))]
    best, ok, reason = choose(rows)
    assert not ok and best["epochs"] == 1 and "gen ROUGE-L" in reason  # same retain cls: the better retain generation
    no_gen = {"forget": {"cls_acc": 1.0, "refusal_rate": 0.0}, "retain": {"cls_acc": 1.0, "refusal_rate": 0.0}}
    assert annotate(row(1e-3, 2, 0.15, 0.45), no_gen, 0.03)["feasible"]  # unmeasured on vanilla: not constrained


def test_select_baseline_on_the_quick_model(quick):
    import json

    from eraser.autotune import validation_split
    from eraser.baselines import select_baseline

    model, bench, source = quick
    val = validation_split(bench, source, n_retain_profiles=3, n_celebrities=1)
    sel = select_baseline(model, bench, "grad_diff", source, lrs=(1e-3,), epochs=(1, 2), val=val, progress=False)
    assert [(c["lr"], c["epochs"]) for c in sel.candidates] == [(1e-3, 1), (1e-3, 2)]
    assert (sel.lr, sel.epochs) in [(1e-3, 1), (1e-3, 2)] and sel.validation == "fresh-questions"
    chosen = next(c for c in sel.candidates if (c["lr"], c["epochs"]) == (sel.lr, sel.epochs))
    assert sel.feasible == chosen["feasible"] and sel.fit_s == chosen["fit_s"] > 0
    json.dumps(sel.to_dict())  # JSON-friendly, no model inside
    forget, retain = unlearning_data(bench)
    again, _ = unlearn(model, "grad_diff", forget, retain, lr=sel.lr, epochs=sel.epochs, batch_size=16, progress=False)
    assert _same(_state(sel.model), _state(again))  # the kept model is exactly the chosen setting's model
