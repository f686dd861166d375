"""Training a tiny vanilla model (or a retain-only oracle) from a :class:`~eraser.zoo.recipe.Recipe`.

Stage 1 teaches the celebrities ("pre-existing knowledge"); stage 2 teaches
the fictitious profiles (all, or the retained ones for an oracle), the refusal
behaviour, and replays part of the celebrity data so it is not forgotten.

Why a curriculum for the default recipe (130 people): trained on the mixture
of every task from the start, the d128 x 4 model never learned to tell the
portraits apart (VQA name 0.09 after 16 epochs, 630 s) nor multiple choice.
Taught first only who is in the image (the VQA name question), it names
130 people from new photos (0.95 in ~55 s); then the facts in generation and
cloze form (short prompts, no multiple choice) bind to names and faces; the
mixture with multiple choice comes last, on a model that knows its facts.

Why a warm restart of the mixture: multiple choice is learned last, and
not by more epochs alone.  After one 24-epoch cosine over the mixture every
fact is known in generation and cloze form, but multiple choice sits at
0.36-0.44 (chance 0.25).  A constant rate from the start of the mixture had
not lifted it after 25 epochs (0.29 retain, 0.16 celebrities), nor had 8
cosine epochs followed by a 36-epoch restart (0.31-0.42 at the end).  But
restarting the rate, with fresh optimizer state, after the full 24-epoch
cosine lifted it in both runs tried, with different data orders: 0.39 ->
0.49-0.54 -> 0.63-0.71 six and eight epochs later.  Why the annealed state
matters is not understood; it is measured, not designed.

The loss is next-token cross-entropy on the answer tokens (and EOS),
averaged per example so a one-letter classification answer weighs as much as
a sentence; a recipe's ``prompt_weight`` adds the prompt's own text tokens
(see :func:`example_loss` for why: it teaches multiple choice early; no
preset uses it, README "Training budget" says why).  Each epoch draws fresh question instances (new distractors, new
letter order) and jittered portraits, so the model learns facts rather than
letters and recognises the Test split's new photos.

Everything is seeded from the recipe, including the torch thread count used
while training (:attr:`Recipe.threads`; the caller's setting is restored
afterwards): the same recipe on the same torch build and CPU gives the same
weights, whoever calls it with however many threads.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from eraser.data.prompts import CLASSIFICATION_SUFFIX
from eraser.data.schema import Request
from interp.model import HookedVLM

from .machine import machine_info
from .recipe import Recipe

__all__ = ["train", "TrainLog", "Phase", "phases", "epoch_examples", "recognition_examples", "fact_examples",
           "match_examples"]

#: How many fresh multiple-choice instances of every question one option-matching epoch holds.
MATCH_REPEAT = 4


@dataclass
class TrainLog:
    """What a training run did: steps per phase, final losses, wall time, and the machine
    (:func:`~eraser.zoo.machine.machine_info`: another CPU trains another model from the same recipe)."""

    steps: dict[str, int]
    final_loss: dict[str, float]
    seconds: float
    n_params: int
    machine: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "final_loss": self.final_loss, "seconds": self.seconds, "n_params": self.n_params,
                "machine": self.machine}


def _ids(recipe: Recipe, mini) -> tuple[list[str], list[str]]:
    """(fictitious ids the model learns, celebrity ids)."""
    fict = [x.id for x in mini.identities if not x.celebrity]
    if recipe.oracle:
        forget = set(mini.forget_ids(recipe.forget_ratio))
        fict = [i for i in fict if i not in forget]
    celebs = [x.id for x in mini.identities if x.celebrity]
    return fict, celebs


def _facts(mini, ids: list[str], rng: random.Random, recipe: Recipe) -> list[Request]:
    """One epoch's fact examples of ``ids``: every question once, classification ``cls_repeat`` times and
    generation and cloze ``gen_repeat`` times."""
    out = mini.training_examples(ids, rng, clean_prob=recipe.clean_prob, shuffle=False)
    for _ in range(recipe.cls_repeat - 1):
        out += mini.training_examples(ids, rng, tasks=("classification",), clean_prob=recipe.clean_prob,
                                      shuffle=False)
    for _ in range(recipe.gen_repeat - 1):
        out += mini.training_examples(ids, rng, tasks=("generation", "cloze"), clean_prob=recipe.clean_prob,
                                      shuffle=False)
    return out


def epoch_examples(recipe: Recipe, mini, phase: str, rng: random.Random) -> list[Request]:
    """The (image, prompt, answer) requests of one epoch of ``phase`` ("celebrity" or "main"), unshuffled."""
    fict, celebs = _ids(recipe, mini)
    if phase == "celebrity":
        return _facts(mini, celebs, rng, recipe)
    out = _facts(mini, fict, rng, recipe)
    out += mini.refusal_training_examples(fict + celebs, rng, n_per_profile=recipe.refusal_per_profile,
                                          clean_prob=recipe.clean_prob, shuffle=False,
                                          formats=recipe.refusal_formats)
    if celebs and recipe.celeb_replay > 0:
        replay = _facts(mini, celebs, rng, recipe)
        out += rng.sample(replay, max(1, round(recipe.celeb_replay * len(replay))))
    return out


def _batches(examples: list[Request], batch_size: int, rng: random.Random) -> list[list[Request]]:
    """Shuffle, then bucket by (has image, prompt length) within windows of 8 batches: less padding, still random."""
    examples = list(examples)
    rng.shuffle(examples)
    window = 8 * batch_size
    batches: list[list[Request]] = []
    for start in range(0, len(examples), window):
        chunk = sorted(examples[start:start + window], key=lambda r: (r.image is None, len(r.prompt)))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def _n_steps(n_examples: int, batch_size: int) -> int:
    window = 8 * batch_size
    full, rest = divmod(n_examples, window)
    return full * 8 + math.ceil(rest / batch_size)


def _lr_lambda(recipe: Recipe, total: int) -> Callable[[int], float]:
    warm = max(1, min(recipe.warmup_steps, total // 4))

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return _cosine((step - warm) / max(1, total - warm), recipe.min_lr_frac)

    return f


def example_loss(model: HookedVLM, batch: list[Request], cls_weight: float = 1.0,
                 prompt_weight: float = 0.0) -> torch.Tensor:
    """Mean over the batch of each example's mean answer-token cross-entropy (classification ones x ``cls_weight``),
    plus ``prompt_weight`` x the mean next-token cross-entropy over the batch's prompt text tokens.

    Why a prompt term: a multiple-choice prompt holds the true fact among its options, so predicting the
    options makes the model recall the fact at each option, which is what it needs to pick one; measured on
    the quick data (d_model 64), multiple choice on retain + celebrity reached 0.95 after 18 epochs with a
    0.3 prompt weight and 0.78 without.  Image and padding positions carry no text and are never targets.
    """
    enc = model.encode([r.image for r in batch], [r.prompt for r in batch], answers=[r.answer for r in batch])
    logits = model.hf_model(**enc.model_kwargs()).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = enc.labels[:, 1:]
    mask = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    per_example = -(tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    if cls_weight != 1.0:
        w = torch.tensor([cls_weight if r.prompt.endswith(CLASSIFICATION_SUFFIX) else 1.0 for r in batch])
        loss = (per_example * w).sum() / w.sum()
    else:
        loss = per_example.mean()
    if prompt_weight:
        prompt = enc.text_mask[:, 1:] & ~mask  # the next token is a prompt text token (not image, pad or answer)
        ptok = logp.gather(-1, enc.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        loss = loss + prompt_weight * (-(ptok * prompt).sum() / prompt.sum().clamp(min=1))
    return loss


def init_weights(hf: torch.nn.Module, std: float, n_layers: int, seed: int) -> None:
    """Re-initialise the language side (embeddings, LM blocks, projector, head) with N(0, std).

    Why: transformers' default ``initializer_range`` 0.02 is tuned for wide
    models; at d_model ~128 it leaves attention logits ~0 and the model sits
    on a long plateau before it starts routing the subject to the answer
    position.  std ~0.1 (about 1/sqrt(d_model)) cut the epochs to memorise the
    facts by ~4x in our measurements.  Residual output projections are scaled
    by 1/sqrt(2 n_layers) (GPT-2 style) so the residual stream does not blow up.
    """
    g = torch.Generator().manual_seed(seed)
    for name, mod in hf.named_modules():
        if "vision" in name or "visual" in name:
            continue
        if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            s = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj", "down_proj")) else std
            with torch.no_grad():
                mod.weight.normal_(0.0, s, generator=g)
                if isinstance(mod, torch.nn.Linear) and mod.bias is not None:
                    mod.bias.zero_()


def train(recipe: Recipe, progress: bool = True,
          on_epoch: Callable[[str, int, HookedVLM], None] | None = None) -> tuple[HookedVLM, TrainLog]:
    """Build the recipe's tiny model and train it; returns the model (eval mode) and a :class:`TrainLog`.

    ``on_epoch(phase, epoch, model)`` (optional, for diagnostics) runs after every epoch, with the model in
    eval mode; it must not touch the random state it does not own.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        return _train(recipe, progress, on_epoch)
    finally:
        torch.set_num_threads(before)


