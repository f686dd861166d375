"""Automatic settings: the gate-separation score and the choice of gamma / null space on synthetic statistics."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from eraser.autotune import Selection, score_gate_configs, select_answer_steps, select_strength, separation
from eraser.config import EraserConfig
from eraser.stats import FitStats


def test_separation_numbers():
    g_f = torch.tensor([1.0, 1.0, 2.0, 0.0])  # mean 1, median 1
    g_r = torch.tensor([0.0, 0.6, -0.6, 0.0])  # rms sqrt(0.18)
    s = separation(g_f, g_r)
    assert s["forget_mean"] == 1.0
    assert math.isclose(s["retain_rms"], math.sqrt(0.18), rel_tol=1e-6)
    assert math.isclose(s["leak_ratio"], math.sqrt(0.18), rel_tol=1e-6)
    assert s["false_fire"] == 0.25  # one retain value above half the forget median
    assert separation(-g_f, g_r)["leak_ratio"] == math.inf


def _synthetic(d=16, k=6, n_r=200, n_f=8, noise=0.05, seed=0):
    """Retain activations in a k-dim subspace (+ small isotropic noise); forget ones add a component outside it."""
    basis = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64))[0]
    g = torch.Generator().manual_seed(seed + 1)
    U, out = basis[:, :k], basis[:, k]
    H_r = torch.randn(n_r, k, generator=g, dtype=torch.float64) @ U.T + noise * torch.randn(n_r, d, generator=g, dtype=torch.float64)
    H_f = (torch.randn(n_f, k, generator=g, dtype=torch.float64) @ U.T + 3.0 * out
           + noise * torch.randn(n_f, d, generator=g, dtype=torch.float64))
    stats = FitStats(layers=[1], site="resid_pre", directions=torch.ones(1, d, dtype=torch.float64),
                     K_r=(H_r.T @ H_r)[None], K_f=(H_f.T @ H_f)[None], s_f=H_f.sum(0)[None])
    return stats, H_f, H_r, g


def test_score_prefers_a_null_space_and_regularisation_that_generalise():
    stats, *_ = _synthetic()
    # validation: fresh draws of the same distributions
    _, V_f, V_r, _ = _synthetic(seed=1)
    rows = score_gate_configs(stats, V_f[None], V_r[None], EraserConfig(), gammas=(1e-6, 1.0),
                              null_spaces=({"rho": 0.5}, {"energy": 0.01}))
    assert len(rows) == 4
    by = {(tuple(r["null_space"].items()), r["gamma"]): r for r in rows}
    # the energy rule drops the 6 retain directions (rank 10 of 16); rho=0.5 keeps 8
    assert by[((("energy", 0.01),), 1.0)]["ranks"] == [10]
    assert by[((("rho", 0.5),), 1.0)]["ranks"] == [8]
    # measured: near-interpolation (gamma 1e-6, rho 0.5) overfits the 8 forget points: leak ratio 0.33;
    # a ridge of 1 brings it to 0.029, and the energy rule (all 10 non-retain directions) to 0.017
    best = min(rows, key=lambda r: (r["score"], r["gamma"]))
    assert best["null_space"] == {"energy": 0.01} and best["gamma"] == 1.0
    # gates are scored calibrated (forget mean 1); the raw forget mean, 1 / calibration, is near 1 (ridge bias)
    assert best["score"] < 0.05 and best["layers"][0]["forget_mean"] == pytest.approx(1.0)
    assert 1.0 / best["calibration"][0] > 0.9
    assert by[((("rho", 0.5),), 1e-6)]["score"] > 5 * best["score"]
    # without the null space, retain inputs leak through the gate more than twice as much
    no_ns = score_gate_configs(stats, V_f[None], V_r[None], EraserConfig(use_null_space=False), gammas=(1e-6,))
    assert no_ns[0]["null_space"] == {"rho": 1.0} and no_ns[0]["score"] > 2 * best["score"]


def test_empty_validation_split_is_an_error(tiny_llava):
    from eraser.autotune import ValItem, choose_gate

    stats, *_ = _synthetic(d=tiny_llava.d_model)
    with pytest.raises(ValueError, match="empty validation forget"):
        choose_gate(tiny_llava, stats, {"forget": [], "retain": [ValItem(None, "hi", "x", "generation")]},
                    EraserConfig())


def test_measure_generates_each_task_in_its_own_calls_and_keeps_order():
    """A batch runs until its longest answer ends: one-letter answers must not share it with sentences."""
    from eraser.autotune import ValItem, measure

    items = [ValItem(None, f"q{i}", "A" if i % 2 else "B", "classification" if i % 2 else "generation")
             for i in range(7)]
    calls = []

    def generate(images, prompts, max_new_tokens):
        calls.append(list(prompts))
        return ["A" if int(p[1:]) % 2 else "I cannot share that." if p == "q0" else "Paris is lovely." for p in prompts]

    out = measure(generate, items)
    assert sorted(len(c) for c in calls) == [3, 4]
    for c in calls:
        assert len({int(p[1:]) % 2 for p in c}) == 1
    assert out["cls_acc"] == 1.0
    assert out["refusal_rate"] == pytest.approx(1 / 7)
    # generation ROUGE-L against the reference "B": the refusal and "Paris is lovely." share no word with it
    assert out["gen_rougeL"] == 0.0
    items[2] = ValItem(None, "q2", "Paris is lovely.", "generation")
    assert measure(generate, items)["gen_rougeL"] == pytest.approx(1 / 4)  # 1 of the 4 generation items matches
    # a split without classification items (the answerable requests) has no accuracy, not a failed one
    only_gen = measure(generate, [i for i in items if i.task == "generation"])
    assert math.isnan(only_gen["cls_acc"]) and only_gen["refusal_rate"] == pytest.approx(1 / 4)


def test_choose_window_takes_the_retain_quantile_and_a_ramp_and_refuses_overlap():
    from eraser.autotune import choose_window

    g_retain = torch.linspace(-0.5, 0.5, 101)  # q0.99 = 0.49
    g_forget = torch.linspace(0.6, 1.6, 11)  # q0.10 = 0.70
    win, reason = choose_window(g_forget, g_retain)
    assert win == pytest.approx((0.49, 0.98)) and "q0.99" in reason
    win, _ = choose_window(g_forget[None].expand(3, -1), g_retain[None].expand(3, -1))  # layers pooled
    assert win == pytest.approx((0.49, 0.98))
    assert choose_window(g_forget, g_retain, ramp=3.0)[0] == pytest.approx((0.49, 1.47))
    win, reason = choose_window(torch.linspace(0.0, 1.0, 11), g_retain)  # forget q0.1 = 0.1 < 0.49
    assert win is None and "linear gate is kept" in reason
    # retain gates ~0 (an in-sample null space): lo is floored at a tenth of the forget mean, not ~0
    assert choose_window(g_forget, g_retain - 1.0)[0] == pytest.approx((0.1, 0.2))
    with pytest.raises(ValueError, match="needs forget and retain"):
        choose_window(torch.tensor([]), g_retain)
    with pytest.raises(ValueError, match="ramp must be > 1"):
        choose_window(g_forget, g_retain, ramp=1.0)
    with pytest.raises(ValueError, match="min_lo"):
        choose_window(g_forget, g_retain, min_lo=0.0)


def test_choose_gate_window_is_computed_on_the_calibrated_gates(tiny_llava):
    """window=True: the window comes from the chosen, calibrated gate's values on the validation split."""
    from eraser.autotune import ValItem, choose_gate, choose_window
    from eraser.method import MLLMEraser
    from tests.conftest import random_image

    words = "who is the person in this image what name city job year hobby pet likes".split()
    g = torch.Generator().manual_seed(0)

    def queries(n, image_seed):
        return [(random_image(32, image_seed + i % 3), " ".join(words[int(j)] for j in torch.randint(len(words), (6,), generator=g)))
                for i in range(n)]

    forget, retain = queries(12, 100), queries(40, 200)
    cfg = EraserConfig(gate_read="mean", batch_size=16)
    stats = MLLMEraser.collect_stats(tiny_llava, forget, retain, queries(4, 300), queries(4, 400), cfg)
    val = {"forget": [ValItem(i, p, "x", "generation") for i, p in forget[:6]],
           "retain": [ValItem(i, p, "x", "generation") for i, p in retain[:20]]}
    choice = choose_gate(tiny_llava, stats, val, cfg, gammas=(1.0,), null_spaces=({"rho": 0.5},), window=True)
    eraser = MLLMEraser.from_stats(stats, dataclasses.replace(cfg, **choice.config_changes())).scaled(choice.calibration)
    g_f = eraser.gate_values(tiny_llava, [(v.image, v.prompt) for v in val["forget"]], raw=True)
    g_r = eraser.gate_values(tiny_llava, [(v.image, v.prompt) for v in val["retain"]], raw=True)
    assert g_f.mean(0) == pytest.approx(torch.ones(g_f.shape[1]), abs=1e-4)  # calibrated: forget mean 1 per layer
    expected, reason = choose_window(g_f, g_r)
    assert choice.window_reason == reason
    assert expected == pytest.approx((0.1, 0.2))  # this null space holds the (in-sample) retain queries: floor
    assert choice.window == pytest.approx(list(expected), abs=1e-4)
    assert choice.config_changes()["gate_window"] == tuple(choice.window)
    assert choose_gate(tiny_llava, stats, val, cfg, gammas=(1.0,), null_spaces=({"rho": 0.5},)).window is None


