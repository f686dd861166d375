"""MLLMEraser mechanics on a tiny random model: fit, parity of backends, reversibility, persistence, refusals."""
from __future__ import annotations

import json
import pickle
from dataclasses import replace

import pytest
import torch

from eraser import ArtifactError, ArtifactMismatchError, EraserConfig, MLLMEraser
from tests.conftest import random_image

WORDS = "who is the person in this image what name city job year hobby pet likes".split()


def _queries(n, seed, image_seed, text_only_every=2):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = [WORDS[int(j)] for j in torch.randint(len(WORDS), (6,), generator=g)]
        with_image = text_only_every == 0 or i % text_only_every != 0
        out.append((random_image(32, image_seed + i % 3) if with_image else None, " ".join(words)))
    return out


@pytest.fixture(scope="module")
def fitted(tiny_llava):
    forget = _queries(12, 1, 100, text_only_every=0)  # the forget identities: all asked about with their images
    retain = _queries(60, 2, 200)
    recall = _queries(6, 3, 300)
    erase = _queries(6, 4, 400)
    eraser = MLLMEraser.fit(tiny_llava, forget=forget, retain=retain, recall_pairs=recall, erase_pairs=erase,
                            config=EraserConfig(rho=0.5, gamma=1e-3, strength=-4.0, batch_size=16))
    return eraser, forget, retain


def test_fit_shapes_and_gate_separation(fitted, tiny_llava):
    eraser, forget, retain = fitted
    assert eraser.layers == [1, 2]
    assert eraser.w.shape == eraser.d.shape == (2, tiny_llava.d_model)
    info = eraser.info["projector"]["1"]
    assert info["rank"] == tiny_llava.d_model // 2 and 0 <= info["leak"] < 0.5
    g_f = eraser.gate_values(tiny_llava, forget)
    g_r = eraser.gate_values(tiny_llava, retain)
    assert g_f.shape == (12, 2)
    # forget gates sit near 1, retain gates much nearer 0 (retain leak is the only thing keeping them off 0)
    assert (g_f.mean(0) - 1).abs().max() < 0.15
    assert g_r.abs().mean() < 0.25 * g_f.abs().mean()
    assert eraser.nbytes == 2 * 2 * tiny_llava.d_model * 4
    assert eraser.release_form_nbytes == 2 * tiny_llava.d_model ** 2 * 4  # the release's d x d per steered layer


def test_strengths_per_layer_and_bad_strengths_refused(fitted, tiny_llava):
    eraser = fitted[0]
    assert [name for name, _ in eraser.hooks()] == ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    assert [name for name, _ in eraser.hooks({2: -1.0})] == ["blocks.2.hook_resid_pre"]  # omitted layers: 0, no hook
    assert [name for name, _ in eraser.hooks([0.0, -1.0])] == ["blocks.2.hook_resid_pre"]
    with pytest.raises(ValueError, match=r"layers \[5\] that this eraser does not steer"):
        eraser.hooks({5: -1.0})
    with pytest.raises(ValueError, match="3 strengths for 2 layers"):
        eraser.hooks([-1.0, -1.0, -1.0])
    for bad in (float("nan"), {1: float("inf")}, [-1.0, float("-inf")]):
        with pytest.raises(ValueError, match="strengths must be finite"):
            eraser.hooks(bad)
    with pytest.raises(ValueError, match="strengths must be finite"):
        with eraser.attached(tiny_llava, strength=float("nan")):
            pass
    with pytest.raises(ValueError, match="strength must be a finite number"):
        EraserConfig(strength=float("inf"))


def test_backends_agree_and_detach_is_bit_exact(fitted, tiny_llava):
    eraser, forget, _ = fitted
    imgs, prompts = zip(*forget[:4])
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    vanilla_logits = tiny_llava.run_with_hooks(inputs, [])
    vanilla_gen = tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None)
    graph = tiny_llava.run_with_hooks(inputs, eraser.hooks())
    with eraser.attached(tiny_llava, backend="torch"):
        fast = tiny_llava.run_with_hooks(inputs, [])
        fast_gen = tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None)
    with eraser.attached(tiny_llava, backend="nnsight"):
        graph_gen = tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(graph, fast)
    assert torch.equal(fast_gen.sequences, graph_gen.sequences)
    assert (graph - vanilla_logits).abs().max() > 1e-3  # steering changed something
    assert torch.equal(tiny_llava.run_with_hooks(inputs, []), vanilla_logits)
    assert torch.equal(tiny_llava.generate(inputs, max_new_tokens=5, eos_token_id=None).sequences, vanilla_gen.sequences)