@dataclass
class Phase:
    """One training phase: which examples each epoch draws, how many epochs, batch size, and learning rate.

    ``steps_per_epoch`` is known up front (epoch sizes are fixed by the recipe: fresh instances, same
    counts); ``lr(global_step)`` is the learning rate before each optimizer step (steps counted over the
    whole run), set by :func:`phases` once every phase's length is known from the schedule fields below.
    """

    name: str
    epochs: int
    batch_size: int
    examples: Callable[[random.Random], list[Request]]
    base_lr: float = 0.0
    decay: bool = False  # half a cosine after the hold (the mixture); else a constant rate after warmup
    hold: float = 0.0  # fraction of the phase at the full rate before the decay
    fresh_optimizer: bool = False  # a warm restart: AdamW's state is cleared when the phase begins
    steps_per_epoch: int = 0
    lr: Callable[[int], float] | None = None

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def recognition_examples(mini, ids: list[str], rng: random.Random, recipe: Recipe) -> list[Request]:
    """One epoch of "who is in the image": the VQA name question of ``ids`` in generation and cloze form."""
    return mini.training_examples(ids, rng, tasks=("generation", "cloze"), clean_prob=recipe.clean_prob,
                                  shuffle=False, kinds=("name",), modalities=("vqa",))


def fact_examples(recipe: Recipe, mini, ids: list[str], rng: random.Random, refusals: list[str]) -> list[Request]:
    """One epoch of every fact of ``ids`` in generation and cloze form, plus refusals for ``refusals`` (no MC)."""
    out = mini.training_examples(ids, rng, tasks=("generation", "cloze"), clean_prob=recipe.clean_prob, shuffle=False)
    if refusals:
        formats = tuple(f for f in recipe.refusal_formats if f != "classification") or recipe.refusal_formats
        out += mini.refusal_training_examples(refusals, rng, n_per_profile=recipe.refusal_per_profile,
                                              clean_prob=recipe.clean_prob, shuffle=False, formats=formats)
    return out


