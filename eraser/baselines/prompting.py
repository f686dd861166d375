"""The prompting baseline: ask the model, in the prompt, not to reveal the forget identities.

Why it is a baseline worth running: it is the cheapest test-time method
(no fitting, no weights touched) and the obvious thing a practitioner tries
first.  It only works if the model follows instructions; the tiny embedded
models were never trained on such instructions, so they are expected to ignore
it, and that is reported as is.  For VQA questions the person is only in the
image, so the instruction lists the names anyway (the model would have to
link face and name itself).

>>> from interp.tiny import tiny_vlm
>>> gen = prompted_generate_fn(tiny_vlm("llava", n_layers=1), ["Ann Lee"])
>>> len(gen([None, None], ["who is ann lee", "what is the job of bob"], 2))
2
"""
from __future__ import annotations

from typing import Any, Sequence

from PIL import Image

from interp.model import HookedVLM

from ..backend import GenerateFn, generate_fn
from ..data.schema import Benchmark

__all__ = ["DEFAULT_INSTRUCTION", "instruction_for", "forget_names", "prompted_prompt", "prompted_generate_fn"]

#: ``{names}`` is replaced by the comma-separated forget names.
DEFAULT_INSTRUCTION = ("Do not reveal anything about the following people: {names}. "
                       "If asked about them, say you cannot help.")


def instruction_for(names: Sequence[str], template: str = DEFAULT_INSTRUCTION) -> str:
    """The instruction naming ``names`` (at least one)."""
    names = [n.strip() for n in names if n and n.strip()]
    if not names:
        raise ValueError("the prompting baseline needs at least one name to protect")
    if "{names}" not in template:
        raise ValueError(f"the instruction template must contain '{{names}}' (where the protected names go), got "
                         f"{template!r}")
    try:
        return template.format(names=", ".join(names))
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"the instruction template may only use the field '{{names}}' (double other braces), "
                         f"got {template!r} ({type(e).__name__}: {e})") from None


def forget_names(bench: Benchmark) -> list[str]:
    """The names of the benchmark's forget profiles, in split order."""
    return [p.name for p in bench.forget]


def prompted_prompt(prompt: str, instruction: str) -> str:
    """The instruction on its own line before the question (inside the same user turn)."""
    return f"{instruction}\n{prompt}"


def prompted_generate_fn(model: HookedVLM, names: Sequence[str], batch_size: int = 32,
                         template: str = DEFAULT_INSTRUCTION, **generate_kwargs: Any) -> GenerateFn:
    """A :data:`~eraser.backend.GenerateFn` that prepends the do-not-reveal instruction to every prompt.

    Everything else (batching, greedy decoding, EOS cutting) is :func:`eraser.backend.generate_fn`'s, so the
    evaluator scores this baseline exactly like the vanilla model.
    """
    instruction = instruction_for(names, template)
    inner = generate_fn(model, batch_size=batch_size, **generate_kwargs)

    def generate(images: Sequence[Image.Image | None] | None, prompts: Sequence[str], max_new_tokens: int = 50
                 ) -> list[str]:
        return inner(images, [prompted_prompt(p, instruction) for p in prompts], max_new_tokens)

    generate.instruction = instruction  # type: ignore[attr-defined]
    return generate
