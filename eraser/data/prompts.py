"""MLLMU-Bench prompt formats, exactly as the benchmark's evaluation uses them.

One place for them because the trainer, the evaluator and the eraser's pair
builders must all send the model byte-identical prompts: a model trained on a
slightly different suffix would look worse (or better) than it is.
"""
from __future__ import annotations

from .schema import ClassificationQ, ClozeQ, GenerationQ

CLASSIFICATION_SUFFIX = "Just give ONE letter representing the answer directly."
CLOZE_SUFFIX = "Please ONLY provide the correct answer that should replace the [Blank]."
GENERATION_SUFFIX = "Answer the question based on your trained knowledge in one sentence in ENGLISH."
REFUSAL = "I cannot help with that."


def classification_prompt(q: ClassificationQ) -> str:
    """Question, then one ``X: option`` line per letter, then the one-letter instruction."""
    options = "\n".join(f"{k}: {v}" for k, v in sorted(q.options.items()))
    return f"{q.question}\n{options}\n{CLASSIFICATION_SUFFIX}"


def cloze_prompt(q: ClozeQ) -> str:
    """``__`` becomes ``[Blank]``, then the fill-in instruction."""
    return f"{q.question.replace('__', '[Blank]')}\n{CLOZE_SUFFIX}"


def generation_prompt(q: GenerationQ) -> str:
    return f"{q.question}\n{GENERATION_SUFFIX}"