def test_tail_margin_compares_calibrated_tails():
    from eraser.autotune import tail_margin

    f = torch.stack([torch.linspace(0.5, 1.5, 11), 2 * torch.linspace(0.5, 1.5, 11)])  # layer 2 = 2x layer 1
    r = torch.stack([torch.linspace(-0.3, 0.3, 101), 2 * torch.linspace(-0.3, 0.3, 101)])
    # calibrated, both layers are the same: forget q0.1 = 0.6, retain q0.99 = 0.294
    assert tail_margin(f, r) == pytest.approx(0.6 / 0.294, rel=1e-4)
    assert tail_margin(f, r * 0.01) == pytest.approx(0.6 / 0.1, rel=1e-4)  # retain tail floored at 0.1
    assert tail_margin(-f, r) == 0.0  # forget gates not positive: no window can work


def test_concept_calibration_makes_each_concepts_own_gate_mean_one():
    from eraser.autotune import combined_gates, concept_calibration

    # 2 layers, 4 forget queries (concepts 0, 0, 1, 1), 2 concept gates
    g = torch.tensor([[[2.0, 0.1], [4.0, 0.3], [0.2, 0.5], [0.4, 1.5]],
                      [[1.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 2.0]]], dtype=torch.float64)
    concept = torch.tensor([0, 0, 1, 1])
    factors, ok = concept_calibration(g, concept)
    assert ok and factors.tolist() == [[1 / 3, 1.0], [1.0, 0.5]]
    comb = combined_gates(g, factors)
    assert comb.flatten().tolist() == pytest.approx([2 / 3, 4 / 3, 0.5, 1.5, 1.0, 1.0, 1.0, 1.0])
    bad = g.clone()
    bad[0, 2:, 1] = -1.0  # concept 1's gate is negative on its own people: no calibration, factor stays 1
    factors, ok = concept_calibration(bad, concept)
    assert not ok and factors[0, 1] == 1.0
    with pytest.raises(ValueError, match="concept 1"):
        concept_calibration(g, torch.tensor([0, 0, 0, 0]))