def test_steering_is_gated_per_input(fitted, tiny_llava):
    """The added vector at layer l is lambda * g(h_T) * d: check it on the first steered layer."""
    eraser, forget, retain = fitted
    imgs, prompts = zip(*(forget[:2] + retain[:2]))
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    name = "blocks.1.hook_resid_pre"
    _, base = tiny_llava.run_with_cache(inputs, names=[name])
    _, steered = tiny_llava.run_with_cache(inputs, names=[name], hooks=eraser.hooks())
    delta = steered.last(name) - base.last(name)
    g = base.last(name) @ eraser.w[0]
    expected = (-4.0 * g)[:, None] * eraser.d[0]
    assert torch.allclose(delta, expected, atol=1e-4)
    # padding positions are never touched
    pad = inputs.attention_mask == 0
    assert torch.equal(steered[name][pad], base[name][pad])


def test_save_load_round_trip(fitted, tiny_llava, tmp_path):
    eraser, forget, _ = fitted
    path = eraser.save(tmp_path / "e.safetensors")
    loaded = MLLMEraser.load(path, tiny_llava)
    assert torch.equal(loaded.w, eraser.w) and torch.equal(loaded.d, eraser.d)
    assert loaded.config == eraser.config and loaded.layers == eraser.layers
    assert loaded.info["counts"] == {"forget": 12, "retain": 60, "recall": 6, "erase": 6}
    imgs, prompts = zip(*forget[:2])
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    assert torch.equal(tiny_llava.run_with_hooks(inputs, eraser.hooks()), tiny_llava.run_with_hooks(inputs, loaded.hooks()))


def test_with_config_changes_application_settings_only(fitted, tiny_llava, tmp_path):
    """Fit-time fields would keep the fitted tensors under a config (and an artifact) claiming otherwise:
    before, with_config(layers=(1,)) still steered layers 1 and 2, and site="resid_post" moved directions fitted
    at resid_pre.  They are refused; application settings still change."""
    eraser, forget, _ = fitted
    for change in ({"layers": (1,)}, {"site": "resid_post"}, {"gate_read": "mean"}, {"gamma": 100.0},
                   {"rho": 0.9}, {"use_null_space": False}, {"concept_gates": True}, {"gate_stack": (1, 2)}):
        with pytest.raises(ValueError, match="application settings only"):
            eraser.with_config(**change)
    with pytest.raises(ValueError, match="fitted without them"):
        eraser.with_config(answer_steps=2)
    weaker = eraser.with_config(strength=-1.0, every_step=True, gate_window=(0.2, 0.8), batch_size=4)
    assert weaker.config.strength == -1.0 and weaker.w is eraser.w and eraser.config.strength == -4.0
    # an artifact whose config's layers disagree with its steered layers is refused at load
    replace(eraser, config=replace(eraser.config, layers=(1,))).save(tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="disagree"):
        MLLMEraser.load(tmp_path / "bad.safetensors")


def test_load_refuses_other_models(fitted, tmp_path):
    from interp.tiny import tiny_vlm

    eraser, _, _ = fitted
    path = eraser.save(tmp_path / "e.safetensors")
    with pytest.raises(ArtifactMismatchError, match="weights"):
        MLLMEraser.load(path, tiny_vlm("llava", seed=1, n_layers=3, vision_layers=2))  # same shapes, other weights
    with pytest.raises(ArtifactMismatchError, match="d_model"):
        MLLMEraser.load(path, tiny_vlm("llava", seed=0, d_model=64, n_layers=3))
    with pytest.raises(ArtifactMismatchError, match="arch"):
        MLLMEraser.load(path, tiny_vlm("qwen2_5_vl", seed=0, n_layers=3))


