"""Command-line argument types: in-range values parse, out-of-range ones fail with the value named."""
from __future__ import annotations

import argparse

import pytest

from eraser.argtypes import finite_float, nonneg_int, positive_int


def test_in_range_values_parse():
    assert (nonneg_int("0"), nonneg_int("7"), positive_int("1"), finite_float("-0.25"), finite_float("1e3")) == \
        (0, 7, 1, -0.25, 1000.0)


@pytest.mark.parametrize("fn, text, message", [
    (nonneg_int, "-1", "expected a non-negative integer, got -1"),
    (nonneg_int, "1.5", "expected a non-negative integer, got '1.5'"),
    (positive_int, "0", "expected a positive integer, got 0"),
    (positive_int, "many", "expected a positive integer, got 'many'"),
    (finite_float, "nan", "expected a finite number, got 'nan'"),
    (finite_float, "-inf", "expected a finite number, got '-inf'"),
    (finite_float, "strong", "expected a number, got 'strong'"),
])
def test_out_of_range_values_name_the_problem(fn, text, message):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        fn(text)
    assert str(e.value) == message
