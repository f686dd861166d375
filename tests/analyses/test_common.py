"""The flags every analysis script shares: out-of-range values fail at parse time, as the mllmeraser CLI's do."""
from __future__ import annotations

import pytest

from analyses.common import base_parser


@pytest.mark.parametrize("argv, message", [
    (["--seed", "-1"], "non-negative integer, got -1"),
    (["--strength", "nan"], "finite number, got 'nan'"),
    (["--limit", "0"], "positive integer, got 0"),
    (["--batch-size", "0"], "positive integer, got 0"),
    (["--threads", "-2"], "positive integer, got -2"),
    (["--forget-ratio", "7"], "invalid choice"),
])
def test_out_of_range_shared_flags_are_rejected(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        base_parser("probing", "test").parse_args(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_in_range_shared_flags_parse():
    args = base_parser("probing", "test").parse_args(["--seed", "0", "--strength", "-0.5", "--limit", "3"])
    assert (args.seed, args.strength, args.limit, args.batch_size) == (0, -0.5, 3, 32)
