"""analyses/attribution.py end to end on the quick model (tiny --limit), its pure helpers, and its figure."""
from __future__ import annotations

import math

import numpy as np
import pytest

from analyses import attribution
from analyses.attribution import Tally, compare
from eraser.plots import plot_attribution

from . import is_png, quick_eraser, read_json, script_args  # noqa: F401

N_LAYERS, N_HEADS, N_VISION, N_IMAGE_TOKENS = 4, 4, 2, 16  # the quick LLaVA: 32 px images, 8 px patches


@pytest.fixture(scope="module")
def run(quick_eraser, tmp_path_factory):
    out = tmp_path_factory.mktemp("attribution")
    from . import one_thread

    with one_thread():
        res = attribution.main(script_args(out, quick_eraser, 2, "--pairs", "2", "--steps", "8"))
    return out, res


def test_tally_pools_batches_by_rows_and_normalises():
    t = Tally()
    t.add("clean", 2.0, 1), t.add("clean", 5.0, 2)           # pooled: (2 + 10) / 3 = 4
    t.add("corrupted", 1.0, 3)
    t.add("site", 3.0, 1), t.add("site", 1.0, 2)              # pooled: 5 / 3
    assert t.mean("clean") == 4.0
    assert t.effect("site") == pytest.approx((5 / 3 - 1) / 3)
    flat = Tally()
    flat.add("clean", 1.0, 1), flat.add("corrupted", 1.0, 1), flat.add("site", 2.0, 1)
    assert math.isnan(flat.effect("site"))


def test_compare_reports_agreement_and_the_top_site():
    c = compare([0.1, 0.9, -0.2, float("nan")], [0.2, 0.7, -0.1, 0.5], ["a", "b", "c", "d"])
    assert c["n"] == 3 and c["top_patched"] == "b" and c["same_top"]
    assert c["max_abs_diff"] == pytest.approx(0.2)
    assert c["pearson_r"] == pytest.approx(np.corrcoef([0.1, 0.9, -0.2], [0.2, 0.7, -0.1])[0, 1])
    assert not compare([1.0, 0.0], [0.0, 1.0], ["a", "b"])["same_top"]
    assert math.isnan(compare([1.0, 1.0], [0.0, 2.0], ["a", "b"])["pearson_r"])  # no spread: no r


def test_help_and_bad_pairs(capsys):
    with pytest.raises(SystemExit) as e:
        attribution.main(["--help"])
    assert e.value.code == 0 and "--pairs" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        attribution.main(["--pairs", "0"])
    assert e.value.code == 2


def test_json_shapes(run):
    out, _ = run
    data = read_json(out / "attribution.json")
    parts = data["name"]["parts"]
    sizes = {"vision": N_VISION + 1, "lm_image": 3 * N_LAYERS, "lm_answer": 3 * N_LAYERS,
             "positions": N_LAYERS * N_IMAGE_TOKENS, "heads": N_LAYERS * N_HEADS}
    for part, n in sizes.items():
        assert all(len(parts[part][k]) == n for k in ("sites", "patching", "attribution", "integrated"))
        assert set(parts[part]["agreement"]) == {"attribution", "integrated"}
    grid = data["name"]["positions_grid"]
    for m in ("patching", "attribution", "integrated"):
        assert np.array(grid[m]).shape == (N_LAYERS, N_IMAGE_TOKENS)
    assert data["name"]["steps"] == data["config"]["steps"] == 8
    # the portrait's patches at the projector's output: a 4 x 4 grid that adds up to the whole site's estimate
    patches = np.array(data["name"]["patch_grid"]["integrated"])
    vision = parts["vision"]
    assert patches.shape == (4, 4)
    assert patches.sum() == pytest.approx(vision["integrated"][vision["sites"].index("projector.hook_out")], abs=1e-6)
    assert data["steering"]["sites"] == [f"blocks.{l}.hook_resid_pre" for l in range(N_LAYERS)]
    assert data["name"]["clean"] > 0 > data["name"]["corrupted"]  # each image prefers its own person's name
    assert set(data["name"]["timing_s"]) == {f"{m}_{w}" for m in ("patching", "attribution", "integrated")
                                             for w in ("sites", "positions", "heads")} | {"integrated_vision_map"}
    assert is_png(out / "attribution.png")


def test_the_exact_cells_are_exact(run):
    """Patching every image position of the first block's input turns the corrupted run into the clean one
    (effect 1), and its answer position carries nothing yet (0, for every method).  Summed over that complete
    cut the integrated estimate adds up to the whole difference, up to its 8-step trapezoid error (0.35 at 4 steps, 0.07 at 8 when measured)."""
    _, res = run
    image, ans = res["name"]["parts"]["lm_image"], res["name"]["parts"]["lm_answer"]
    i = image["sites"].index("blocks.0.hook_resid_pre")
    assert image["patching"][i] == pytest.approx(1.0, abs=1e-5)
    assert image["integrated"][i] == pytest.approx(1.0, abs=0.1)
    j = ans["sites"].index("blocks.0.hook_resid_pre")
    for m in ("patching", "attribution", "integrated"):
        assert ans[m][j] == pytest.approx(0.0, abs=1e-5)


def test_the_integrated_estimate_tracks_patching_where_the_first_order_one_fails(run):
    """Measured, not assumed (the README's numbers): swapping one portrait for another saturates the name logit
    difference, so the first-order estimate of the image positions' effects points the wrong way, and the
    integrated one follows patching."""
    _, res = run
    image = res["name"]["parts"]["lm_image"]["agreement"]
    assert image["attribution"]["pearson_r"] < 0 < 0.9 < image["integrated"]["pearson_r"]
    for part in ("lm_answer", "heads"):
        assert res["name"]["parts"][part]["agreement"]["integrated"]["pearson_r"] > 0.8
    steering = res["steering"]
    assert abs(steering["integrated"][-1] - steering["patching"][-1]) < 0.05


def test_figure_from_saved_json(run, tmp_path):
    out, _ = run
    assert is_png(plot_attribution(out, tmp_path / "again.png"))
    assert plot_attribution(tmp_path, tmp_path / "none.png") is None
