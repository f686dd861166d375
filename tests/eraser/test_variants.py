"""The variant table: every entry is a valid EraserConfig change, and the command line offers exactly these."""
from __future__ import annotations

import dataclasses

import pytest

from eraser.cli import METHOD_SETS, build_parser
from eraser.config import EraserConfig
from eraser.variants import ERASER_VARIANTS, NOT_CONFIG


def test_every_variant_is_a_config_change_or_a_switch():
    fields = {f.name for f in dataclasses.fields(EraserConfig)}
    for name, opts in ERASER_VARIANTS.items():
        changes = {k: v for k, v in opts.items() if k not in NOT_CONFIG}
        assert set(changes) <= fields, name
        cfg = dataclasses.replace(EraserConfig(), **changes)  # validates the values too
        assert all(getattr(cfg, k) == v for k, v in changes.items())
    assert ERASER_VARIANTS["mllmeraser"] == {}  # the paper's method: the defaults


def test_command_line_offers_exactly_the_variants():
    assert METHOD_SETS["mllmeraser"] == ["vanilla", *ERASER_VARIANTS]
    fit = build_parser()._subparsers._group_actions[0].choices["fit"]
    variant = next(a for a in fit._actions if a.dest == "variant")
    # every variant that saves as an artifact, in the table's order; the ungated ablation has no artifact of its own
    assert list(variant.choices) == [v for v in ERASER_VARIANTS if v != "steer_static"]


def test_stack_switch_reads_the_last_layers_and_steers_from_the_last_of_them_on():
    from eraser.variants import stacked_layers

    assert stacked_layers([1, 2, 3], 3) == ((1, 2, 3), (3,))
    assert stacked_layers(range(1, 32), 4) == ((28, 29, 30, 31), (31,))
    assert stacked_layers([3, 1, 2], 2) == ((2, 3), (3,))
    assert stacked_layers([1, 2], 5) == ((1, 2), (2,))  # fewer layers than k: all of them
    for k, layers in [(0, [1, 2]), (2, [])]:
        with pytest.raises(ValueError, match="stacked gate"):
            stacked_layers(layers, k)


def test_each_variant_can_be_evaluated_alone_next_to_vanilla():
    for name in ERASER_VARIANTS:
        if name != "mllmeraser":
            assert METHOD_SETS[name] == ["vanilla", name]
    ev = build_parser()._subparsers._group_actions[0].choices["eval"]
    method = next(a for a in ev._actions if a.dest == "method")
    assert "mllmeraser_stacked_gate" in method.choices and "mllmeraser" in method.choices


def test_variant_config_resolves_the_switches_for_a_model():
    from types import SimpleNamespace

    from eraser.pipeline import variant_config

    config, opts = variant_config(SimpleNamespace(n_layers=8), "mllmeraser_stacked_gate")
    assert config.gate_stack == (5, 6, 7) and config.layers == (7,)  # the last three of layers 1-7, steering 7
    assert config.answer_steps == 3 and config.concept_gates and opts["window"] is True
    config, opts = variant_config(SimpleNamespace(n_layers=8), "mllmeraser_text_only", EraserConfig(batch_size=4))
    assert config == EraserConfig(batch_size=4) and opts == {"pgd": False}
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config(SimpleNamespace(n_layers=8), "mllmeraser_typo")


def test_gated_variants_are_the_erasers():
    from eraser.variants import GATED_VARIANTS

    assert "steer_static" not in GATED_VARIANTS
    assert set(GATED_VARIANTS) == set(ERASER_VARIANTS) - {"steer_static"}


def test_retain_budget_is_per_gate_feature():
    from types import SimpleNamespace

    from eraser.pipeline import retain_budget, variant_config

    model = SimpleNamespace(n_layers=4, d_model=128)
    config, opts = variant_config(model, "mllmeraser_stacked_gate")
    assert retain_budget(model, config, opts) == 2 * 3 * 128  # three stacked layers of 128 features, 2 per feature
    config, opts = variant_config(model, "mllmeraser_window_gate")
    assert retain_budget(model, config, opts) is None  # every retain question
    assert retain_budget(model, config, {"retain_per_feature": 0.5}) == 64  # one layer's 128 features
    assert retain_budget(SimpleNamespace(d_model=4096), config, {"retain_per_feature": 2}) == 8192
    with pytest.raises(ValueError, match="retain_per_feature"):
        retain_budget(model, config, {"retain_per_feature": 0})