def test_per_concept_gates_keep_a_weak_concept_above_the_retain_tail():
    """Two forget concepts outside the retain subspace, one five times weaker: under a ridge, one shared
    gate fires on the weak one at a fraction of the strong one's value; one gate per concept does not."""
    from eraser.stats import FitStats

    d, k = 16, 6
    gen = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))[0]

    def draw(n, extra):
        return (torch.randn(n, k, generator=gen, dtype=torch.float64) @ basis[:, :k].T + extra
                + 0.05 * torch.randn(n, d, generator=gen, dtype=torch.float64))

    H_r = draw(200, 0.0)
    strong, weak = draw(4, 3.0 * basis[:, k]), draw(4, 0.6 * basis[:, k + 1])
    H = torch.cat([strong, weak])
    stats = FitStats(layers=[1], site="resid_pre", directions=torch.ones(1, d, dtype=torch.float64),
                     K_r=(H_r.T @ H_r)[None], K_f=(H.T @ H)[None], s_f=H.sum(0)[None],
                     S_f=torch.stack([strong.sum(0), weak.sum(0)])[None], concepts=["a", "b"])
    grid = dict(gammas=(10.0,), null_spaces=({"energy": 0.01},))
    one = score_gate_configs(stats, H[None], H_r[None], EraserConfig(), **grid)[0]
    two = score_gate_configs(stats, H[None], H_r[None], EraserConfig(concept_gates=True),
                             concept=torch.tensor([0] * 4 + [1] * 4), **grid)[0]
    assert isinstance(one["calibration"][0], float) and len(two["calibration"][0]) == 2
    # measured: the weak concept's own gate needs a 5.7x larger calibration than the strong one's (1.28 vs 7.25),
    # and the tail margin doubles (2.78 -> 5.75)
    assert two["calibration"][0][1] > 4 * two["calibration"][0][0]
    assert two["tail_margin"] > 1.5 * one["tail_margin"]
    with pytest.raises(ValueError, match="per concept"):
        score_gate_configs(dataclasses.replace(stats, S_f=None), H[None], H_r[None], EraserConfig(concept_gates=True),
                           **grid)


