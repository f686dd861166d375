"""analyses/bench_attribution.py on a small random config: the maps it times are the right numbers."""
from __future__ import annotations

import numpy as np
import pytest

from analyses import bench_attribution

ARGS = ["--d-model", "64", "--n-layers", "2", "--image-size", "32", "--repeats", "1", "--threads", "1", "--steps", "16"]


@pytest.fixture(scope="module")
def res():
    return bench_attribution.main(ARGS)


def test_prints_the_timings_and_ratios(res, capsys):
    bench_attribution.main(ARGS)
    out = capsys.readouterr().out
    assert "a 2 x 16 map, 32 cells" in out and "x faster; r with patching" in out
    assert res["cells"] == 32 and set(res["agreement"]) == {"first_order", "integrated"}
    assert res["ratio_first_order"] == pytest.approx(res["patching"] / res["first_order"])


def test_maps_are_layer_by_image_token_and_the_integrated_one_adds_up(res):
    maps = {k: np.array(v) for k, v in res["maps"].items()}
    assert all(m.shape == (2, 16) for m in maps.values())
    # patching every image token of block 0's input at once is the whole clean - corrupted difference; the
    # integrated map of that complete cut adds up to it, the single-token patches need not
    import torch
    from interp.patching import patch_sites

    model, clean, corrupt, metric = bench_attribution.setup(64, 2, 32, 1)  # what main built: seeded
    whole = patch_sites(model, clean, corrupt, ["blocks.0.hook_resid_pre"], metric, positions="image")
    assert maps["integrated"][0].sum() == pytest.approx(whole.clean - whole.corrupted, rel=0.02)
    # one cell, patched directly, is the patched map's entry
    k = 5
    only = torch.zeros_like(corrupt.image_mask)
    only[0, corrupt.image_mask[0].nonzero()[k]] = True
    one = patch_sites(model, clean, corrupt, ["blocks.1.hook_resid_pre"], metric, positions=lambda inputs: only)
    assert maps["patching"][1, k] == pytest.approx(one.patched["blocks.1.hook_resid_pre"] - one.corrupted, abs=1e-6)


def test_bad_image_size_is_refused():
    with pytest.raises(SystemExit, match="multiple of the 8-pixel patch"):
        bench_attribution.main(["--image-size", "30"])