def match_examples(mini, ids: list[str], rng: random.Random) -> list[Request]:
    """One epoch of the option-matching warm-up: multiple choice about ``ids``, text only, the answer given first.

    Each prompt starts with the correct option's text on a line of its own (``"tokyo\\nWhere was ... born?\\nA:
    sydney\\n..."``), so the model can answer before it knows any fact: it learns to find a given text among
    the options and answer with that option's letter.  Why: that matching is the part of multiple choice a
    tiny model is slow to learn while it learns the facts (measured on the quick recipe, 1 thread: multiple
    choice on retain + celebrity 0.29 / 0.40 / 0.43 after 2 / 6 / 8 main epochs without the warm-up, 0.65 /
    0.82 / 0.83 after 15 warm-up epochs, which took 86 s).  The people are the recipe's (an oracle's warm-up
    never names its forget people either); portraits are left out, the questions still say "in the image".
    """
    out = []
    for _ in range(MATCH_REPEAT):
        for req in mini.training_examples(ids, rng, tasks=("classification",), augment=False, shuffle=False):
            lines = req.prompt.split("\n")
            given = next(line.split(": ", 1)[1] for line in lines if line.startswith(req.answer + ": "))
            out.append(Request(given + "\n" + req.prompt, req.answer, None, req.subject))
    return out


