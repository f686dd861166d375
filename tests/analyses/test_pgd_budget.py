"""analyses/pgd_budget.py on the quick model: two budgets, a two-strength search."""
from __future__ import annotations

import pytest

from analyses import pgd_budget

from eraser.plots import make_all, plot_pgd_budget

from . import in_unit, is_png, one_thread, quick_eraser, read_json, script_args  # noqa: F401


@pytest.fixture(scope="module")
def run(quick_eraser, tmp_path_factory):
    out = tmp_path_factory.mktemp("pgd_budget")
    with one_thread():
        # --limit 17: the release's 17 pairs, the ones the eraser was fitted on (a smaller limit takes fewer)
        res = pgd_budget.main(script_args(out, quick_eraser, 17, "--eps", "8,0", "--grid=-1"))
    return out, res


def test_budgets_attack_direction_and_validation(run):
    out, res = run
    data = read_json(out / "pgd_budget.json")
    assert data["question"].startswith("How sensitive")
    clean, attacked = data["budgets"]
    assert (clean["eps_255"], attacked["eps_255"]) == (0.0, 8.0)  # sorted
    assert clean["steps"] == 0 and clean["target_loss"]["attacked"] == clean["target_loss"]["clean"]
    assert clean["linf_255"] == 0.0 and attacked["linf_255"] <= 8.0 + 1e-4
    # PGD lowers the loss of the recall answer (or leaves it, on a model that already recalls it perfectly)
    assert attacked["target_loss"]["attacked"] <= attacked["target_loss"]["clean"] + 1e-6
    assert all(c == pytest.approx(1.0) for c in clean["cosine_to_clean"])
    # the eraser was fitted with the release's budget (8/255, alpha 2/255, 10 steps) on the same pairs: its own
    # direction comes back, the independent check that this script varies only the budget
    assert all(c > 0.99999 for c in attacked["cosine_to_eraser"])
    if data["config"]["eraser"]["answer_steps"]:  # the default variant steers answer tokens too: same check there
        assert all(c > 0.99999 for c in attacked["answer_cosine_to_eraser"])
    assert all(-1 <= c <= 1 for c in attacked["cosine_to_clean"]) and all(n > 0 for n in attacked["direction_norm"])
    assert data["config"]["grid"] == sorted({-1.0, data["config"]["eraser"]["strength"]}, key=abs)
    for b in data["budgets"]:
        own = b["validation"]["at_own_strength"]
        assert own["strength"] == data["config"]["eraser"]["strength"]
        assert in_unit(own["forget_refusal"]) and in_unit(own["retain_cls"]) and in_unit(own["answerable_refusal"])


def test_figure_from_the_run_and_from_saved_json(run, tmp_path):
    out, _ = run
    assert is_png(out / "pgd_budget.png")  # drawn by the script
    again = plot_pgd_budget(out, tmp_path / "again.png")  # redrawn from the folder, nothing recomputed
    assert again is not None and is_png(again)
    assert [p.name for p in make_all(out, tmp_path, only=["pgd_budget"])] == ["pgd_budget.png"]
    assert plot_pgd_budget(tmp_path / "missing", tmp_path / "none.png") is None


def test_bad_arguments_fail_at_parse_time(capsys):
    for argv in (["--eps", ""], ["--eps", "1,x"], ["--grid", "nan"], ["--steps", "-1"], ["--eps=-1"], ["--steps", "0"]):
        with pytest.raises(SystemExit) as e:
            pgd_budget.main(argv)
        assert e.value.code == 2
    assert "expected" in capsys.readouterr().err
    with pytest.raises(ValueError, match="steps 0 runs no attack"):  # the same rule for a programmatic run
        pgd_budget.run(None, eps=(8,), steps=0)