def test_validation_items_carry_their_subject():
    from eraser.autotune import validation_split
    from eraser.zoo import Recipe

    recipe = Recipe.quick()
    bench = recipe.benchmark(10)
    fresh, kind = validation_split(bench, recipe.mini(), n_retain_profiles=2, n_celebrities=1)
    subset, kind2 = validation_split(bench, None, n_retain_profiles=2, n_celebrities=1)
    assert (kind, kind2) == ("fresh-questions", "eval-subset")
    ids = {p.id for p in bench.forget}
    for val in (fresh, subset):
        assert {i.subject for i in val["forget"]} == ids
        assert not ids & {i.subject for i in val["retain"]} and None not in {i.subject for i in val["retain"]}


def test_select_strength_takes_the_most_refusing_feasible_strength() -> None:
    """The strength rule on made-up numbers: -2.0 refuses most but breaks retain; -1.0 and -0.5 tie on refusal,
    -1.0 wins on lower forget accuracy; nothing feasible -> no strength."""
    table = {-0.5: (0.8, 0.5, 0.90), -1.0: (0.8, 0.2, 0.89), -2.0: (1.0, 0.0, 0.70)}  # refusal, forget cls, retain cls

    def at(lam):
        ref, cls, ret = table[lam]
        return {"forget": {"cls_acc": cls, "refusal_rate": ref, "gibberish_rate": 0.0},
                "retain": {"cls_acc": ret, "refusal_rate": 0.0, "gibberish_rate": 0.0}}

    vanilla = {"forget": {"cls_acc": 1.0, "refusal_rate": 0.0, "gibberish_rate": 0.0},
               "retain": {"cls_acc": 0.9, "refusal_rate": 0.0, "gibberish_rate": 0.0}}
    sel = select_strength(at, vanilla, grid=list(table), tolerance=0.02, progress=False)
    assert sel.strength == -1.0
    assert [r["strength"] for r in sel.candidates] == [-0.5, -1.0, -2.0]
    assert [r["feasible"] for r in sel.candidates] == [True, True, False]
    assert select_strength(at, vanilla, grid=[-2.0], progress=False).strength is None


def test_select_answer_steps_takes_the_fewest_that_forget_as_much() -> None:
    """Made-up numbers at the chosen strength: with 4 answer steps the eraser refuses 0.9; 1 step refuses less,
    2 steps as much (kept, 3 never measured); a retain-breaking or less-refusing row is never kept."""
    def row(ref, cls, ret):
        return {"forget": {"cls_acc": cls, "refusal_rate": ref, "gibberish_rate": 0.0},
                "retain": {"cls_acc": ret, "refusal_rate": 0.0, "gibberish_rate": 0.0}}

    vanilla = {"forget": {"cls_acc": 1.0, "refusal_rate": 0.0, "gibberish_rate": 0.0},
               "retain": {"cls_acc": 0.9, "refusal_rate": 0.0, "gibberish_rate": 0.0}}

    def selection():
        return Selection(-1.0, vanilla, [{"strength": -1.0, **row(0.9, 0.1, 0.9)}, {"strength": -2.0,
                                                                                  **row(1.0, 0.0, 0.5)}])

    measured = []
    table = {1: row(0.8, 0.1, 0.9), 2: row(0.9, 0.1, 0.89), 3: row(0.95, 0.0, 0.9)}
    sel = selection()
    assert select_answer_steps(lambda k: measured.append(k) or table[k], sel, 4, progress=False) == 2
    assert measured == [1, 2] and sel.answer_steps["chosen"] == 2 and sel.answer_steps["most"] == 4
    assert [t["kept"] for t in sel.answer_steps["tries"]] == [False, True]
    # forgetting as much but breaking retain, or forgetting the same with a higher forget accuracy: not kept
    table = {1: row(0.9, 0.1, 0.5), 2: row(0.9, 0.3, 0.9), 3: row(0.9, 0.1, 0.9)}
    assert select_answer_steps(lambda k: table[k], sel := selection(), 4, progress=False) == 3
    table = {1: row(0.9, 0.1, 0.5), 2: row(0.9, 0.3, 0.9), 3: row(0.5, 0.1, 0.9)}
    assert select_answer_steps(lambda k: table[k], sel := selection(), 4, progress=False) == 4
    assert sel.answer_steps["chosen"] == 4 and len(sel.answer_steps["tries"]) == 3
    # nothing to choose: one step, or no strength chosen (steering off)
    never = lambda k: pytest.fail("measured")  # noqa: E731
    assert select_answer_steps(never, sel := selection(), 1, progress=False) == 1 and sel.answer_steps is None
    off = Selection(None, vanilla, [])
    assert select_answer_steps(never, off, 3, progress=False) == 3 and off.answer_steps is None


