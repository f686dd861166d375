"""The fit-time benchmark: baselines are timed at comparable forgetting, ratios per baseline (no timing asserted)."""
from __future__ import annotations

import math

from analyses.bench_fit import BASELINES, first_reaching, main


def test_first_reaching_takes_the_cheapest_row_at_or_under_the_target():
    rows = [{"fit_s": 4.0, "forget_cls": 0.0}, {"fit_s": 1.0, "forget_cls": 0.3}, {"fit_s": 2.5, "forget_cls": 0.04}]
    assert first_reaching(rows, 0.05)["fit_s"] == 2.5
    assert first_reaching(rows, 0.3)["fit_s"] == 1.0
    assert first_reaching(rows, -0.1) is None
    assert first_reaching([], 1.0) is None
    # at comparable utility: a row needs its measured retain accuracy too
    rows[2]["retain_cls"], rows[0]["retain_cls"] = 0.4, 0.97
    assert first_reaching(rows, 0.05, retain_min=0.9)["fit_s"] == 4.0
    assert first_reaching(rows, 0.05, retain_min=0.3)["fit_s"] == 2.5
    assert first_reaching(rows, 0.3, retain_min=0.5)["fit_s"] == 4.0  # the row without retain_cls never counts


def test_bench_fit_times_baselines_at_comparable_forgetting(capsys):
    out = main(["--model", "quick", "--repeats", "1", "--lrs", "3e-3", "--max-epochs", "3", "--threads", "1"])
    assert out["mode"] == "comparable" and out["variant"] == "mllmeraser_stacked_gate"
    assert out["mllmeraser"]["forget"] <= 0.05  # the variant forgets on the validation questions
    assert out["target"] == max(out["mllmeraser"]["forget"], 0.05)
    assert out["mllmeraser_s"] > 0
    for m in BASELINES:
        search = out[f"{m}_setting"], out["search"][m]
        hit = search[1]["reached"]
        if hit is None:  # never forgot enough: timed at the largest budget, and the ratio is a lower bound
            assert out[f"{m}_lower_bound"] and search[0] == {"lr": 3e-3, "epochs": 3}
            assert all(r["forget_cls"] > out["target"] for r in search[1]["rows"])
        else:
            assert not out[f"{m}_lower_bound"] and hit["forget_cls"] <= out["target"]
            assert search[0] == {"lr": hit["lr"], "epochs": hit["epochs"]} and 0 <= hit["retain_cls"] <= 1
            assert [r["epochs"] for r in search[1]["rows"]] == list(range(1, hit["epochs"] + 1))
        assert out[f"{m}_s"] > 0
        assert math.isclose(out[f"{m}_ratio"], out[f"{m}_s"] / out["mllmeraser_s"])
    assert out["cheapest_ratio"] == min(out[f"{m}_ratio"] for m in BASELINES)
    printed = capsys.readouterr().out
    assert "for comparable forgetting (target >= 20x)" in printed


def test_bench_fit_fixed_epochs_skips_the_search(capsys):
    out = main(["--model", "quick", "--repeats", "1", "--fixed-epochs", "1", "--threads", "1"])
    assert out["mode"] == "fixed" and "search" not in out
    assert all(out[f"{m}_setting"] == {"lr": 3e-4, "epochs": 1} for m in BASELINES)
    assert "at a fixed budget (target >= 20x)" in capsys.readouterr().out
    # --baselines: only those are timed, and "cheapest" is the cheapest of them
    out = main(["--model", "quick", "--repeats", "1", "--fixed-epochs", "1", "--threads", "1",
                "--baselines", "kl_min,ga"])
    assert {k[:-2] for k in out if k.endswith("_s") and k != "mllmeraser_s"} == {"ga", "kl_min"}
    assert out["cheapest"] in ("ga", "kl_min") and "cheapest of ga, kl_min" in capsys.readouterr().out


def test_bench_fit_rejects_bad_flags_before_loading_anything(capsys):
    import pytest

    for argv in (["--lrs", "fast"], ["--lrs", "0"], ["--max-epochs", "0"], ["--fixed-epochs", "0"],
                 ["--retain-tolerance", "2"], ["--baselines", "ga,sgd"], ["--baselines", ","],
                 ["--baselines", "ga,ga"]):
        with pytest.raises(SystemExit):
            main(argv)
    err = capsys.readouterr().err
    assert "--lrs" in err and "--baselines must name distinct baselines" in err
    assert "--max-epochs: expected a positive integer, got 0" in err and "--fixed-epochs: expected a positive" in err
