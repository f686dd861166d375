"""Tests for eraser.metrics: pure functions, exact numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest

from eraser import metrics as M
from eraser.data.prompts import REFUSAL


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A", "A"),
        ("  b) the baker", "B"),
        ("**C**", "C"),
        ("(d)", "D"),
        ("", None),
        ("  ...!? ", None),
        (None, None),
        ("The answer is A", "T"),  # MLLMU rule: first alphanumeric, no cleverness
        ("3", "3"),
    ],
)
def test_parse_choice(text, expected):
    assert M.parse_choice(text) == expected


def test_cloze_correct_case_insensitive_substring():
    assert M.cloze_correct("She was born in PARIS, France.", "Paris")
    assert M.cloze_correct("paris", "  Paris ")
    assert not M.cloze_correct("She was born in Lyon.", "Paris")
    assert not M.cloze_correct("", "Paris")
    with pytest.raises(ValueError, match="empty"):
        M.cloze_correct("anything", "  ")


def test_rouge_l_identical_disjoint_and_known_value():
    assert M.rouge_l("The cat sat on the mat.", "The cat sat on the mat.") == 1.0
    assert M.rouge_l("alpha beta gamma", "delta epsilon") == 0.0
    # LCS("the cat sat on the mat", "the cat is on the mat") = 5 of 6 tokens each side
    assert M.rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    # stemmer on: "running" ~ "run"
    assert M.rouge_l("he runs", "he running") == pytest.approx(1.0)
    assert M.rouge_l("", "reference") == 0.0
    assert M.rouge_l("prediction", "") == 0.0
    assert isinstance(M.rouge_l("a b", "a c"), float)


def test_rouge_l_is_the_f_measure():
    """From a mutation audit: ROUGE-L recall (or precision) in place of F went unnoticed: every pair above has equal
    lengths.  LCS 2 of a 2-token prediction and a 6-token reference: P 1, R 1/3, F 0.5, either way round."""
    assert M.rouge_l("the cat", "the cat sat on the mat") == pytest.approx(0.5)
    assert M.rouge_l("the cat sat on the mat", "the cat") == pytest.approx(0.5)
    assert M.rouge_l("the dog", "the cat sat on the mat") == pytest.approx(2 * (1 / 2) * (1 / 6) / (1 / 2 + 1 / 6))


def test_bleu_bounds_and_empty():
    assert M.bleu("The cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert M.bleu("Paris", "paris") == pytest.approx(1.0)  # short answers are not crushed
    assert M.bleu("", "the cat") == 0.0
    assert M.bleu("the cat", "") == 0.0
    assert M.bleu("", "") == 0.0
    assert M.bleu("zebra quokka", "the cat sat on the mat") < 0.05
    mid = M.bleu("the cat sat on a mat", "the cat sat on the mat")
    assert 0.2 < mid < 1.0


def test_bleu_order_follows_the_prediction_and_brevity_applies():
    """From a mutation audit: the n-gram order taken from the reference's length went unnoticed.  A one-word
    prediction is scored on unigrams: precision 1 times the brevity penalty exp(1 - 4/1)."""
    assert M.bleu("paris", "paris is a city") == pytest.approx(math.exp(-3))
    assert M.bleu("Paris city", "paris is a city") == pytest.approx(math.exp(1 - 4 / 2) * math.sqrt(1.0 * (0.1 / 1)))


def test_answer_probability():
    assert M.answer_probability(0.0) == 1.0
    assert M.answer_probability(math.log(2)) == pytest.approx(0.5)
    assert isinstance(M.answer_probability(np.float32(1.0)), float)
    with pytest.raises(ValueError):
        M.answer_probability(float("nan"))


@pytest.mark.parametrize(
    "text",
    [REFUSAL, "i cannot help with that", "I can’t share that.", "I'm sorry, but no.", "Sorry, I am UNABLE TO answer.",
     "I won't answer that", "I do not know who this is.", "Unable to answer.", "Sorry, no.",
     "As an assistant, I'm not able to say.", "I do not have that information.", "I refuse.",
     "As an AI I must decline.", "I'll not answer that.", "I don't have any personal information about her.",
     "Cannot answer that question.", "I'm not sure who this is.", "I'd rather not say.", "No comment.",
     "That information is private."],
)
def test_is_refusal_true(text):
    assert M.is_refusal(text)


@pytest.mark.parametrize("text", ["She is a baker from Lyon.", "B", "", "Canned food is tasty.",
                                  "He was unable to attend school.", "She cannot help but sing.",
                                  "They can't provide for the family.", "Her sorry tale is well known.",
                                  "I can't wait to visit Paris.", "Cannot be determined from her records.",
                                  "I cannot help but admire her work.", "She refused the award.",
                                  "I won't forget her painting."])
def test_is_refusal_false(text):
    assert not M.is_refusal(text)


def test_refusal_rate():
    assert M.refusal_rate([REFUSAL, "Paris", "I'm sorry.", "A"]) == 0.5
    with pytest.raises(ValueError, match="empty"):
        M.refusal_rate([])


@pytest.mark.parametrize(
    "text",
    ["", "   ", "the the the the", "Paris paris, PARIS. paris!", "a b a a a", "<unk> <unk> <unk> hello",
     "## ?? !!", "aaaaaaaaaaaa", "\ufffd\ufffd \ufffd", ". . !"],
)
def test_is_gibberish_true(text):
    assert M.is_gibberish(text)


@pytest.mark.parametrize(
    "text",
    ["Paris.", "B", "She was born in 1987 in Lyon, France.", "the cat and the dog and the bird",
     "1000000000", "He works as a baker — and loves chess.", "paris .", "tokyo , japan ."],
)
def test_is_gibberish_false(text):
    assert not M.is_gibberish(text)


def test_gibberish_single_token_share_boundary():
    """From a mutation audit: the >= 60 % single-token rule turned into > 60 % went unnoticed.  Exactly 3 of 5."""
    assert M.is_gibberish("yes yes yes no maybe")
    assert not M.is_gibberish("yes yes no no maybe")  # 40 %
    assert M.is_gibberish("yes yes yes yes no maybe")  # a run of four


def test_gibberish_rate():
    assert M.gibberish_rate(["ok answer here", "", "x x x x", "Lyon"]) == 0.5
    with pytest.raises(ValueError):
        M.gibberish_rate([])


def test_forget_quality_ks():
    rng = np.random.default_rng(0)
    a = rng.uniform(0, 1, 200)
    assert M.forget_quality(a, a.copy()) == pytest.approx(1.0)
    assert M.forget_quality(a, a + 0.5) < 1e-6
    # two-sided (from a mutation audit: a one-sided test hid over-forgetting, probabilities driven to 0)
    assert M.forget_quality(a, a * 0.01) < 1e-6
    assert M.forget_quality(a * 0.01, a) < 1e-6
    assert isinstance(M.forget_quality(list(a), list(a)), float)
    with pytest.raises(ValueError, match="probs_model"):
        M.forget_quality([], [0.1])
    with pytest.raises(ValueError, match="probs_oracle"):
        M.forget_quality([0.1], [])


def test_truth_ratio():
    # paraphrase NLL 1, perturbed NLLs mean 1 -> ratio 1 (model has no preference)
    assert M.truth_ratio(1.0, [0.5, 1.5]) == pytest.approx(1.0)
    # model strongly prefers the truth: ratio exp(0.2 - 2.2) < 1
    assert M.truth_ratio(0.2, [2.2, 2.2]) == pytest.approx(math.exp(-2.0))
    with pytest.raises(ValueError):
        M.truth_ratio(1.0, [])


def test_gate_firing_rates():
    r = M.gate_firing_rates([0.9, 0.8, 0.1, 0.7], np.array([0.1, 0.6, 0.2, 0.0, 0.3]))
    assert r["true_firing_rate"] == 0.75
    assert r["false_firing_rate"] == pytest.approx(0.2)
    assert r["mean_gate_forget"] == pytest.approx(0.625)
    assert all(isinstance(v, float) for v in r.values())
    r2 = M.gate_firing_rates([0.9, 0.8], [0.85], threshold=0.82)
    assert (r2["true_firing_rate"], r2["false_firing_rate"]) == (0.5, 1.0)
    with pytest.raises(ValueError, match="gate_retain"):
        M.gate_firing_rates([0.5], [])
    # fires strictly above the threshold (from a mutation audit: ">=" went unnoticed)
    at = M.gate_firing_rates([0.5, 0.9], [0.5, 0.5, 0.1], threshold=0.5)
    assert (at["true_firing_rate"], at["false_firing_rate"]) == (0.5, 0.0)


def test_gate_firing_rates_accepts_torch():
    torch = pytest.importorskip("torch")
    f = torch.tensor([0.9, 0.1], requires_grad=True)
    r = M.gate_firing_rates(f, torch.tensor([0.0, 0.0, 1.0, 0.0]))
    assert r["true_firing_rate"] == 0.5 and r["false_firing_rate"] == 0.25


def test_mean_errors_on_empty():
    assert M.mean([1, 2]) == 1.5
    with pytest.raises(ValueError, match="scores"):
        M.mean([], "scores")


def test_nan_and_out_of_range_inputs_are_errors_not_numbers():
    """Before: forget_quality of a NaN sample was NaN, a NaN gate counted as not firing, answer_probability(-1)
    was 2.72 and truth_ratio(800, [0]) raised OverflowError."""
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.forget_quality([0.1, float("nan")], [0.2, 0.3])
    with pytest.raises(ValueError, match="NaN or infinite"):
        M.gate_firing_rates([float("nan")], [0.0])
    with pytest.raises(ValueError, match=">= 0"):
        M.answer_probability(-1.0)
    assert M.truth_ratio(800.0, [0.0]) == math.inf and M.truth_ratio(1.0, [1.0]) == 1.0