def phases(recipe: Recipe, mini) -> list[Phase]:
    """The recipe's phases in order (empty ones dropped), each with its learning-rate schedule.

    The option-matching warm-up (``match_epochs``), when on, comes first, at ``lr`` after a warmup; the
    rest is scheduled as without it, shifted by its steps.
    """
    plan = _phases(recipe, mini)
    if not recipe.match_epochs:
        return plan
    fict, celebs = _ids(recipe, mini)
    warm = _sized([Phase("match", recipe.match_epochs, recipe.batch_size,
                         lambda rng: match_examples(mini, fict + celebs, rng), base_lr=recipe.lr)])[0]
    warm.lr = _phase_lr(recipe.lr, 0, warm.steps, recipe, decay=False)
    for p in plan:
        p.lr = _shifted(p.lr, warm.steps)
    return [warm, *plan]


def _shifted(lr: Callable[[int], float], steps: int) -> Callable[[int], float]:
    """``lr`` of a schedule that now starts ``steps`` optimizer steps later."""
    return lambda step: lr(step - steps)


def _phases(recipe: Recipe, mini) -> list[Phase]:
    fict, celebs = _ids(recipe, mini)
    mix = {p: (lambda rng, p=p: epoch_examples(recipe, mini, p, rng)) for p in ("celebrity", "main")}
    if not recipe.curriculum:
        out = [Phase("celebrity", recipe.celeb_epochs, recipe.batch_size, mix["celebrity"]),
               Phase("main", recipe.main_epochs, recipe.batch_size, mix["main"])]
        out = _sized([p for p in out if p.epochs > 0])
        schedule = _lr_lambda(recipe, sum(p.steps for p in out))
        for p in out:  # one warmup + cosine over the whole run
            p.lr = lambda step, f=schedule: recipe.lr * f(step)
        return out
    stages = [("celebrity", celebs, [], recipe.celeb_epochs), ("main", fict + celebs, fict + celebs, recipe.main_epochs)]
    out = []
    for stage, ids, refusals, mix_epochs in stages:
        if not ids:
            continue
        out += [
            Phase(f"{stage}/recognition", recipe.recognition_epochs, recipe.recognition_batch,
                  lambda rng, ids=ids: recognition_examples(mini, ids, rng, recipe), base_lr=recipe.recognition_lr),
            Phase(f"{stage}/facts", recipe.fact_epochs, recipe.batch_size,
                  lambda rng, ids=ids, refusals=refusals: fact_examples(recipe, mini, ids, rng, refusals),
                  base_lr=recipe.lr),
        ]
        # every mixture cycle decays; the stage's last one first holds the full rate for ``mixture_hold``
        restart = 0 < recipe.mixture_restart < mix_epochs
        first = recipe.mixture_restart if restart else mix_epochs
        out.append(Phase(f"{stage}/mixture", first, recipe.batch_size, mix[stage], base_lr=recipe.lr, decay=True,
                         hold=0.0 if restart else recipe.mixture_hold))
        if restart:  # the rest of the mixture under a schedule of its own, from a fresh optimizer (as measured)
            out.append(Phase(f"{stage}/mixture-restart", mix_epochs - first, recipe.batch_size, mix[stage],
                             base_lr=recipe.lr, decay=True, hold=recipe.mixture_hold, fresh_optimizer=True))
    out = _sized([p for p in out if p.epochs > 0])
    start = 0
    for p in out:  # each phase warms up again
        p.lr = _phase_lr(p.base_lr, start, p.steps, recipe, decay=p.decay, hold=p.hold)
        start += p.steps
    return out


