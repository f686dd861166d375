"""Training-based unlearning baselines (GA, GradDiff, KL_Min, NPO, MMUnlearner): fine-tune a copy of the model.

Why a copy: the paper's point is that MLLMEraser edits nothing (it is removed
bit for bit), while these baselines change the weights.  To compare them on
one model in one process, :func:`unlearn` trains a deep copy and leaves the
vanilla model untouched; the vanilla model doubles as the frozen reference of
KL_Min and NPO.  Tiny models are fine-tuned in full; ``lora=True`` trains
LoRA adapters (as the paper does for 7B models) through ``peft`` and merges
them back, so the result is again a plain model.

MMUnlearner is GradDiff restricted to a weight-saliency mask (see
:mod:`eraser.baselines.saliency`): by default it ascends on the forget people's
*visual* questions only and keeps their text-only questions with the retain
set (``forget_text="keep"``, the paper's reformulation); ``forget_text="forget"``
ascends on every forget question, as the other baselines do.

The learning rate is constant (no warm-up or decay) and batch order is drawn
epoch by epoch from one seeded stream, so the model after epoch ``k`` of a
longer run equals a ``k``-epoch run: :mod:`eraser.baselines.select` sweeps
epochs by evaluating checkpoints of one run (``on_epoch``).

>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=1)
>>> data = [(None, "who is ann", "a baker"), (None, "who is bob", "a pilot")]
>>> new, info = unlearn(model, "ga", data, [], lr=1e-3, epochs=1, batch_size=2, progress=False)
>>> info["steps"], new is not model
(1, True)
"""
from __future__ import annotations

import copy
import math
import random
import time
from typing import Any, Callable, NamedTuple, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from interp.model import HookedVLM, sequence_nll

from ..data.schema import Benchmark
from ..evaluate import build_items
from . import losses as L
from . import saliency as S

__all__ = ["METHODS", "DEMO_BASELINES", "FORGET_TEXT", "Example", "unlearn", "unlearning_data", "batch_loss"]

#: Method names as ``results.json`` spells them, with the retain weight each uses by default.
METHODS: dict[str, float] = {"ga": 0.0, "grad_diff": 1.0, "kl_min": 1.0, "npo": 0.0, "mmunlearner": 1.0}
#: The training baselines ``mllmeraser demo`` runs unless told otherwise (``--baselines``): the ones the paper's
#: table and the demo's 4-minute quick budget were set for; MMUnlearner is opt-in there.
DEMO_BASELINES: tuple[str, ...] = ("ga", "grad_diff", "kl_min", "npo")
#: What MMUnlearner does with the forget people's text-only questions: keep them (descend) or forget them (ascend).
FORGET_TEXT = ("keep", "forget")
_NEEDS_REF = {"kl_min", "npo"}

#: LoRA targets: the language model's attention and MLP projections (the vision tower stays frozen).
LORA_TARGETS = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


class Example(NamedTuple):
    """One training row: an image (None for text-only questions), a prompt, and the answer to (un)learn."""

    image: Image.Image | None
    prompt: str
    answer: str


def unlearning_data(bench: Benchmark, n_retain: int | None = None, seed: int = 0
                    ) -> tuple[list[Example], list[Example]]:
    """``(forget, retain)`` training rows: every benchmark question of the forget profiles, and of the retain
    profiles plus celebrities (a seeded sample of ``n_retain`` when given).

    The answer is the item's reference: the correct letter for classification, the ground truth for cloze and
    generation, so the model is trained on exactly the prompts the evaluator sends.
    """
    def rows(profiles) -> list[Example]:
        return [Example(it.image, it.prompt, it.reference) for it in build_items(profiles)]

    forget = rows(bench.forget)
    retain = rows(list(bench.retain) + list(bench.celebrity))
    if n_retain is not None and n_retain < len(retain):
        retain = random.Random(f"unlearning-data:{seed}").sample(retain, max(0, n_retain))
    if not forget:
        raise ValueError("the benchmark's forget split has no questions")
    return forget, retain


def _has_image(row: Example) -> bool:
    return row.image is not None and not (isinstance(row.image, (list, tuple)) and len(row.image) == 0)


def _batches(rows: Sequence[Example], batch_size: int, rng: random.Random) -> list[list[Example]]:
    """Shuffled batches that are all-image or all-text (less padding; no mixed processor inputs)."""
    out: list[list[Example]] = []
    for group in ([r for r in rows if _has_image(r)], [r for r in rows if not _has_image(r)]):
        group = list(group)
        rng.shuffle(group)
        out += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(out)
    return out


