"""Query sets: one check and one hash for every stage (eraser/queries.py)."""
import pytest

from eraser.queries import hash_queries, split_queries
from tests.conftest import random_image


def test_hash_is_stable_for_multi_image_rows():
    """A row with two images was hashed through the list's repr (memory addresses): the same forget set had
    another hash in every process, and check_forget_set refused it."""
    a, b = random_image(32, 1), random_image(32, 2)
    rows = [([a, b], "who are they"), (a, "who is this"), (None, "who is ann")]
    again = [([a.copy(), b.copy()], "who are they"), (a.copy(), "who is this"), (None, "who is ann")]
    assert hash_queries(rows) == hash_queries(again)
    assert hash_queries(rows) != hash_queries([([b, a], "who are they")] + rows[1:])
    assert hash_queries([(a, "who is this")]) == hash_queries([(a.copy(), "who is this")])
    assert hash_queries([(a, "who is this")]) != hash_queries([(None, "who is this")])
    assert len(hash_queries(rows)) == 16


def test_split_queries_checks_the_set():
    a = random_image(32, 1)
    images, prompts = split_queries([(a, "who is this"), (None, "who is ann")], "forget")
    assert images == [a, None] and prompts == ["who is this", "who is ann"]
    with pytest.raises(ValueError, match="the retain set is empty"):
        split_queries([], "retain")
    with pytest.raises(ValueError, match=r"item 1 .*an answer is not used"):
        split_queries([(a, "q"), (a, "q", "ann")], "forget")
    with pytest.raises(ValueError, match=r"item 0 .*wrap it in a list"):
        split_queries("who is this", "forget")
