"""analyses/bench_edges.py on a small random config: the numbers it times are the right ones."""
from __future__ import annotations

import pytest

from analyses import bench_edges
from interp.edges import EdgeGraph

ARGS = ["--d-model", "64", "--n-layers", "2", "--image-size", "32", "--repeats", "1", "--threads", "1",
        "--sample", "6", "--steps", "8"]


@pytest.fixture(scope="module")
def res():
    return bench_edges.main(ARGS)


def test_prints_both_graphs_with_ratios(res, capsys):
    bench_edges.main(ARGS)
    out = capsys.readouterr().out
    assert "block graph (62 edges)" in out and "split graph (361 edges)" in out and "x faster; r with patching" in out
    # 2 blocks of 8 heads: the block graph, and the graph split per head (every edge into an attention input
    # becomes one per query, key and value head)
    assert res["edges"] == {"block": len(EdgeGraph(2, 8).edges()), "split": len(EdgeGraph(2, 8, qkv=True).edges())}
    for g in ("block", "split"):
        r = res[g]
        assert r["patching_all_s_extrapolated"] == pytest.approx(r["patching_per_edge_s"] * res["edges"][g])
        assert r["ratio_first_order"] == pytest.approx(r["patching_all_s_extrapolated"] / res["medians_s"][f"{g}_first_order"])
        # integrated along the path, the estimate follows patching on the largest edges
        assert r["agreement"]["integrated"] > 0.9


def test_bad_image_size_is_refused():
    with pytest.raises(SystemExit, match="multiple of the 8-pixel patch"):
        bench_edges.main(["--image-size", "30"])
