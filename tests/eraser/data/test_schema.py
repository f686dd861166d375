"""The schema's questions refuse what would be scored silently wrong."""
from __future__ import annotations

import pytest

from eraser.data.schema import ClassificationQ, ClozeQ, GenerationQ
from eraser.evaluate import build_items
from eraser.metrics import parse_choice


def test_classification_answer_must_be_an_option_letter():
    """A hand-built question whose answer is the option's text was scored wrong on every answer (reference
    "PILOT" against a parsed "B"): forget accuracy 0, which reads as perfect unlearning."""
    opts = {"A": "baker", "B": "pilot"}
    q = ClassificationQ("What is the job of Ann?", opts, "B", "qa")
    assert q.answer == "B"
    with pytest.raises(ValueError, match=r"is the text of option B: pass 'B'"):
        ClassificationQ("What is the job of Ann?", opts, "pilot", "qa")
    with pytest.raises(ValueError, match="not one of its option letters"):
        ClassificationQ("What is the job of Ann?", opts, "E", "qa")
    with pytest.raises(ValueError, match="upper-case letters"):
        ClassificationQ("What is the job of Ann?", {"a": "baker", "b": "pilot"}, "b", "qa")
    with pytest.raises(ValueError, match="at least two"):
        ClassificationQ("What is the job of Ann?", {"A": "baker"}, "A", "qa")
    with pytest.raises(ValueError, match="modality"):
        ClassificationQ("What is the job of Ann?", opts, "B", "text")


def test_cloze_needs_a_blank_and_every_question_a_modality():
    assert ClozeQ("Ann works as a __.", "baker", "qa").ground_truth == "baker"
    with pytest.raises(ValueError, match="no blank"):
        ClozeQ("Ann works as a baker.", "baker", "qa")
    with pytest.raises(ValueError, match="modality"):
        GenerationQ("What does Ann do?", "She bakes.", "image")


def test_a_valid_question_scores_its_letter():
    from eraser.data.schema import Profile

    q = ClassificationQ("What is the job of Ann?", {"A": "baker", "B": "pilot"}, "B", "qa")
    profile = Profile(id="ann", name="Ann", image=None, biography="", classification=[q])
    (item,) = build_items([profile])
    assert item.reference == "B" and parse_choice("B. pilot") == item.reference