def test_corrupt_truncated_and_pickle_files_are_rejected(fitted, tmp_path):
    eraser, _, _ = fitted
    good = eraser.save(tmp_path / "e.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ArtifactError):
        MLLMEraser.load(tmp_path / "trunc.safetensors")

    class Evil:
        def __reduce__(self):
            return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))

    (tmp_path / "evil.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ArtifactError):
        MLLMEraser.load(tmp_path / "evil.safetensors")
    assert not (tmp_path / "PWNED").exists()


def test_an_artifact_with_a_bad_config_is_refused_by_name(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    eraser, _, _ = fitted
    tensors = load_file(str(eraser.save(tmp_path / "e.safetensors")))
    for field, value, message in (("strength", float("nan"), "strength must be a finite number"),
                                  ("no_such_field", 1, "no_such_field")):
        meta = eraser.metadata()
        meta["config"] = {**meta["config"], field: value}
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"mllmeraser": json.dumps(meta)})
        with pytest.raises(ArtifactError, match=f"config this version cannot use.*{message}"):
            MLLMEraser.load(tmp_path / "bad.safetensors")


def test_an_artifact_with_incomplete_metadata_nan_tensors_or_bad_layers_is_refused(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    eraser, _, _ = fitted
    good = load_file(str(eraser.save(tmp_path / "e.safetensors")))

    def write(tensors, meta):
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata={"mllmeraser": json.dumps(meta)})
        return tmp_path / "bad.safetensors"

    for key in ("layers", "config", "fingerprint"):
        meta = {k: v for k, v in eraser.metadata().items() if k != key}
        with pytest.raises(ArtifactError, match=f"incomplete MLLMEraser artifact \\(no {key}\\)"):
            MLLMEraser.load(write(good, meta))
    with pytest.raises(ArtifactError, match=r"incomplete MLLMEraser artifact \(no w\)"):
        MLLMEraser.load(write({"d": good["d"]}, eraser.metadata()))
    for layers in ([1, 9], [], [-1, 2], ["1", 2]):
        meta = {**eraser.metadata(), "layers": layers}
        with pytest.raises(ArtifactError, match=r"steered layers .* are not layer indices of the 3-layer model"):
            MLLMEraser.load(write(good, meta))
    for value in (float("nan"), float("inf")):
        d = good["d"].clone()
        d[0, 0] = value
        with pytest.raises(ArtifactError, match=r"tensor\(s\) \['d'\] hold NaN or infinite values"):
            MLLMEraser.load(write({**good, "d": d}, eraser.metadata()))
    with pytest.raises(ArtifactError, match="unknown format 'list'"):
        MLLMEraser.load(write(good, [1, 2]))