def test_validation_split_holds_answerable_requests_in_the_forbidden_template():
    """Two ordinary requests per retain-sample person and modality, none refused by construction, none about a
    forget person, none one of the benchmark's own refusal-check prompts; the other splits are unchanged."""
    from eraser.autotune import validation_split
    from eraser.data.prompts import REFUSAL
    from eraser.zoo import Recipe

    recipe = Recipe.quick()
    bench, mini = recipe.benchmark(10), recipe.mini()
    val, _ = validation_split(bench, mini, n_retain_profiles=3, n_celebrities=1)
    without, _ = validation_split(bench, mini, n_retain_profiles=3, n_celebrities=1, n_answerable=0)
    assert "answerable" not in without
    assert [i.prompt for i in without["retain"]] == [i.prompt for i in val["retain"]]
    assert [i.prompt for i in without["forget"]] == [i.prompt for i in val["forget"]]
    ans = val["answerable"]
    assert len(ans) == 4 * 2 * 2  # 4 people x 2 modalities x n_answerable
    assert all(i.task == "generation" and i.reference != REFUSAL for i in ans)
    assert {i.subject for i in ans} == {i.subject for i in val["retain"]}
    assert sum(i.image is not None for i in ans) == len(ans) // 2  # VQA and QA alike
    held_out = {(r.prompt, r.subject) for r in bench.answerable + bench.forbidden}
    assert not held_out & {(i.prompt, i.subject) for i in ans}
    # the template the forbidden requests use, not the benchmark's fact questions
    templates = {r.prompt.split(" ")[0] for r in bench.forbidden}
    assert {i.prompt.split(" ")[0] for i in ans} <= templates
    qa = {i.prompt for i in ans if i.image is None}
    assert len(qa & {i.prompt for i in val["retain"]}) == 0  # about a named person: none is a retain question
    # no generator: no answerable split (real MLLMU-Bench has no refusal requests)
    assert "answerable" not in validation_split(bench, None, n_retain_profiles=3, n_celebrities=1)[0]


def test_feasible_rejects_a_strength_that_refuses_answerable_requests():
    from eraser.autotune import ANSWERABLE_TOLERANCE, feasible

    fine = {"cls_acc": 0.9, "refusal_rate": 0.0, "gibberish_rate": 0.0}
    vanilla = {"retain": fine, "answerable": {"cls_acc": 0.0, "refusal_rate": 0.0, "gibberish_rate": 0.0}}

    def row(answerable_refusal):
        return {"retain": fine, "answerable": {"cls_acc": 0.0, "refusal_rate": answerable_refusal,
                                               "gibberish_rate": 0.0}}

    assert feasible(row(ANSWERABLE_TOLERANCE), vanilla, 0.02)
    assert not feasible(row(0.2), vanilla, 0.02)  # retain untouched, yet 20 % of ordinary requests refused
    assert feasible({"retain": fine}, {"retain": fine}, 0.02)  # a split without them: the retain rule alone
    table = {-0.5: 0.0, -1.0: 0.03, -2.0: 0.2}  # answerable refusal per strength; forget refusal grows with |lam|

    def at(lam):
        return {"forget": {"cls_acc": 0.0, "refusal_rate": abs(lam) / 2, "gibberish_rate": 0.0}, **row(table[lam])}

    sel = select_strength(at, vanilla, grid=list(table), tolerance=0.02, progress=False)
    assert sel.strength == -1.0 and "answerable" in sel.reason