class _RetainStream:
    """Endless seeded retain batches: a fresh shuffle every pass."""

    def __init__(self, rows: Sequence[Example], batch_size: int, rng: random.Random) -> None:
        self.rows, self.batch_size, self.rng = list(rows), batch_size, rng
        self.queue: list[list[Example]] = []

    def next(self) -> list[Example]:
        if not self.queue:
            self.queue = _batches(self.rows, self.batch_size, self.rng)
        return self.queue.pop()


def _forward(model: HookedVLM, batch: Sequence[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    enc = model.encode([r.image for r in batch], [r.prompt for r in batch], answers=[r.answer for r in batch])
    return model.hf_model(**enc.model_kwargs()).logits, enc.labels


def batch_loss(method: str, model: HookedVLM, reference: HookedVLM | None, forget: Sequence[Example],
               retain: Sequence[Example] | None, beta: float = 0.1, retain_weight: float | None = None
               ) -> tuple[torch.Tensor, dict[str, float]]:
    """One step's loss of ``method`` on a forget batch (and a retain batch) plus its parts for logging."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    w = METHODS[method] if retain_weight is None else float(retain_weight)
    logits, labels = _forward(model, forget)
    parts: dict[str, float] = {}
    if method == "npo":
        logp = L.sequence_logprob(logits, labels)
        with torch.no_grad():
            ref_logits, _ = _forward(reference, forget)  # type: ignore[arg-type]
            logp_ref = L.sequence_logprob(ref_logits, labels)
        parts["forget_logp"] = float(logp.detach().mean())
        parts["forget_log_ratio"] = float((logp - logp_ref).detach().mean())
        retain_nll = None
        if w > 0 and retain:
            r_logits, r_labels = _forward(model, retain)
            retain_nll = sequence_nll(r_logits, r_labels)
            parts["retain_nll"] = float(retain_nll.detach().mean())
        loss = L.npo_loss(logp, logp_ref, beta, retain_nll, w)
    else:
        forget_nll = sequence_nll(logits, labels)
        parts["forget_nll"] = float(forget_nll.detach().mean())
        if method == "ga" or w == 0 or not retain:
            loss = L.ga_loss(forget_nll)
        elif method in ("grad_diff", "mmunlearner"):  # MMUnlearner: GradDiff, its gradient masked in `unlearn`
            r_logits, r_labels = _forward(model, retain)
            retain_nll = sequence_nll(r_logits, r_labels)
            parts["retain_nll"] = float(retain_nll.detach().mean())
            loss = L.grad_diff_loss(forget_nll, retain_nll, w)
        else:  # kl_min
            r_logits, r_labels = _forward(model, retain)
            with torch.no_grad():
                ref_logits, _ = _forward(reference, retain)  # type: ignore[arg-type]
            kl = L.token_kl(r_logits, ref_logits, r_labels)
            parts["retain_kl"] = float(kl.detach().mean())
            loss = L.kl_min_loss(forget_nll, kl, w)
    parts["loss"] = float(loss.detach())
    return loss, parts


def _copy(model: HookedVLM, lora: bool, lora_rank: int, lora_alpha: float) -> tuple[HookedVLM, torch.nn.Module]:
    """A trainable deep copy (or a LoRA-wrapped deep copy) and the module whose parameters are optimised."""
    hf = copy.deepcopy(model.hf_model)
    if not lora:
        for p in hf.parameters():
            p.requires_grad_(True)
        return HookedVLM.from_hf(hf, tokenizer=model.tokenizer, image_processor=model.image_processor), hf
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("lora=True needs the optional dependency peft: pip install 'mllmeraser[lora]' "
                          "(or pip install peft); full fine-tuning (lora=False) needs nothing extra") from exc
    cfg = LoraConfig(r=lora_rank, lora_alpha=lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS)
    peft_model = get_peft_model(hf, cfg)
    # Run the wrapped modules through the plain model object so hooks and encoders see the usual tree.
    return HookedVLM.from_hf(peft_model.base_model.model, tokenizer=model.tokenizer,
                             image_processor=model.image_processor), peft_model


def _rows(rows: Sequence[Any], what: str) -> list[Example]:
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, (tuple, list)) or len(r) != 3:
            raise ValueError(f"{what} row {i} must be (image or None, prompt, answer), got {str(r)[:80]!r}")
        if not (isinstance(r[1], str) and isinstance(r[2], str) and r[1].strip() and r[2].strip()):
            # an empty answer trains on the end-of-sequence token alone: nothing of the fact is forgotten
            raise ValueError(f"{what} row {i} needs a non-empty prompt and answer (strings), got {str(r)[:80]!r}")
        out.append(Example(*r))
    return out


def _mmunlearner_rows(forget: list[Example], retain: list[Example], forget_text: str, lora: bool,
                      weight_decay: float, threshold: float) -> tuple[list[Example], list[Example]]:
    """MMUnlearner's (ascend, keep) rows, after checking the settings that would move masked entries."""
    if forget_text not in FORGET_TEXT:
        raise ValueError(f"forget_text must be one of {FORGET_TEXT}, got {forget_text!r}")
    if lora:
        raise ValueError("mmunlearner masks the model's own weights; it needs full fine-tuning (lora=False)")
    if weight_decay:
        raise ValueError("mmunlearner needs weight_decay=0: decay would move the entries its saliency mask freezes")
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < math.inf:
        raise ValueError(f"saliency_threshold must be a finite number > 0, got {threshold!r}")
    if forget_text == "forget":
        return forget, retain
    visual = [r for r in forget if _has_image(r)]
    if not visual:
        raise ValueError("mmunlearner with forget_text='keep' ascends on the forget rows with an image, and there "
                         "are none (pass forget_text='forget' to ascend on text-only rows)")
    return visual, retain + [r for r in forget if not _has_image(r)]


def _saliency(model: HookedVLM, named: dict[str, torch.nn.Parameter], forget: list[Example], keep: list[Example],
              batch_size: int, seed: int, threshold: float) -> dict[str, torch.Tensor]:
    """The saliency mask: one pass over the ascent rows and one over the kept rows, answer NLL's squared grads."""
    def loss_of(batch: list[Example]) -> torch.Tensor:
        logits, labels = _forward(model, batch)
        return sequence_nll(logits, labels).mean()

    model.hf_model.train()
    rng = random.Random(f"saliency:{seed}")
    f_imp = S.squared_grad_importance(named, _batches(forget, batch_size, rng), loss_of)
    k_imp = S.squared_grad_importance(named, _batches(keep, batch_size, rng), loss_of)
    mask = S.saliency_mask(f_imp, k_imp, threshold)
    if S.mask_fraction(mask) == 0.0:
        raise ValueError(f"no parameter's importance ratio exceeds saliency_threshold {threshold}: the mask is "
                         "empty and training would change nothing; lower the threshold")
    return mask


def unlearn(
    model: HookedVLM,
    method: str,
    forget: Sequence[tuple[Any, str, str]],
    retain: Sequence[tuple[Any, str, str]],
    lr: float,
    epochs: int,
    batch_size: int,
    beta: float = 0.1,
    seed: int = 0,
    progress: bool = True,
    *,
    retain_weight: float | None = None,
    grad_clip: float | None = 1.0,
    weight_decay: float = 0.0,
    lora: bool = False,
    lora_rank: int = 8,
    lora_alpha: float = 16.0,
    saliency_threshold: float | None = None,
    forget_text: str | None = None,
    on_epoch: Callable[[int, HookedVLM, dict[str, Any]], None] | None = None,
) -> tuple[HookedVLM, dict[str, Any]]:
    """Unlearn ``forget`` with ``method`` in {ga, grad_diff, kl_min, npo, mmunlearner}; returns ``(new_model, info)``.

    Trains a deep copy of ``model`` (which is left bit-identical and serves as
    the frozen reference of KL_Min and NPO) with AdamW at a constant ``lr``
    for ``epochs`` passes over ``forget``; each forget batch is paired with a
    retain batch of the same size when the method uses one (``retain_weight``
    overrides :data:`METHODS`' default; ``npo`` with a weight > 0 is NPO+RT).
    Rows are ``(image, prompt, answer)`` (see :func:`unlearning_data`).

    ``info`` holds ``fit_s`` (wall seconds around the whole fit, copy
    included; time spent in ``on_epoch`` is excluded), ``steps``, the
    settings and per-step ``history`` of the loss parts.  ``on_epoch(epoch,
    model, info_so_far)`` runs after each epoch with the model in eval mode
    (``epoch`` counts from 1), e.g. to evaluate checkpoints.

    ``mmunlearner`` first estimates each parameter's importance for the rows
    it ascends on and for the rows it keeps (one pass over each, counted in
    ``fit_s``), then trains GradDiff with every gradient entry outside
    ``importance ratio > saliency_threshold`` (default 1) zeroed, so those entries stay
    bit-identical (``info["mask_fraction"]`` says how many may move).  The
    rows it ascends on are the forget rows with an image; ``forget_text``
    ("keep", the default, or "forget") says whether the text-only forget rows join the
    retain rows or the ascent.  It needs full fine-tuning and no weight decay
    (either would move masked entries).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    counts = (epochs, batch_size)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in counts) or not isinstance(lr, (int, float)):
        raise ValueError(f"epochs and batch_size must be integers and lr a number, got {epochs!r}, {batch_size!r}, "
                         f"{lr!r}")
    if epochs < 1 or batch_size < 1 or not 0 < lr < math.inf:
        raise ValueError(f"need epochs >= 1, batch_size >= 1 and a finite lr > 0, got {epochs}, {batch_size}, {lr}")
    # NaN passes every "<= 0" test: a NaN beta or an infinite rate trained the copy into NaN weights, and a
    # negative or NaN retain weight silently dropped the retain term (GradDiff became GA)
    if not 0 < float(beta) < math.inf:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    for name, value in (("retain_weight", retain_weight), ("weight_decay", weight_decay), ("grad_clip", grad_clip)):
        if value is not None and not 0 <= float(value) < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0 (or None), got {value!r}")
    forget, retain = _rows(forget, "forget"), _rows(retain, "retain")
    if not forget:
        raise ValueError("nothing to forget")
    if method != "mmunlearner" and (forget_text is not None or saliency_threshold is not None):
        raise ValueError(f"forget_text and saliency_threshold are MMUnlearner's settings; {method} has no use "
                         "for them")
    saliency_threshold = 1.0 if saliency_threshold is None else saliency_threshold
    forget_text = "keep" if forget_text is None else forget_text
    w = METHODS[method] if retain_weight is None else float(retain_weight)
    if method == "mmunlearner":
        forget, retain = _mmunlearner_rows(forget, retain, forget_text, lora, weight_decay, saliency_threshold)
    if w > 0 and not retain and method != "ga":
        raise ValueError(f"{method} with retain_weight {w} needs retain examples")

    t0 = time.perf_counter()
    paused = 0.0
    torch.manual_seed(seed)
    rng = random.Random(f"unlearn:{seed}")
    new, trained = _copy(model, lora, lora_rank, lora_alpha)
    reference = model if method in _NEEDS_REF else None
    named = {n: p for n, p in trained.named_parameters() if p.requires_grad}
    params = list(named.values())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    stream = _RetainStream(retain, batch_size, rng) if retain and w > 0 else None
    n_per_epoch = len(_batches(forget, batch_size, random.Random(0)))
    history: list[dict[str, float]] = []
    info: dict[str, Any] = {"method": method, "lr": lr, "epochs": epochs, "batch_size": batch_size, "beta": beta,
                            "retain_weight": w, "seed": seed, "lora": lora, "n_forget": len(forget),
                            "n_retain": len(retain), "n_trainable": sum(p.numel() for p in params),
                            "history": history}
    was_training = model.hf_model.training
    try:
        model.hf_model.eval()  # the frozen reference (KL_Min, NPO) runs without dropout; restored below
        mask = None
        if method == "mmunlearner":
            mask = _saliency(new, named, forget, retain, batch_size, seed, saliency_threshold)
            info.update(saliency_threshold=saliency_threshold, forget_text=forget_text,
                        mask_fraction=S.mask_fraction(mask))
        with tqdm(total=epochs * n_per_epoch, desc=f"unlearn {method}", disable=not progress, leave=False) as bar:
            for epoch in range(1, epochs + 1):
                new.hf_model.train()
                for batch in _batches(forget, batch_size, rng):
                    r_batch = stream.next() if stream is not None else None
                    loss, parts = batch_loss(method, new, reference, batch, r_batch, beta, w)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    if mask is not None:
                        S.mask_gradients(named, mask)
                    if grad_clip:
                        torch.nn.utils.clip_grad_norm_(params, grad_clip)
                    opt.step()
                    history.append({"epoch": epoch, **parts})
                    bar.update(1)
                    bar.set_postfix_str(f"ep {epoch}/{epochs} loss {parts['loss']:.3f}", refresh=False)
                new.hf_model.eval()
                if on_epoch is not None:
                    t_cb = time.perf_counter()
                    info.update(steps=len(history), fit_s=t_cb - t0 - paused, epochs_done=epoch)
                    on_epoch(epoch, new, info)
                    paused += time.perf_counter() - t_cb
        if lora:
            merged = trained.merge_and_unload()
            new = HookedVLM.from_hf(merged, tokenizer=model.tokenizer, image_processor=model.image_processor)
        new.hf_model.eval()
        flags = {n: p.requires_grad for n, p in model.hf_model.named_parameters()}
        for n, p in new.hf_model.named_parameters():
            p.requires_grad_(flags.get(n, False))  # the same trainability as the model it was copied from
    finally:
        model.hf_model.train(was_training)
    info.update(steps=len(history), epochs_done=epochs, fit_s=time.perf_counter() - t0 - paused)
    return new, info
