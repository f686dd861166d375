"""The scale check on its tiny CPU size: every path it runs at 7B passes, and its record holds what the README
quotes."""
from __future__ import annotations

import json

import pytest

from analyses.scale_check import SIZES, build, image_tokens, main
from interp.edges import EdgeGraph


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_scale_check_passes_on_the_tiny_size_and_writes_its_record(arch, tmp_path, capsys):
    out = main(["--arch", arch, "--size", "tiny", "--threads", "1", "--repeats", "1", "--new-tokens", "4",
                "--out", str(tmp_path)])
    assert out["pass"] and "all checks pass" in capsys.readouterr().out
    saved = json.loads((tmp_path / "scale_check.json").read_text())
    assert saved["pass"] and saved["dims"] == SIZES[arch]["tiny"]
    cache = saved["cache"]
    assert cache["resid_max_abs_diff"] == 0.0 and cache["logits_max_abs_diff"] == 0.0  # float32: exact
    assert cache["image_tokens"] == [cache["expected_image_tokens"]]
    assert cache["expected_image_tokens"] == {"llava": (28 // 14) ** 2, "qwen2_5_vl": (56 // 14 // 2) ** 2}[arch]
    for variant, r in saved["erasers"].items():
        assert r["roundtrip"] and r["refuses_other_model"] and r["detach_bit_identical"], variant
        assert r["fast_equals_graph"] and r["fast_graph_logits_diff"] == 0.0 and r["vanilla_repeatable"]
        assert r["counts"]["retain"] > 0 and r["fit_s"] >= r["pgd_s"] > 0
        for k in ("fast", "graph"):  # paired ratios: the median lies between the quartiles
            lo, hi = r[f"{k}_ratio_iqr"]
            assert 0 < lo <= r[f"{k}_ratio"] <= hi, variant
        # the rank-one artifact against the release's d x d matrices: d/2 per layer, or less stacked
        layers, d = len(r["layers"]), SIZES[arch]["tiny"]["d_model"]
        assert r["release_bytes"] == layers * d * d * 4 and r["size_ratio"] == r["release_bytes"] / r["tensor_bytes"]
    assert saved["erasers"]["mllmeraser"]["size_ratio"] == SIZES[arch]["tiny"]["d_model"] / 2
    # the paper's method is exactly the release's d x d per layer; the extensions' dense form is larger
    assert saved["erasers"]["mllmeraser"]["release_form_ratio"] == saved["erasers"]["mllmeraser"]["size_ratio"]
    assert saved["sweep"]["batched_max_abs_diff"] <= 1e-4
    assert ("shared_prefix_speedup" in saved["sweep"]) == (arch == "llava")  # Qwen's 3-D rope refuses it
    assert saved["baselines"]["ga_full_steps"] == saved["baselines"]["ga_lora_steps"] > 0
    att = saved["attribution"]
    assert att["pass"] and att["cells"] == SIZES[arch]["tiny"]["n_layers"] * cache["expected_image_tokens"]
    assert abs(att["block0_integrated_effect"] - 1.0) <= 0.15 < abs(att["block0_first_order_effect"] - 1.0)
    assert att["patching_map_s_extrapolated"] == pytest.approx(att["patching_per_token_s"] * att["n_image_tokens"])
    edges = saved["edges"]
    n, h = SIZES[arch]["tiny"]["n_layers"], SIZES[arch]["tiny"]["n_heads"]
    assert edges["pass"] and edges["edges"] == len(EdgeGraph(n, h).edges())
    assert edges["logits_edges_patched_effect"] == pytest.approx(1.0, abs=1e-3)  # the writers sum to the final residual
    assert abs(edges["integrated_logits_cut"] - 1.0) <= 0.15
    assert edges["patching_all_s_extrapolated"] == pytest.approx(edges["patching_per_edge_s"] * edges["edges"])
    kv = SIZES[arch]["tiny"]["n_kv_heads"]
    assert edges["split_finite"] and edges["split_edges"] == len(EdgeGraph(n, h, kv, qkv=True).edges())
    assert edges["split_rel_gap"] <= edges["split_tolerance"]
    assert edges["hook_paths_readers"] == 2 * (n - n // 2) + 1 and edges["hook_paths_abs_diff"] <= edges["tolerance"]
    assert edges["vision_finite"] and edges["vision_edges"] > 0  # the vision tower's edges, estimated
    assert edges["vision_projector_patched_abs_diff"] <= edges["tolerance"]  # every edge into the projector: clean
    assert abs(edges["vision_integrated_projector_cut"] - 1.0) <= 0.15
    assert edges["vision_split_edges"] > edges["vision_edges"] and edges["vision_split_rel_gap"] <= 1e-4


def test_image_tokens_of_the_7b_sizes_are_the_checkpoints():
    assert image_tokens("llava", SIZES["llava"]["7b"]) == 576  # LLaVA-1.5: 24 x 24 patches of 14 at 336 px
    assert image_tokens("qwen2_5_vl", SIZES["qwen2_5_vl"]["7b"]) == 144  # 24 x 24 patches merged 2 x 2


def test_build_makes_the_model_in_the_dtype_asked_and_restores_the_default():
    import torch

    model, dims = build("llava", "tiny", "cpu", torch.bfloat16, 2, ["a b c"])
    assert model.dtype == torch.bfloat16 and model.n_layers == dims["n_layers"] == 2
    assert torch.get_default_dtype() == torch.float32


@pytest.mark.parametrize("argv, message", [
    (["--checks", "cache,nothing"], "--checks"),
    (["--variants", "steer_static"], "gated variants"),
    (["--layers", "1"], "--layers"),
    (["--batch", "0"], "--batch: expected a positive integer, got 0"),
    (["--pgd-batch", "-1"], "--pgd-batch: expected a positive integer, got -1"),
])
def test_bad_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err
