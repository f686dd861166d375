"""The MLLMU-Bench schema as plain dataclasses.

Why dataclasses and not dicts: every consumer (the evaluator, the trainer, the
eraser's pair builders) reads the same few fields, and a typo in a dict key
fails silently while a typo in an attribute fails loudly.  The real MLLMU-Bench
loader (`eraser.data.mllmu`) and the embedded generator (`eraser.data.mini`)
both produce these objects, so everything downstream runs unchanged on either.

Modality follows the benchmark: ``"vqa"`` questions are asked with the
profile's image and refer to "the person in the image"; ``"qa"`` questions are
text-only and name the person.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from PIL import Image

Modality = Literal["vqa", "qa"]
SPLITS = ("forget", "test", "retain", "celebrity")


@dataclass(frozen=True)
class ClassificationQ:
    """Multiple choice: ``options`` maps letters "A".."D" to answers; ``answer`` is the correct letter."""

    question: str
    options: dict[str, str]
    answer: str
    modality: Modality

    def __post_init__(self) -> None:
        # Checked here because a wrong answer field is scored as a wrong answer on every question: forget
        # accuracy 0, which looks like perfect unlearning.
        _check_modality(self.modality, self.question)
        keys = list(self.options)
        if len(keys) < 2 or not all(isinstance(k, str) and len(k) == 1 and "A" <= k <= "Z" for k in keys):
            raise ValueError(f"classification question {self.question[:60]!r}: options must map at least two "
                             f"upper-case letters to answers, got keys {keys}")
        if self.answer not in self.options:
            hint = [k for k, v in self.options.items() if str(v).strip().lower() == str(self.answer).strip().lower()]
            raise ValueError(f"classification question {self.question[:60]!r}: answer {self.answer!r} is not one of "
                             f"its option letters {keys}" + (f" (it is the text of option {hint[0]}: pass "
                                                             f"{hint[0]!r})" if hint else ""))


def _check_modality(modality: str, question: str) -> None:
    if modality not in ("vqa", "qa"):
        raise ValueError(f"question {question[:60]!r}: modality must be 'vqa' or 'qa', got {modality!r}")


@dataclass(frozen=True)
class GenerationQ:
    """Free-form question scored by ROUGE-L/BLEU against ``ground_truth``."""

    question: str
    ground_truth: str
    modality: Modality

    def __post_init__(self) -> None:
        _check_modality(self.modality, self.question)


@dataclass(frozen=True)
class ClozeQ:
    """Fill-in-the-blank: ``question`` contains ``"__"``; correct if ``ground_truth`` appears in the output."""

    question: str
    ground_truth: str
    modality: Modality

    def __post_init__(self) -> None:
        _check_modality(self.modality, self.question)
        if "__" not in self.question:
            raise ValueError(f"cloze question {self.question[:60]!r} has no blank '__'")


@dataclass
class Profile:
    """One identity (a fictitious person or a celebrity) with its image and all its questions.

    ``image`` is the image the model was trained on (MLLMU's ``image``);
    ``test_images`` are new images of the same identity (MLLMU's ``Test_Set``
    ``images`` list), empty when the split has none.  ``facts`` is the ground
    truth the questions were generated from (empty for the real benchmark,
    which does not ship it).
    """

    id: str
    name: str
    image: Image.Image | None
    biography: str
    classification: list[ClassificationQ] = field(default_factory=list)
    generation: list[GenerationQ] = field(default_factory=list)
    cloze: list[ClozeQ] = field(default_factory=list)
    test_images: list[Image.Image] = field(default_factory=list)
    facts: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    """A single prompt with an optional image and its expected answer (used for refusal behaviour).

    ``subject`` is the id of the profile the request is about, when it is about one.
    """

    prompt: str
    answer: str
    image: Image.Image | None = None
    subject: str | None = None


@dataclass
class Benchmark:
    """A forget/retain split of a benchmark, ready for training and evaluation.

    ``test`` holds the forget identities with new images (each profile's
    ``image`` is set to its first test image, so the evaluator treats every
    split the same way).  ``forbidden`` are requests the model must refuse and
    ``answerable`` comparable requests it must answer; both are empty for the
    real MLLMU-Bench, which has no refusal behaviour.
    """

    name: str
    forget_ratio: int
    forget: list[Profile]
    retain: list[Profile]
    test: list[Profile]
    celebrity: list[Profile]
    forbidden: list[Request] = field(default_factory=list)
    answerable: list[Request] = field(default_factory=list)

    def split(self, name: str) -> list[Profile]:
        """Profiles of one split by its name in :data:`SPLITS`."""
        if name not in SPLITS:
            raise KeyError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def splits(self) -> dict[str, list[Profile]]:
        return {s: self.split(s) for s in SPLITS}
