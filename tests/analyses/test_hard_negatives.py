"""analyses/hard_negatives.py end to end on the quick model: mining, refits per weight, the saved record."""
from __future__ import annotations

import pytest

from analyses import hard_negatives as hn


def test_quick_model_weights_0_and_10(tmp_path) -> None:
    """Weight 0 is the variant's own choice; weight 10 closes the refit gate on mined retain queries.

    Measured on the AMD-trained quick model (forget 5 %): 43 of 825 retain queries mined over the window's lo
    0.563, 5 of them still over the refit's lo 0.611 at weight 10; both weights miss only the refusal bar (0.818).
    """
    from . import one_thread, read_json

    with one_thread():
        out = hn.main(["--quick", "--weights", "0,10", "--no-progress", "--out", str(tmp_path), "--threads", "1"])
    saved = read_json(tmp_path / "hard_negatives.json")
    assert saved["config"]["variant"] == "mllmeraser_window_gate" and [r["weight"] for r in saved["weights"]] == [0, 10]
    mined = saved["mined"]
    assert 0 < mined["queries"] <= sum(mined["per_gate_row"]) and mined["of"] > 10 * mined["queries"]
    zero, ten = saved["weights"]
    for key in ("gamma", "null_space", "window"):  # weight 0 refits the very statistics the first gate came from
        assert zero[key] == saved["first"][key], key
    assert zero["hard_still_over_lo"] == mined["queries"]  # every mined query is, by definition, over lo
    assert ten["hard_still_over_lo"] < mined["queries"]
    for row in saved["weights"]:
        assert row["strength"] in hn.DEFAULT_GRID and set(row["methods"]) >= {"forget", "test", "retain", "celebrity"}
        assert "all_pass" in row["checks"]
    assert out["mined"] == mined


def test_bad_input_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="has none"):
        hn.run(quick=True, variant="mllmeraser", progress=False)
    with pytest.raises(ValueError, match="numbers >= 0"):
        hn.run(quick=True, weights=[-1.0], progress=False)
    with pytest.raises(SystemExit):
        hn.main(["--quick", "--weights", "1,nan", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        hn.main(["--quick", "--variant", "mllmeraser_mean_gate", "--out", str(tmp_path)])
    assert not (tmp_path / "hard_negatives.json").exists()
