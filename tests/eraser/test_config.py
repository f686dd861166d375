"""EraserConfig: every setting is checked when the config is built, before any activation is collected."""
from __future__ import annotations

import pytest

from eraser import EraserConfig
from eraser.config import APPLICATION_FIELDS


def test_config_refuses_repeated_layers_and_wrong_types():
    """layers=(1, 2, 2) fitted 3 gate rows while the hooks (one per layer) indexed them by position, so a
    later layer was steered with another layer's gate and direction; now refused, as are other wrong types."""
    with pytest.raises(ValueError, match="repeat a layer"):
        EraserConfig(layers=(1, 2, 2))
    assert EraserConfig(layers=[2, 1]).layers == (2, 1)  # a list is stored as a tuple: the config stays hashable
    hash(EraserConfig(layers=[1, 2]))
    for bad in ({"batch_size": 2.5}, {"batch_size": True}, {"strength": "-1"}, {"answer_steps": True},
                {"every_step": 1}, {"layers": ("a",)}):
        with pytest.raises(ValueError):
            EraserConfig(**bad)


@pytest.mark.parametrize("field, value, message", [
    ("gamma", float("nan"), "gamma must be a finite number"), ("gamma", -1.0, "gamma .* must be a finite number >= 0"),
    ("rho", 2.0, r"rho .* must lie in \(0, 1\]"), ("rho", 0.0, r"rho .* must lie in \(0, 1\]"),
    ("rho", "x", "rho must be a finite number"), ("energy", 1.0, r"energy .* must lie in \(0, 1\)"),
    ("energy", float("inf"), "energy must be a finite number")])
def test_config_values_are_checked_when_the_config_is_built(field, value, message):
    with pytest.raises(ValueError, match=message):
        EraserConfig(**{field: value})


def test_rho_may_be_none_only_when_energy_is_set():
    assert EraserConfig(rho=None, energy=0.01).rho is None
    with pytest.raises(ValueError, match="give rho .* or energy"):
        EraserConfig(rho=None)


def test_bad_gate_windows_are_rejected():
    assert EraserConfig(gate_window=[0.1, 0.3]).gate_window == (0.1, 0.3)  # JSON lists become tuples
    for bad in [(0.3, 0.1), (0.2, 0.2), (0.1, float("nan")), (0.1,), "ab", (0.1, 0.2, 0.3)]:
        with pytest.raises(ValueError, match="gate_window"):
            EraserConfig(gate_window=bad)


def test_application_fields_are_config_fields():
    """with_config may change exactly these: a misspelt entry would let it change nothing, silently."""
    from dataclasses import fields

    assert APPLICATION_FIELDS < {f.name for f in fields(EraserConfig)}
    assert "rho" not in APPLICATION_FIELDS and "strength" in APPLICATION_FIELDS
