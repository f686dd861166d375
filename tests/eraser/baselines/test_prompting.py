"""The prompting baseline: every prompt gets the do-not-reveal instruction; one answer per row comes back."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eraser.baselines.prompting import (DEFAULT_INSTRUCTION, forget_names, instruction_for, prompted_generate_fn,
                                        prompted_prompt)
from eraser.data.schema import Benchmark, Profile
from eraser.evaluate import evaluate_split


class _Recorder:
    """Stands in for a HookedVLM's generate path: records the prompts it is asked to encode."""

    def __init__(self, model):
        self.model, self.prompts = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def encode(self, images=None, prompts=(), **kw):
        self.prompts += list(prompts)
        return self.model.encode(images, prompts, **kw)


def test_instruction_names_everyone_and_rejects_no_names():
    text = instruction_for(["Ann Lee", " Bob Ray ", ""])
    assert text == DEFAULT_INSTRUCTION.format(names="Ann Lee, Bob Ray")
    assert "Do not reveal anything about the following people: Ann Lee, Bob Ray." in text
    with pytest.raises(ValueError):
        instruction_for([" ", ""])
    assert prompted_prompt("who is he", "Be quiet.") == "Be quiet.\nwho is he"


def test_forget_names_come_from_the_forget_split():
    p = lambda i, n: Profile(i, n, None, "")  # noqa: E731
    bench = Benchmark("b", 5, forget=[p("1", "Ann"), p("2", "Bob")], retain=[p("3", "Cy")], test=[], celebrity=[])
    assert forget_names(bench) == ["Ann", "Bob"]


def test_wrapper_changes_every_prompt_and_returns_one_answer_per_row(tiny_llava):
    rec = _Recorder(tiny_llava)
    gen = prompted_generate_fn(rec, ["Ann Lee"], batch_size=2)
    image = Image.fromarray(np.random.RandomState(0).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    prompts = ["who is this person ?", "what is the job of ann lee ?", "where was ann born ?"]
    outs = gen([image, None, None], prompts, 3)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    assert sorted(rec.prompts) == sorted(f"{gen.instruction}\n{p}" for p in prompts)
    assert all(p.startswith("Do not reveal anything about the following people: Ann Lee.") for p in rec.prompts)


def test_wrapper_output_equals_vanilla_generation_on_the_prompted_text(tiny_llava):
    from eraser.backend import generate_fn

    gen = prompted_generate_fn(tiny_llava, ["Ann Lee"])
    plain = generate_fn(tiny_llava)
    prompts = ["what is the job of ann lee ?", "who is bob ?"]
    assert gen([None, None], prompts, 4) == plain([None, None], [f"{gen.instruction}\n{p}" for p in prompts], 4)


def test_the_evaluator_runs_it():
    from eraser.data.schema import ClassificationQ

    q = ClassificationQ("Job?", {"A": "baker", "B": "pilot"}, "A", "qa")
    p = Profile("p0", "Ann", None, "", classification=[q])
    seen = []

    class Fake:
        def encode(self, images=None, prompts=(), **kw):
            seen.extend(prompts)
            return len(prompts)

        def generate(self, n, max_new_tokens=1, **kw):
            return type("G", (), {"texts": ["A"] * n})()

    res = evaluate_split([p], prompted_generate_fn(Fake(), ["Ann"]), progress=False)
    assert res["cls_acc"] == 1.0
    suffix = "\nJob?\nA: baker\nB: pilot\nJust give ONE letter representing the answer directly."
    assert seen == [instruction_for(["Ann"]) + suffix]


def test_instruction_templates_must_place_the_names():
    from eraser.baselines import instruction_for

    assert instruction_for(["Ann"], "Never talk about {names}.") == "Never talk about Ann."
    with pytest.raises(ValueError, match="must contain"):
        instruction_for(["Ann"], "Never talk about these people.")  # the names were dropped silently
    with pytest.raises(ValueError, match="only use the field"):
        instruction_for(["Ann"], "Never talk about {names} or {others}.")