def test_failed_save_keeps_previous_file(fitted, tmp_path, monkeypatch):
    import eraser.artifact as artifact

    eraser, _, _ = fitted
    path = eraser.save(tmp_path / "e.safetensors")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(artifact, "save_file", boom)
    with pytest.raises(OSError):
        eraser.save(path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["e.safetensors"]  # no temp file left behind


def test_bad_inputs(tiny_llava):
    q = _queries(4, 0, 0)
    with pytest.raises(ValueError, match="forget set is empty"):
        MLLMEraser.fit(tiny_llava, forget=[], retain=q, recall_pairs=q, erase_pairs=q)
    with pytest.raises(ValueError, match="retain set is empty"):
        MLLMEraser.fit(tiny_llava, forget=q, retain=[], recall_pairs=q, erase_pairs=q)
    with pytest.raises(ValueError, match="not decoder layers"):
        MLLMEraser.fit(tiny_llava, forget=q, retain=q, recall_pairs=q, erase_pairs=q, config=EraserConfig(layers=(7,)))
    with pytest.raises(ValueError, match="site"):
        EraserConfig(site="mlp_out")


def test_to_moves_every_tensor_once_and_leaves_the_eraser_alone(fitted, tiny_llava):
    """``attached`` copies the gates to the model's device once; an eraser already there is returned as is."""
    fitted = fitted[0]
    assert fitted.to("cpu") is fitted and fitted.to(tiny_llava.device) is fitted
    moved = replace(fitted, d_answer=fitted.d.clone()).to("meta")  # a device without data, present on any machine
    assert {t.device.type for t in (moved.w, moved.d, moved.d_answer)} == {"meta"}
    assert moved.w.shape == fitted.w.shape and fitted.w.device.type == "cpu"  # the original is untouched
    assert moved.layers == fitted.layers and moved.config == fitted.config


def test_static_ablation_ignores_the_gate(fitted, tiny_llava):
    eraser, forget, _ = fitted
    imgs, prompts = zip(*forget[:2])
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    name = "blocks.1.hook_resid_pre"
    _, base = tiny_llava.run_with_cache(inputs, names=[name])
    _, stat = tiny_llava.run_with_cache(inputs, names=[name], hooks=eraser.hooks(strength=-1.0, gated=False))
    assert torch.allclose(stat.last(name) - base.last(name), (-1.0 * eraser.d[0]).expand(2, -1), atol=1e-5)


def test_gate_graph_runs_under_remote_serialisation(fitted, tiny_llava):
    """The gate graph is shipped by value (remote="local"), with outputs identical to the local run."""
    eraser, forget, _ = fitted
    imgs, prompts = zip(*forget[:3])
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    local = tiny_llava.run_with_hooks(inputs, eraser.hooks())
    remote = tiny_llava.run_with_hooks(inputs, eraser.hooks(), remote="local")
    assert (local - remote).abs().max() <= 1e-5  # float noise of nnsight's remotable call path, ~1e-7
    assert (local - tiny_llava.run_with_hooks(inputs, [])).abs().max() > 1e-3


def test_gate_report_records_gates_and_shift(fitted, tiny_llava):
    from eraser.diagnostics import gate_report

    eraser, forget, retain = fitted
    rep = gate_report(tiny_llava, eraser, {"forget": forget[:5], "retain": retain[:7]}, batch_size=4)
    g = torch.tensor(rep["sets"]["forget"]["gate"])
    assert g.shape == (5, 2) and torch.tensor(rep["sets"]["retain"]["gate"]).shape == (7, 2)
    # layer 1 sees no earlier steering, so its gate equals the unsteered gate values
    assert torch.allclose(g[:, 0], eraser.gate_values(tiny_llava, forget[:5])[:, 0], atol=1e-5)
    # steering with a negative strength moves forget activations against the direction, by lambda*g*|d| at layer 1
    shift = torch.tensor(rep["sets"]["forget"]["proj_after"])[:, 0] - torch.tensor(rep["sets"]["forget"]["proj_before"])[:, 0]
    assert torch.allclose(shift, -4.0 * g[:, 0] * eraser.d[0].norm(), atol=1e-3)
    assert set(rep["firing"]["1"]) >= {"true_firing_rate", "false_firing_rate"}


def test_stats_then_solve_equals_fit_and_refits_other_hyperparameters(fitted, tiny_llava, tmp_path):
    from eraser.stats import FitStats

    eraser, forget, retain = fitted
    recall, erase = _queries(6, 3, 300), _queries(6, 4, 400)
    stats = MLLMEraser.collect_stats(tiny_llava, forget, retain, recall, erase, eraser.config)
    assert stats.K_r.shape == (2, tiny_llava.d_model, tiny_llava.d_model) and stats.counts["retain"] == 60
    again = MLLMEraser.from_stats(stats, eraser.config)
    assert torch.equal(again.w, eraser.w) and torch.equal(again.d, eraser.d)
    assert again.info["data_hashes"] == eraser.info["data_hashes"]
    shrunk = MLLMEraser.from_stats(stats, EraserConfig(rho=0.5, gamma=1e3))
    assert shrunk.w.norm() < 0.5 * eraser.w.norm()  # a larger ridge shrinks the gate
    stats.save(tmp_path / "stats.safetensors")
    back = FitStats.load(tmp_path / "stats.safetensors")
    assert torch.equal(back.K_f, stats.K_f) and back.layers == stats.layers and back.counts == stats.counts
    assert torch.equal(MLLMEraser.from_stats(back, eraser.config).w, eraser.w)
    with pytest.raises(ValueError, match="layers"):
        MLLMEraser.from_stats(stats, EraserConfig(layers=(1,)))
    with pytest.raises(ValueError, match="resid_post"):
        MLLMEraser.from_stats(stats, EraserConfig(site="resid_post"))


def test_scaled_gates_multiply_gate_values(fitted, tiny_llava):
    eraser, forget, _ = fitted
    s = eraser.scaled([2.0, 0.5])
    g, g2 = eraser.gate_values(tiny_llava, forget[:4]), s.gate_values(tiny_llava, forget[:4])
    assert torch.allclose(g2, g * torch.tensor([2.0, 0.5]), atol=1e-5)
    assert s.info["gate_scale"] == [2.0, 0.5] and torch.equal(s.d, eraser.d)
    with pytest.raises(ValueError, match="positive"):
        eraser.scaled([1.0, 0.0])
    with pytest.raises(ValueError, match="2 layers"):
        eraser.scaled([1.0])


@pytest.fixture(scope="module")
def fitted_mean(tiny_llava):
    forget = _queries(12, 1, 100, text_only_every=0)
    retain = _queries(60, 2, 200)
    eraser = MLLMEraser.fit(tiny_llava, forget=forget, retain=retain, recall_pairs=_queries(6, 3, 300),
                            erase_pairs=_queries(6, 4, 400),
                            config=EraserConfig(rho=0.5, gamma=1e-3, strength=-4.0, batch_size=16, gate_read="mean"))
    return eraser, forget, retain


def test_mean_gate_reads_the_prompt_mean_and_backends_agree(fitted_mean, fitted, tiny_llava):
    """gate_read="mean": the gate is w . mean over prompt positions (padding excluded), on both backends."""
    from interp.collect import prompt_mean, prompt_positions

    eraser, forget, retain = fitted_mean
    assert eraser.config.gate_read == "mean"
    # the direction is read at the last token either way: same recall/erase data, same direction
    assert torch.allclose(eraser.d, fitted[0].d)
    assert not torch.allclose(eraser.w, fitted[0].w)
    imgs, prompts = zip(*(forget[:2] + retain[1:4]))  # mixed lengths and text-only rows: left padding
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    name = "blocks.1.hook_resid_pre"
    _, cache = tiny_llava.run_with_cache(inputs, names=[name])
    h = cache[name]
    mask = prompt_positions(inputs, h.shape[1])
    assert not mask.all()  # there is padding to exclude
    expected_g = prompt_mean(h.float(), mask) @ eraser.w[0].float()
    record: list = []
    tiny_llava.run_with_hooks(inputs, eraser.hooks(record=record))
    got = {layer: g for layer, step, g in record if step == 0}
    torch.testing.assert_close(got[1], expected_g, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(eraser.gate_values(tiny_llava, list(zip(imgs, prompts)))[:, 0], expected_g,
                               atol=1e-5, rtol=1e-5)
    graph = tiny_llava.run_with_hooks(inputs, eraser.hooks())
    with eraser.attached(tiny_llava, backend="torch"):
        fast = tiny_llava.run_with_hooks(inputs, [])
    assert torch.equal(graph, fast)
    g_f = eraser.gate_values(tiny_llava, forget)
    assert (g_f.mean(0) - 1).abs().max() < 0.15  # the ridge fit targets 1 on forget in the read it was fitted on


def test_mean_gate_round_trips_and_bad_reads_are_rejected(fitted_mean, tmp_path, tiny_llava):
    eraser, _, _ = fitted_mean
    path = tmp_path / "mean.safetensors"
    eraser.save(path)
    assert MLLMEraser.load(path, tiny_llava).config.gate_read == "mean"
    with pytest.raises(ValueError, match="gate_read"):
        EraserConfig(gate_read="first")


def test_gate_window_saturates_the_gate_on_both_backends(fitted, tiny_llava, tmp_path):
    """gate_window (lo, hi): g -> clamp((g - lo) / (hi - lo), 0, 1) in the hooks and in gate_values."""
    eraser, forget, retain = fitted
    queries = forget[:2] + retain[1:4]
    raw = eraser.gate_values(tiny_llava, queries)
    lo, hi = float(raw.min()) + 0.25 * float(raw.max() - raw.min()), float(raw.max()) - 0.25 * float(raw.max() - raw.min())
    win = eraser.with_config(gate_window=(lo, hi))
    torch.testing.assert_close(win.gate_values(tiny_llava, queries), ((raw - lo) / (hi - lo)).clamp(0, 1))
    torch.testing.assert_close(win.gate_values(tiny_llava, queries, raw=True), raw)
    # what the hook applies at the first steered layer is the windowed value (later layers see steered inputs)
    imgs, prompts = zip(*queries)
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    record: list = []
    graph = tiny_llava.run_with_hooks(inputs, win.hooks(record=record))
    got = {layer: g for layer, step, g in record if step == 0}
    torch.testing.assert_close(got[1], ((raw[:, 0] - lo) / (hi - lo)).clamp(0, 1), atol=1e-5, rtol=1e-5)
    assert ((got[1] == 0) | (got[1] == 1)).any()  # some inputs sit outside the window
    with win.attached(tiny_llava, backend="torch"):
        assert torch.equal(tiny_llava.run_with_hooks(inputs, []), graph)
    # a window above every gate value steers nothing: outputs are vanilla bit for bit
    off = eraser.with_config(gate_window=(float(raw.max()) + 1, float(raw.max()) + 2))
    assert torch.equal(tiny_llava.run_with_hooks(inputs, off.hooks()), tiny_llava.run_with_hooks(inputs, []))
    # a window below every gate value is static steering
    on = eraser.with_config(gate_window=(float(raw.min()) - 2, float(raw.min()) - 1))
    assert torch.allclose(tiny_llava.run_with_hooks(inputs, on.hooks(strength=-1.0)),
                          tiny_llava.run_with_hooks(inputs, eraser.hooks(strength=-1.0, gated=False)), atol=1e-5)
    path = win.save(tmp_path / "win.safetensors")
    assert MLLMEraser.load(path, tiny_llava).config.gate_window == (lo, hi)


@pytest.fixture(scope="module")
def fitted_concepts(tiny_llava):
    """Two forget 'people' (queries 0-5 and 6-11, each with its own images), one gate each."""
    forget = _queries(6, 1, 100, text_only_every=0) + _queries(6, 5, 500, text_only_every=0)
    labels = ["p1"] * 6 + ["p2"] * 6
    eraser = MLLMEraser.fit(tiny_llava, forget=forget, retain=_queries(60, 2, 200), recall_pairs=_queries(6, 3, 300),
                            erase_pairs=_queries(6, 4, 400), forget_concepts=labels,
                            config=EraserConfig(rho=0.5, gamma=1e-3, strength=-4.0, batch_size=16, concept_gates=True))
    return eraser, forget, labels


def test_concept_gates_fit_one_gate_per_concept_and_steer_by_the_max(fitted_concepts, fitted, tiny_llava, tmp_path):
    from eraser.gate import fit_gates
    from eraser.stats import projectors_from_stats

    eraser, forget, labels = fitted_concepts
    d = tiny_llava.d_model
    assert eraser.w.shape == (2, 2, d) and eraser.d.shape == (2, d) and eraser.info["concepts"] == ["p1", "p2"]
    assert eraser.release_form_nbytes == 2 * 2 * d * d * 4  # a d x d matrix per layer and concept (max is not linear)
    assert torch.allclose(eraser.d, fitted[0].d)  # same pairs, same direction
    # the per-concept weights are fit_gates with one-hot targets on the same activations and projector
    stats = MLLMEraser.collect_stats(tiny_llava, forget, _queries(60, 2, 200), _queries(6, 3, 300),
                                     _queries(6, 4, 400), eraser.config, forget_concepts=labels)
    assert torch.allclose(stats.S_f.sum(1), stats.s_f) and stats.concepts == ["p1", "p2"]
    from eraser.stats import FitStats

    back = FitStats.load(stats.save(tmp_path / "stats.safetensors"))
    assert torch.equal(back.S_f, stats.S_f) and back.concepts == ["p1", "p2"]
    assert torch.equal(MLLMEraser.from_stats(back, eraser.config).w, eraser.w)
    from interp.collect import iter_query_activations

    H = torch.cat([b["blocks.1.hook_resid_pre"] for b in iter_query_activations(
        tiny_llava, [q[0] for q in forget], [q[1] for q in forget], ["blocks.1.hook_resid_pre"], 16)]).double()
    Y = torch.tensor([[1.0, 0.0]] * 6 + [[0.0, 1.0]] * 6, dtype=torch.float64)
    P = projectors_from_stats(stats, rho=0.5)[0][0]
    torch.testing.assert_close(eraser.w[0].double(), fit_gates(H, Y, P, 1e-3).T, atol=1e-4, rtol=1e-3)
    # each concept's gate fires on its own person; the gate steering applies is the max over concepts
    per = torch.einsum("nd,cd->nc", H.float(), eraser.w[0])
    assert per[:6, 0].mean() > 0.85 and per[6:, 1].mean() > 0.85  # measured 0.91, 0.87
    assert per[:6, 1].abs().max() < 0.2 and per[6:, 0].abs().max() < 0.2  # each ignores the other person
    g = eraser.gate_values(tiny_llava, forget)
    torch.testing.assert_close(g[:, 0], per.amax(-1), atol=1e-4, rtol=1e-4)
    # both backends apply it identically; per-layer-and-concept calibration scales each column
    imgs, prompts = zip(*forget[:4])
    inputs = tiny_llava.encode(images=list(imgs), prompts=list(prompts))
    graph = tiny_llava.run_with_hooks(inputs, eraser.hooks())
    with eraser.attached(tiny_llava, backend="torch"):
        assert torch.equal(tiny_llava.run_with_hooks(inputs, []), graph)
    s = eraser.scaled([[2.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(s.w[0, 0], 2 * eraser.w[0, 0]) and torch.testing.assert_close(s.w[0, 1], eraser.w[0, 1])
    assert s.info["gate_scale"] == [[2.0, 1.0], [1.0, 1.0]]
    with pytest.raises(ValueError, match="do not fit"):
        eraser.scaled([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    # round trip, and a rank-one artifact claiming per-concept gates is refused
    back = MLLMEraser.load(eraser.save(tmp_path / "c.safetensors"), tiny_llava)
    assert torch.equal(back.w, eraser.w) and back.config.concept_gates
    rank_one = fitted[0]
    replace(rank_one, config=replace(rank_one.config, concept_gates=True)).save(tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match="per-concept"):
        MLLMEraser.load(tmp_path / "bad.safetensors")


def test_concept_gates_need_one_label_per_forget_query(tiny_llava):
    forget, retain, pairs = _queries(4, 1, 100), _queries(8, 2, 200), _queries(2, 3, 300)
    with pytest.raises(ValueError, match="forget_concepts"):
        MLLMEraser.fit(tiny_llava, forget, retain, pairs, pairs, EraserConfig(concept_gates=True))
    with pytest.raises(ValueError, match="3 concept labels for 4 forget queries"):
        MLLMEraser.fit(tiny_llava, forget, retain, pairs, pairs, EraserConfig(), forget_concepts=["a", "a", "b"])
    from eraser.stats import gates_from_stats

    stats = MLLMEraser.collect_stats(tiny_llava, forget, retain, pairs, pairs, EraserConfig())
    assert stats.S_f is None
    with pytest.raises(ValueError, match="per concept"):
        gates_from_stats(stats, EraserConfig(concept_gates=True))


def test_identical_recall_and_erase_pairs_are_refused(tiny_llava):
    """The same queries on both sides give a zero direction: a fit that can do nothing, refused by name."""
    pairs = _queries(4, 3, 300)
    with pytest.raises(ValueError, match="exactly zero at layers"):
        MLLMEraser.fit(tiny_llava, _queries(6, 1, 100), _queries(20, 2, 200), pairs, pairs, EraserConfig(rho=0.5))


def test_bare_pairs_and_triples_are_refused_by_fit(tiny_llava):
    """(The query hash itself: tests/eraser/test_queries.py.)"""
    a = random_image(32, 1)
    with pytest.raises(ValueError, match=r"\(image or None, prompt\) pairs; item 0"):
        MLLMEraser.fit(tiny_llava, (a, "who is this"), _queries(8, 2, 200), _queries(2, 3, 300),
                       _queries(2, 4, 400))
    with pytest.raises(ValueError, match=r"item 0 .*an answer is not used"):  # was silently dropped
        MLLMEraser.fit(tiny_llava, [(a, "who is this", "ann")], _queries(8, 2, 200), _queries(2, 3, 300),
                       _queries(2, 4, 400))


def test_repr_summarises_instead_of_printing_tensors():
    import torch

    from eraser.method import EraserConfig, MLLMEraser

    e = MLLMEraser(layers=[1, 2], w=torch.zeros(2, 300), d=torch.ones(2, 300),
                   config=EraserConfig(layers=(1, 2), gamma=0.5), fingerprint={"arch": "llava", "d_model": 300})
    text = repr(e)
    assert text == ("MLLMEraser(llava d_model 300: layers [1, 2], w (2, 300), d (2, 300), 4800 bytes; "
                    "config {'gamma': 0.5})")
