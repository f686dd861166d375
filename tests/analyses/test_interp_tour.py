"""The interp tour runs on both architectures and shows what it says it shows."""
from __future__ import annotations

import pytest

from analyses.interp_tour import main


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_interp_tour_walks_all_five_steps(arch, capsys):
    main(["--arch", arch])
    text = capsys.readouterr().out
    for step in ("1. ", "2. encoded batch", "3. cache of", "4. steering", "5. greedy answers"):
        assert step in text
    assert "last (2, 128)" in text  # the last prompt token of each of the two rows, d_model 128
    assert "(0, 128)]" in text  # the text-only row has no image positions