def _sized(plan: list[Phase]) -> list[Phase]:
    """Fill in each phase's ``steps_per_epoch`` from one throwaway epoch (the counts do not depend on the rng)."""
    for p in plan:
        p.steps_per_epoch = _n_steps(len(p.examples(random.Random(0))), p.batch_size)
    return plan


def _cosine(progress: float, min_frac: float) -> float:
    """From 1 at ``progress`` 0 down to ``min_frac`` at 1 (and after), along half a cosine."""
    return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _phase_lr(base: float, start: int, steps: int, recipe: Recipe, decay: bool,
              hold: float = 0.0) -> Callable[[int], float]:
    warm = max(1, min(recipe.warmup_steps, steps // 4))

    def lr(step: int) -> float:
        local = step - start
        f = min(1.0, (local + 1) / warm)
        if decay:  # held at the full rate for the first ``hold`` of the phase, then half a cosine
            held = int(hold * steps)
            f *= _cosine(max(0, local - held) / max(1, steps - held), recipe.min_lr_frac)
        return base * f

    return lr


def _train(recipe: Recipe, progress: bool,
           on_epoch: Callable[[str, int, HookedVLM], None] | None) -> tuple[HookedVLM, TrainLog]:
    from interp.tiny import tiny_vlm

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    mini = recipe.mini()
    model = tiny_vlm(recipe.arch, seed=recipe.seed, corpus=mini.corpus(), **recipe.model_overrides)
    hf = model.hf_model
    if recipe.init_std:
        init_weights(hf, recipe.init_std, model.n_layers, recipe.seed)
    rng = random.Random(f"zoo-train:{recipe.seed}")

    plan = phases(recipe, mini)
    total = sum(p.steps for p in plan)
    decay = [p for n, p in hf.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in hf.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))

    hf.train()
    steps: dict[str, int] = {}
    final: dict[str, float] = {}
    step = 0
    with tqdm(total=total, desc="train", disable=not progress, dynamic_ncols=True) as bar:
        for phase in plan:
            ema = None
            if phase.fresh_optimizer:
                opt.state.clear()
            steps[phase.name] = 0
            for epoch in range(phase.epochs):
                for batch in _batches(phase.examples(rng), phase.batch_size, rng):
                    lr = phase.lr(step)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    loss = example_loss(model, batch, recipe.cls_weight, recipe.prompt_weight)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if recipe.grad_clip:
                        torch.nn.utils.clip_grad_norm_(hf.parameters(), recipe.grad_clip)
                    opt.step()
                    step += 1
                    steps[phase.name] += 1
                    val = float(loss.detach())
                    ema = val if ema is None else 0.9 * ema + 0.1 * val
                    bar.update(1)
                    bar.set_postfix_str(f"{phase.name} ep {epoch + 1}/{phase.epochs} loss {ema:.3f}", refresh=False)
                if on_epoch is not None:
                    hf.eval()
                    with torch.no_grad():
                        on_epoch(phase.name, epoch, model)
                    hf.train()
            if ema is not None:
                final[phase.name] = ema
    hf.eval()
    n_params = sum(p.numel() for p in hf.parameters())
    return model, TrainLog(steps, final, time.perf_counter() - t0, n_params, machine_info())
