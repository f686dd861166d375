"""The interp tour runs on both architectures and shows what it says it shows."""
from __future__ import annotations

import pytest

from analyses.interp_tour import main


@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_interp_tour_walks_all_eight_steps(arch, capsys):
    main(["--arch", arch])
    text = capsys.readouterr().out
    for step in ("1. ", "2. encoded batch", "3. cache of", "4. steering", "5. greedy answers", "6. inside block 1",
                 "7. the image positions", "8. "):
        assert step in text
    assert "last (2, 128)" in text  # the last prompt token of each of the two rows, d_model 128
    assert "(0, 128)]" in text  # the text-only row has no image positions
    assert "attn.hook_z (2, " in text and ", 4, 32) (batch, pos, head, d_head)" in text  # 4 heads of 32
    # the first block's input at the image positions is the whole difference between the two portraits' runs
    effects = text.split("7. ")[1].split("block): [")[1].split("]")[0]
    assert effects.startswith("1.0,")
    assert "8. 114 edges" in text  # 4 blocks of 4 heads
    largest = text.split("8. ")[1].split("the largest: ['")[1].split("'")[0]
    assert largest.startswith("image -> L0.attn_in")  # the portrait enters through block 0's attention input
    n_split = {"llava": 532, "qwen2_5_vl": 380}[arch]  # Qwen's 4 query heads share 2 key/value heads
    assert f"split per head ({n_split} edges" in text
    n_vision = {"llava": 8, "qwen2_5_vl": 21}[arch]  # LLaVA's projector reads block 0 of 2 (feature layer -2)
    assert f"the vision tower's {n_vision} edges" in text
    cut = float(text.split("those into the projector add up to ")[1].split()[0])
    assert abs(cut - 1.0) < 0.1  # integrated: a complete cut (measured 0.95 / 0.99)
