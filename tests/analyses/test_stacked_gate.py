"""analyses/stacked_gate.py: the gate fit on synthetic features with a known retain subspace, two-pass steering."""
from __future__ import annotations

import pytest
import torch

from analyses import stacked_gate as sg


def _features(n: int, people: list[str], gen: torch.Generator, d: int = 12) -> tuple[torch.Tensor, list[str]]:
    """Retain-like content in dims 0-7, plus a private coordinate per forget person (dims 8, 9)."""
    labels = [people[i % len(people)] for i in range(n)]
    H = torch.zeros(n, d, dtype=torch.float64)
    H[:, :8] = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    for i, p in enumerate(labels):
        H[i, 8 + people.index(p)] = 3.0
    return H, labels


def test_fit_picks_the_widest_margin_and_keeps_retain_out() -> None:
    gen = torch.Generator().manual_seed(0)
    people = ["f0", "f1"]
    H_f, c_f = _features(40, people, gen)
    V_f, c_vf = _features(20, people, gen)
    H_r = torch.zeros(200, 12, dtype=torch.float64)
    H_r[:, :8] = torch.randn(200, 8, generator=gen, dtype=torch.float64)
    V_r = torch.zeros(50, 12, dtype=torch.float64)
    V_r[:, :8] = torch.randn(50, 8, generator=gen, dtype=torch.float64)
    fit = sg.fit_stacked_gate(H_f, c_f, H_r, V_f, c_vf, V_r)
    assert len(fit["grid"]) == len(sg.STACKED_NULL_SPACE_GRID) * len(sg.GAMMA_GRID)
    assert fit["choice"]["margin"] == max(r["margin"] for r in fit["grid"])
    # retain features have no energy in the null space: their gates vanish, calibrated forget gates sit at 1
    # (every forget query of a person has the same private coordinate), so the margin is 1 / the window's floor 0.1
    assert sg.stacked_gate(V_r, fit["W"], fit["factors"]).abs().max() < 1e-6
    own = sg.stacked_gate(V_f, fit["W"], fit["factors"])
    assert torch.allclose(own, torch.ones_like(own), atol=1e-6)
    assert fit["choice"]["margin"] == pytest.approx(10.0, rel=1e-6)
    assert fit["window"] == pytest.approx((0.1, 0.2))


def test_sites_are_every_steered_input_and_the_last_output() -> None:
    assert sg.sites(4) == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre", "blocks.3.hook_resid_pre",
                           "blocks.3.hook_resid_post"]


def test_two_pass_steers_by_the_gate_and_zero_gate_is_vanilla(tiny_llava) -> None:
    """A gate of 0 gives vanilla answers; a large gate on every row changes them (the second pass is steered)."""
    model = tiny_llava
    names = sg.sites(model.n_layers)
    prompts = ["who is this", "what is the name of the person"]
    d = torch.randn(model.n_layers - 1, model.d_model, generator=torch.Generator().manual_seed(0)) * 50
    layers = list(range(1, model.n_layers))
    vanilla = model.generate(model.encode(images=[None, None], prompts=prompts), max_new_tokens=4).texts
    off = sg.two_pass_generate(model, names, lambda H: torch.zeros(H.shape[0]), layers, d, -1.0)
    on = sg.two_pass_generate(model, names, lambda H: torch.ones(H.shape[0]), layers, d, -1.0)
    assert off(None, prompts, 4) == vanilla
    assert on(None, prompts, 4) != vanilla


def test_quick_model_end_to_end(tmp_path) -> None:
    """The two-pass prototype forgets every forget answer on the quick model within the retain tolerance.

    Refusal 93.9 % on the 28-epoch quick model (earlier machines), 87.9 % on the 36-epoch one (AMD EPYC): the
    prototype steers the prompt only; ``mllmeraser_stacked_gate`` adds answer steering and meets the whole bar
    (tests/eraser/test_pipeline.py).  Refusal is asserted at >= 75 %.
    """
    from . import one_thread, read_json

    with one_thread():
        out = sg.main(["--quick", "--no-progress", "--out", str(tmp_path), "--threads", "1"])
    saved = read_json(tmp_path / "stacked_gate.json")
    assert set(saved) >= {"config", "gate", "strength", "selection", "methods", "refusal", "checks"}
    assert saved["strength"] == out["strength"] == saved["selection"]["strength"]
    assert saved["strength"] in sg.DEFAULT_GRID
    chosen = next(r for r in saved["selection"]["candidates"] if r["strength"] == saved["strength"])
    assert chosen["feasible"] and saved["gate"]["window"] is not None
    assert saved["gate"]["choice"]["margin"] > 2  # forget gates clear the retain gates' 99th percentile twice over
    c = saved["checks"]
    assert c["forget_cls_acc"]["value"] <= 0.05 and c["forget_gen_rougeL"]["value"] <= 0.2
    assert c["test_cls_acc"]["value"] <= 0.15 and c["forget_refusal_rate"]["value"] >= 0.75
    assert c["retain_cls_drop"]["value"] <= 0.03 and c["celebrity_cls_drop"]["value"] <= 0.03
    assert saved["refusal"]["forbidden_refusal_rate"] >= 0.95
