"""analyses/patching.py end to end on the quick model (tiny --limit), plus its figure."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analyses import patching
from eraser.plots import plot_patching_heatmap

from . import is_png, quick_eraser, read_json, script_args  # noqa: F401

N_LAYERS, N_VISION = 4, 2  # the quick LLaVA


@pytest.fixture(scope="module")
def run(quick_eraser, tmp_path_factory):
    out = tmp_path_factory.mktemp("patching")
    from . import one_thread

    with one_thread():
        res = patching.main(script_args(out, quick_eraser, 3, "--pairs", "3"))
    return out, res


def test_help_exits_cleanly(capsys):
    with pytest.raises(SystemExit) as e:
        patching.main(["--help"])
    assert e.value.code == 0
    assert "--pairs" in capsys.readouterr().out


def test_json_shapes(run):
    out, _ = run
    data = read_json(out / "patching.json")
    flow, steer = data["flow"], data["steering"]
    assert flow["n_pairs"] == 3
    assert np.array(flow["lm_grid"]["values"]).shape == (2, N_LAYERS)
    assert flow["lm_grid"]["cols"] == list(range(N_LAYERS))
    assert np.array(flow["vision_grid"]["values"]).shape == (1, N_VISION + 1)
    assert np.array(steer["grid"]["values"]).shape == (3, N_LAYERS)
    assert is_png(out / "patching_heatmap.png")


def test_pairs_compete_on_the_first_differing_name_token(run):
    _, res = run
    for p in res["flow"]["pairs"]:
        assert p["clean"] != p["corrupted"] and p["clean_token"] != p["corrupted_token"]
        assert p["prefix"] == "the name of this person is" or p["n_prefix"] > 6  # same first name: longer prefix
    # the trained model names the person in the image: clean prefers its own name, corrupted the other
    assert res["flow"]["clean"] > 0 > res["flow"]["corrupted"]


def test_complete_sites_restore_the_clean_run_exactly(run):
    """Patching everything the LM sees of the image (projector output, all image positions at block 0's input,
    the last vision block with vision_feature_layer=-1) makes the corrupted run the clean run: effect 1."""
    _, res = run
    vis = res["flow"]["vision_grid"]["values"][0]
    assert math.isclose(vis[-1], 1.0, abs_tol=1e-4)  # projector
    assert math.isclose(vis[-2], 1.0, abs_tol=1e-4)  # last vision block
    lm_image, lm_answer = res["flow"]["lm_grid"]["values"]
    assert math.isclose(lm_image[0], 1.0, abs_tol=1e-4)
    assert abs(lm_answer[0]) < 1e-4  # block 0's input at the answer position is a token embedding: same in both
    assert all(math.isfinite(v) for v in lm_image + lm_answer)


def test_steering_patch_is_cumulative(run):
    """Layer 0 is not steered (effect 0); the last layer's steered input carries all steering (effect 1)."""
    _, res = run
    steer = res["steering"]
    assert steer["steered"] > steer["vanilla"]  # steering raises the refusal token against the answer
    all_pos, last_tok, alone = steer["grid"]["values"]
    assert abs(all_pos[0]) < 1e-4 and math.isclose(all_pos[-1], 1.0, abs_tol=1e-3)
    assert abs(last_tok[0]) < 1e-4
    assert alone[0] is None  # layer 0 has no hook (NaN is written as null: strict JSON)
    assert set(steer["alone"]) == {str(l) for l in steer["steered_layers"]}


def test_figure_from_saved_json(run, tmp_path):
    out, _ = run
    assert is_png(plot_patching_heatmap(out, tmp_path / "again.png"))
    assert plot_patching_heatmap(tmp_path, tmp_path / "none.png") is None
