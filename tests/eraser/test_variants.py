"""The variant table: every entry is a valid EraserConfig change, and the command line offers exactly these."""
from __future__ import annotations

import dataclasses

from eraser.cli import METHOD_SETS, build_parser
from eraser.method import EraserConfig
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
    assert list(variant.choices) == list(ERASER_VARIANTS)
