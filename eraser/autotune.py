"""Automatic choice of the steering settings: maximise forgetting subject to retain utility.

Reviewers asked how lambda should be set without hand-tuning.  Our answer is
a constrained selection on a validation split: among candidate strengths,
take the one that makes the model refuse the most forget questions while
retain/celebrity classification accuracy stays within ``tolerance`` of the
vanilla model's and retain answers neither turn into refusals nor gibberish.

The validation split holds freshly drawn questions (new distractors and
letter orders) about the forget identities and about a seeded sample of
retain identities and celebrities, never the evaluation prompts themselves,
when the benchmark's generator is available (MiniMLLMU).  With the
generator it also holds an ``answerable`` split: ordinary requests about the
same retain sample in the forbidden requests' own template ("Tell me the
<fact> of <name>"), which must stay answered (:data:`ANSWERABLE_TOLERANCE`).
For a benchmark without one (real MLLMU-Bench) it falls back to a seeded
subset of the evaluation questions and says so in ``Selection.validation``.

Gamma and the null-space rule are chosen first, by :func:`choose_gate`: the
one that best separates forget from retain gate values on the same
validation split, refitted in closed form from the fit's statistics.
"""
from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from .backend import generate_fn
from .data.prompts import CLASSIFICATION_SUFFIX, REFUSAL
from .data.schema import Benchmark
from .evaluate import build_items
from .metrics import gibberish_rate, is_refusal, parse_choice, rouge_l

#: Candidate strengths (negative: towards refusal).  Log-spaced so both gentle and strong steering are tried.
DEFAULT_GRID = (-0.05, -0.1, -0.15, -0.2, -0.3, -0.4, -0.5, -0.75, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0, -8.0)


@dataclass(frozen=True)
class ValItem:
    image: Any
    prompt: str
    reference: str
    task: str  # "classification" | "generation"
    subject: str | None = None  # the profile asked about (per-concept gates calibrate on it)


def _from_requests(reqs) -> list[ValItem]:
    out = []
    for r in reqs:
        task = "classification" if r.prompt.endswith(CLASSIFICATION_SUFFIX) else "generation"
        out.append(ValItem(r.image, r.prompt, r.answer, task, getattr(r, "subject", None)))
    return out


def validation_split(bench: Benchmark, source: Any = None, n_retain_profiles: int = 12,
                     n_celebrities: int = 6, seed: int = 0, n_answerable: int = 2
                     ) -> tuple[dict[str, list[ValItem]], str]:
    """``({"forget": [...], "retain": [...], "answerable": [...]}, kind)``.

    ``forget`` and ``retain`` hold classification and generation questions.  ``answerable`` (only when
    ``source`` can draw refusal requests, and ``n_answerable`` > 0) holds ``n_answerable`` ordinary
    requests per retain-sample person and modality in the template the forbidden requests share.  Why a
    split of its own: the erasure direction is built from refusal pairs, so these requests lie closest to
    it of anything a retain person is asked; the retain questions do not contain the template, and pooled
    into them the requests would be diluted below the refusal tolerance (measured: a stacked gate whose
    every bar check passed refused 20 % of the benchmark's answerable requests, quick-scale model, forget
    10 %).  They are drawn after the other splits from the same ``rng``, so those are unchanged by them.
    """
    rng = random.Random(seed)
    retain = rng.sample(bench.retain, min(n_retain_profiles, len(bench.retain)))
    retain += rng.sample(bench.celebrity, min(n_celebrities, len(bench.celebrity)))
    tasks = ("classification", "generation")
    if source is not None and hasattr(source, "training_examples"):
        split = {
            "forget": _from_requests(source.training_examples(bench.forget, rng, tasks=tasks, augment=False)),
            "retain": _from_requests(source.training_examples(retain, rng, tasks=tasks, augment=False)),
        }
        if n_answerable > 0 and retain and hasattr(source, "refusal_training_examples"):
            reqs = source.refusal_training_examples(retain, rng, n_per_profile=n_answerable, augment=False,
                                                    formats=("generation",))
            split["answerable"] = _from_requests(r for r in reqs if r.answer != REFUSAL)
        return split, "fresh-questions"
    split = {k: [ValItem(i.image, i.prompt, i.reference, i.task, i.profile_id) for i in build_items(v, tasks=tasks)]
             for k, v in (("forget", bench.forget), ("retain", retain))}
    return split, "eval-subset"


def gate_retain_items(val: dict[str, list[ValItem]]) -> list[ValItem]:
    """The validation items a gate must stay closed on: the retain questions and the answerable requests."""
    return list(val["retain"]) + list(val.get("answerable", ()))


def measure(generate: Callable, items: Sequence[ValItem], max_new_tokens: int = 10) -> dict[str, float]:
    """Classification accuracy, refusal rate, gibberish rate and generation ROUGE-L (F1, mean over the split's
    generation items; 0 without any) of one split under ``generate``.  A split without classification items
    (the answerable requests) has ``cls_acc`` NaN (null in JSON), not 0: an absent metric is not a failed one."""
    if not items:
        raise ValueError("empty validation split")
    # One generate call per task: a batch stops at its longest answer, so one-letter classification answers
    # must not wait for generation answers (profiling the demo: validation generation is its slowest path).
    outs: list[str] = [""] * len(items)
    for task in dict.fromkeys(i.task for i in items):
        idx = [k for k, i in enumerate(items) if i.task == task]
        for k, o in zip(idx, generate([items[k].image for k in idx], [items[k].prompt for k in idx],
                                      max_new_tokens)):
            outs[k] = o
    cls = [(o, i) for o, i in zip(outs, items) if i.task == "classification"]
    gen = [o for o, i in zip(outs, items) if i.task == "generation"]
    refs = [i.reference for i in items if i.task == "generation"]
    return {
        "cls_acc": sum(parse_choice(o) == i.reference.strip().upper() for o, i in cls) / len(cls) if cls else math.nan,
        "refusal_rate": sum(map(is_refusal, outs)) / len(outs),
        "gibberish_rate": gibberish_rate(gen) if gen else 0.0,
        "gen_rougeL": sum(map(rouge_l, gen, refs)) / len(gen) if gen else 0.0,
    }


@dataclass
class Selection:
    """The chosen strength, every candidate's validation numbers, and the rule that chose it."""

    strength: float | None
    vanilla: dict[str, dict[str, float]]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = 0.02
    validation: str = ""
    reason: str = ""
    gate: dict[str, Any] | None = None  # the GateChoice (gamma, null space) made before the strength, if any
    answer_steps: dict[str, Any] | None = None  # the choice made after it (choose_answer_steps), if any

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: How much the answerable requests' refusal rate may rise over the vanilla model's: the evaluation's bar
#: on over-refusal (``answerable_refusal_rate`` <= 0.05 under steering); with 72 requests, 3 more refusals.
ANSWERABLE_TOLERANCE = 0.05


def feasible(row: dict[str, Any], vanilla: dict[str, dict[str, float]], tolerance: float,
             answerable_tolerance: float = ANSWERABLE_TOLERANCE) -> bool:
    """Retain accuracy, refusal and gibberish within ``tolerance`` of vanilla, and, when the split has
    answerable requests, their refusal rate within ``answerable_tolerance`` of vanilla's."""
    r, v = row["retain"], vanilla["retain"]
    ok = (r["cls_acc"] >= v["cls_acc"] - tolerance and r["refusal_rate"] <= v["refusal_rate"] + tolerance
          and r["gibberish_rate"] <= max(0.02, v["gibberish_rate"]))
    if "answerable" in row and "answerable" in vanilla:
        ok = ok and row["answerable"]["refusal_rate"] <= vanilla["answerable"]["refusal_rate"] + answerable_tolerance
    return ok


def choose_strength(model: Any, eraser: Any, val: dict[str, list[ValItem]], grid: Sequence[float] = DEFAULT_GRID,
                    tolerance: float = 0.02, batch_size: int = 64, validation: str = "", progress: bool = True,
                    gated: bool = True, vanilla: dict[str, dict[str, float]] | None = None) -> Selection:
    """Evaluate every strength on the validation split; pick the most forgetting one that keeps retain utility.

    Forgetting is the forget refusal rate (ties: lower forget accuracy, then the gentler strength).
    ``vanilla`` (the unsteered model's :func:`measure` of each split of ``val``) is measured when not given;
    pass it to share one measurement across variants (:meth:`eraser.pipeline.Setup.vanilla_validation`).
    """
    gen = generate_fn(model, batch_size=batch_size)

    def at(lam: float) -> dict[str, dict[str, float]]:
        with eraser.attached(model, strength=lam, gated=gated):
            return {k: measure(gen, v) for k, v in val.items()}

    if vanilla is None:
        vanilla = {k: measure(gen, v) for k, v in val.items()}
    elif set(vanilla) != set(val):
        raise ValueError(f"vanilla measures splits {sorted(vanilla)}, the validation split has {sorted(val)}")
    return select_strength(at, vanilla, grid, tolerance, validation, progress)


def select_strength(measure_at: Callable[[float], dict[str, dict[str, float]]],
                    vanilla: dict[str, dict[str, float]], grid: Sequence[float] = DEFAULT_GRID,
                    tolerance: float = 0.02, validation: str = "", progress: bool = True) -> Selection:
    """The rule of :func:`choose_strength` for any steering: ``measure_at(lam)`` gives each split's
    :func:`measure` under strength ``lam`` (e.g. a steering that is not an :class:`MLLMEraser` hook)."""
    rows = [{"strength": lam, **measure_at(lam)}
            for lam in tqdm(sorted(grid, key=abs), desc="strength", disable=not progress, leave=False)]
    for r in rows:
        r["feasible"] = feasible(r, vanilla, tolerance)
    ok = [r for r in rows if r["feasible"]]
    if not ok:
        return Selection(None, vanilla, rows, tolerance, validation,
                         "no strength kept retain accuracy within tolerance; steering disabled")
    best = max(ok, key=lambda r: (r["forget"]["refusal_rate"], -r["forget"]["cls_acc"], -abs(r["strength"])))
    return Selection(best["strength"], vanilla, rows, tolerance, validation,
                     f"max forget refusal subject to retain cls_acc >= vanilla - {tolerance}"
                     + (f" and answerable refusal <= vanilla + {ANSWERABLE_TOLERANCE}" if "answerable" in vanilla
                        else ""))


def choose_answer_steps(model: Any, eraser: Any, val: dict[str, list[ValItem]], selection: Selection,
                        batch_size: int = 64, progress: bool = True) -> int:
    """The fewest answer steps (``EraserConfig.answer_steps``) that forget as much as the eraser's own, at the
    strength ``selection`` chose (:func:`select_answer_steps`, on the validation split ``val``).

    Why: each answer step pushes one generated token towards the refusal, so steps beyond those the refusal
    needs to start push the refusal's next words towards its first one again.  Measured on the seed-1 default
    model (stacked gate, 3 steps): "i cannot cannot cannot help with that." on 163 of 165 forget questions, and
    "i cannot help with that." with 1 step, at identical validation numbers.
    """
    gen = generate_fn(model, batch_size=batch_size)

    def measure_at(k: int) -> dict[str, dict[str, float]]:
        with eraser.with_config(answer_steps=k).attached(model, strength=selection.strength):
            return {s: measure(gen, v) for s, v in val.items()}

    return select_answer_steps(measure_at, selection, eraser.config.answer_steps, progress)


def select_answer_steps(measure_at: Callable[[int], dict[str, dict[str, float]]], selection: Selection,
                        most: int, progress: bool = True) -> int:
    """The rule of :func:`choose_answer_steps`: steps ``k = 1 .. most-1`` are measured in order at the chosen
    strength; the first whose row is feasible (:func:`feasible`) with a forget refusal rate at least the
    ``most`` steps' row and a forget accuracy at most its is kept, else ``most``.  Every try is recorded in
    ``selection.answer_steps`` (nothing is measured, or recorded, without a chosen strength or with
    ``most`` <= 1)."""
    chosen_row = next((r for r in selection.candidates if r["strength"] == selection.strength), None)
    if most <= 1 or selection.strength is None or chosen_row is None:
        return most
    tries = []
    for k in tqdm(range(1, most), desc="answer steps", disable=not progress, leave=False):
        row = {"answer_steps": k, "strength": selection.strength, **measure_at(k)}
        f, ref = row["forget"], chosen_row["forget"]
        row["kept"] = bool(feasible(row, selection.vanilla, selection.tolerance)
                           and f["refusal_rate"] >= ref["refusal_rate"]
                           and not f["cls_acc"] > ref["cls_acc"])  # NaN (no classification items) passes
        tries.append(row)
        if row["kept"]:
            break
    k = next((r["answer_steps"] for r in tries if r["kept"]), most)
    selection.answer_steps = {"chosen": k, "most": most, "tries": tries,
                              "rule": "fewest answer steps that are feasible and forget as much as the most"}
    return k


# ----- gamma and the null space: chosen by gate separation on the validation split ---------------------------

#: Ridge strengths tried (absolute, like the release's gamma; spanning "interpolate" to "heavily shrunk").
GAMMA_GRID = (0.1, 1.0, 10.0, 100.0, 1000.0)
#: Null-space rules tried: the release's rho and two retain-energy thresholds.
NULL_SPACE_GRID: tuple[dict[str, float], ...] = ({"rho": 0.3}, {"energy": 0.01}, {"energy": 0.001})
#: For a stacked gate (``gate_stack``) rho 0.5 joins them: its features are several layers wide, so a larger
#: null space still leaves the retain energy out (it was the choice at forget 5 and 15 % on the default model).
STACKED_NULL_SPACE_GRID: tuple[dict[str, float], ...] = (*NULL_SPACE_GRID, {"rho": 0.5})


def separation(g_forget: Tensor, g_retain: Tensor) -> dict[str, float]:
    """How well gate values separate forget from retain validation queries, for one layer.

    ``leak_ratio`` = rms(g_retain) / mean(g_forget): the retain perturbation per unit of forget
    perturbation (steering is ``lambda * g * d``, so for any strength the damage to retain inputs
    scales with it).  Lower is better; inf when forget gates are not positive on average.
    ``false_fire`` = fraction of retain queries whose gate exceeds half the forget median.
    """
    mf = float(g_forget.mean())
    rms_r = float(g_retain.pow(2).mean().sqrt())
    half = 0.5 * float(g_forget.median())
    return {"forget_mean": mf, "retain_rms": rms_r, "leak_ratio": rms_r / mf if mf > 0 else float("inf"),
            "false_fire": float((g_retain > half).float().mean()) if half > 0 else 1.0}


@dataclass
class GateChoice:
    """The chosen gamma and null-space rule, every candidate's separation, and the rule that chose it."""

    gamma: float
    null_space: dict[str, float]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    reason: str = ""
    #: per steered layer, 1 / mean forget gate on the validation split: rescaling ``w`` by it restores
    #: "g ~ 1 on forget" after the ridge's shrinkage, so one strength grid fits every gamma; with
    #: per-concept gates, one factor per layer and concept (1 / mean of that concept's gate on its own questions)
    calibration: list[float] | list[list[float]] = field(default_factory=list)
    #: the saturating window (lo, hi) on calibrated gates, when one was asked for and could be chosen
    window: list[float] | None = None
    window_reason: str = ""

    def config_changes(self) -> dict[str, Any]:
        ns = self.null_space
        changes = {"gamma": self.gamma, "rho": ns.get("rho", 0.3), "energy": ns.get("energy")}
        if self.window is not None:
            changes["gate_window"] = tuple(self.window)
        return changes

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The automatic gate window: ``lo`` is this quantile of the retain validation gates (at most 1 % of
#: retain queries are steered at all), but at least ``WINDOW_MIN_LO``; ``hi = WINDOW_RAMP * lo``; forget
#: gates must clear ``lo`` at their quantile or no window is used.  Gates are calibrated (forget mean 1).
WINDOW_QUANTILES = {"retain": 0.99, "forget": 0.10}
WINDOW_RAMP = 2.0
WINDOW_MIN_LO = 0.1


def choose_window(g_forget: Float[Tensor, "..."], g_retain: Float[Tensor, "..."],
                  retain_q: float = WINDOW_QUANTILES["retain"], forget_q: float = WINDOW_QUANTILES["forget"],
                  ramp: float = WINDOW_RAMP, min_lo: float = WINDOW_MIN_LO) -> tuple[tuple[float, float] | None, str]:
    """``((lo, hi), reason)`` from calibrated validation gate values (all layers pooled), or ``(None, reason)``.

    ``lo`` is the retain gates' ``retain_q`` quantile: below it nothing is steered.  It is at least
    ``min_lo`` (a tenth of the mean forget gate): when the null space holds the validation retain
    queries almost exactly, their gates are ~0 and a window at ~0 would steer any unseen input with a
    slightly positive gate at full strength.  ``hi = ramp * lo``: the few retain inputs just above ``lo``
    get a fraction of the strength, not all of it.  Why not ``hi`` = a low forget quantile: on the quick
    model that ramp (0.20 to 0.29) was so steep that the retain constraint held the strength at -0.75
    and forget refusal at 0.55; with ``hi = 2 lo`` the same constraint allowed -1.5 and refusal 0.91,
    retain accuracy unchanged (measured, seed 0, forget 5 %, gamma chosen by leak ratio).  When the
    forget gates' ``forget_q`` quantile does not clear ``lo`` (the gate cannot separate the sets that
    well), no window is chosen and the linear gate is kept: saturating an overlapping gate would steer
    retain inputs at full strength.
    """
    if ramp <= 1:
        raise ValueError(f"ramp must be > 1, got {ramp}")
    q, lo, f = _tails(g_forget, g_retain, retain_q, forget_q, min_lo)
    rule = (f"lo = max(retain q{retain_q:g} = {q:.3f}, {min_lo:g}) = {lo:.3f}, hi = {ramp:g} lo; "
            f"forget q{forget_q:g} = {f:.3f}")
    if not f > lo:
        return None, f"no window ({rule}): the sets overlap, the linear gate is kept"
    return (lo, ramp * lo), rule


def _tails(g_forget: Tensor, g_retain: Tensor, retain_q: float, forget_q: float, min_lo: float
           ) -> tuple[float, float, float]:
    """``(retain quantile, lo = max(it, min_lo), forget quantile)`` over all values pooled."""
    g_forget, g_retain = g_forget.flatten().double(), g_retain.flatten().double()
    if g_forget.numel() == 0 or g_retain.numel() == 0:
        raise ValueError("choose_window needs forget and retain gate values")
    if min_lo <= 0:
        raise ValueError(f"min_lo must be > 0, got {min_lo}")
    q = float(torch.quantile(g_retain, retain_q))
    return q, max(q, min_lo), float(torch.quantile(g_forget, forget_q))


def _concept_index(stats: Any, config: Any, items: Sequence[ValItem]) -> Tensor:
    """Each validation forget item's concept index (all 0 for the rank-one gate)."""
    if not getattr(config, "concept_gates", False):
        return torch.zeros(len(items), dtype=torch.long)
    names = list(stats.concepts)
    missing = sorted({str(i.subject) for i in items if i.subject not in names})
    if missing:
        raise ValueError(f"per-concept gates: validation forget items about {missing} are not among the fitted "
                         f"concepts {names} (every item needs the subject it is about)")
    return torch.tensor([names.index(i.subject) for i in items])


def choose_gate(model: Any, stats: Any, val: dict[str, list[ValItem]], config: Any,
                gammas: Sequence[float] = GAMMA_GRID, null_spaces: Sequence[dict[str, float]] | None = None,
                batch_size: int = 64, window: bool = False) -> GateChoice:
    """Pick gamma and rho/energy that minimise the mean per-layer ``leak_ratio`` on the validation split.

    Why separation and not end-to-end generation: every candidate is a closed-form refit from
    ``stats`` (milliseconds), and its gate values on the validation activations (one model pass for all
    candidates) predict the retain damage per unit of forgetting directly; the strength is then chosen
    end to end by :func:`choose_strength`.  Ties go to the release's defaults' neighbourhood (smaller gamma).
    With ``window``, the candidate is chosen by :func:`tail_margin` instead (a window needs separated
    tails, not a small rms), and the window itself on the calibrated gate values of that candidate
    (:func:`choose_window`; same activations, no further model pass).  With ``config.concept_gates``
    each concept's gate is calibrated on the validation questions about that concept
    (:func:`concept_calibration`) and every score reads their maximum (:func:`combined_gates`).
    ``null_spaces`` None tries :data:`NULL_SPACE_GRID`, or :data:`STACKED_NULL_SPACE_GRID` for a stacked gate.
    Retain gate values are read on :func:`gate_retain_items` (the answerable requests too, when the split has
    them): the window's ``lo`` must sit above the requests a gate is most tempted to fire on.
    """
    from interp.collect import iter_query_activations

    from .features import gate_rows, read_names, row_features

    if null_spaces is None:
        null_spaces = STACKED_NULL_SPACE_GRID if getattr(config, "gate_stack", None) else NULL_SPACE_GRID

    gate_sites = gate_rows(config, stats.layers)
    names = read_names(gate_sites)
    acts: dict[str, Tensor] = {}
    for split, items in (("forget", val["forget"]), ("retain", gate_retain_items(val))):
        if not items:
            raise ValueError(f"empty validation {split} split")
        feats = [row_features(b, gate_sites) for b in iter_query_activations(
            model, [i.image for i in items], [i.prompt for i in items], names, batch_size, read=config.gate_read)]
        acts[split] = torch.stack([torch.cat([f[r] for f in feats]).double()
                                   for r in range(len(gate_sites))])  # [gate rows, n, F]
    rows = score_gate_configs(stats, acts["forget"], acts["retain"], config, gammas, null_spaces,
                              concept=_concept_index(stats, config, val["forget"]))
    if window:
        best = max(rows, key=lambda r: (r["tail_margin"], -r["gamma"]))
        reason = "max tail margin forget q0.1 / retain q0.99 of the calibrated gates on the validation split"
    else:
        best = min(rows, key=lambda r: (r["score"], r["gamma"]))
        reason = "min mean per-layer rms(g_retain)/mean(g_forget) on the validation split"
    choice = GateChoice(best["gamma"], best["null_space"], rows, reason, best["calibration"])
    if window:  # every candidate's window is already in its row (score_gate_configs): no refit
        choice.window, choice.window_reason = best["window"], best["window_reason"]
    return choice


def score_gate_configs(stats: Any, acts_forget: Float[Tensor, "n_layers n_f d"],
                       acts_retain: Float[Tensor, "n_layers n_r d"], config: Any,
                       gammas: Sequence[float] = GAMMA_GRID,
                       null_spaces: Sequence[dict[str, float]] = NULL_SPACE_GRID,
                       concept: Tensor | None = None) -> list[dict[str, Any]]:
    """Every (null-space rule, gamma) candidate refitted from ``stats`` and scored on validation activations.

    Scores read calibrated gates (:func:`concept_calibration`, then :func:`combined_gates`); each row
    keeps its ``calibration`` (per layer; per layer and concept with ``config.concept_gates``).
    ``concept`` is each forget activation's concept index (default: all 0, the rank-one gate).
    """
    from .stats import gates_from_stats, projectors_from_stats

    if concept is None:
        concept = torch.zeros(acts_forget.shape[1], dtype=torch.long)
    per_concept = getattr(config, "concept_gates", False)

    rows: list[dict[str, Any]] = []
    spaces = list(null_spaces) if config.use_null_space else [{"rho": 1.0}]
    for ns in spaces:
        projectors = projectors_from_stats(stats, ns.get("rho"), ns.get("energy"), config.use_null_space)
        for gamma in gammas:
            cand = replace(config, gamma=gamma, rho=ns.get("rho", config.rho), energy=ns.get("energy"))
            w, infos = gates_from_stats(stats, cand, projectors)
            W = w.double() if w.ndim == 3 else w.double()[:, None]  # [L, C, d]
            raw_f = torch.einsum("lnd,lcd->lnc", acts_forget.double(), W)
            factors, ok = concept_calibration(raw_f, concept)
            g_f = combined_gates(raw_f, factors)
            g_r = combined_gates(torch.einsum("lnd,lcd->lnc", acts_retain.double(), W), factors)
            per_layer = [separation(g_f[i], g_r[i]) for i in range(w.shape[0])]
            score = sum(p["leak_ratio"] for p in per_layer) / len(per_layer)
            win, why = choose_window(g_f, g_r) if ok else (None, "no window: forget gates are not positive on average")
            rows.append({"gamma": gamma, "null_space": dict(ns), "score": score, "layers": per_layer,
                         "calibration": factors.tolist() if per_concept else factors[:, 0].tolist(),
                         "tail_margin": calibrated_margin(g_f, g_r) if ok else 0.0,
                         "window": list(win) if win else None,
                         "window_reason": why, "ranks": [i["rank"] for i in infos],
                         "leaks": [i["leak"] for i in infos]})
    return rows


def tail_margin(g_forget: Float[Tensor, "n_layers n_f"], g_retain: Float[Tensor, "n_layers n_r"]) -> float:
    """What a gate window needs: the forget gates' low tail over the retain gates' high tail, calibrated.

    Each layer's gates are divided by its mean forget gate (the calibration steering applies), then
    pooled: ``quantile(forget, 0.10) / max(quantile(retain, 0.99), WINDOW_MIN_LO)`` with the
    quantiles of :func:`choose_window`.  Above 1, a window exists that steers >= 90 % of the forget
    queries and <= 1 % of the retain ones.  Why not the leak ratio: it scores the bulk (rms), and a
    window lives or dies by the tails; at forget 10 % the leak-ratio choice (gamma 1000) overlapped
    (0.24 vs 0.28) where gamma 1 separated (0.74 vs 0.51) (measured on the quick model).
    """
    g_f, g_r = g_forget[..., None], g_retain[..., None]  # one concept: the rank-one gate
    factors, ok = concept_calibration(g_f, torch.zeros(g_f.shape[1], dtype=torch.long))
    return calibrated_margin(combined_gates(g_f, factors), combined_gates(g_r, factors)) if ok else 0.0


def calibrated_margin(g_forget: Tensor, g_retain: Tensor) -> float:
    """:func:`tail_margin` of gates that are already calibrated (and, per concept, combined)."""
    _, lo, f = _tails(g_forget, g_retain, WINDOW_QUANTILES["retain"], WINDOW_QUANTILES["forget"], WINDOW_MIN_LO)
    return f / lo


def concept_calibration(g_forget: Float[Tensor, "n_layers n_f c"], concept: Int[Tensor, " n_f"]
                        ) -> tuple[Float[Tensor, "n_layers c"], bool]:
    """``(factors, ok)``: per layer and concept, 1 / the mean of that concept's gate on its own forget queries.

    ``concept[i]`` is the concept index of forget query ``i`` (all 0 for the rank-one gate, where this is
    1 / the mean forget gate).  A factor whose mean is not positive stays 1 and ``ok`` is False: no
    calibration can make that gate fire on its concept.
    """
    L, _, C = g_forget.shape
    means = torch.empty(L, C, dtype=torch.float64)
    for c in range(C):
        own = concept == c
        if not own.any():
            raise ValueError(f"no validation forget query about concept {c}: its gate cannot be calibrated")
        means[:, c] = g_forget[:, own, c].double().mean(1)
    ok = bool((means > 0).all())
    return torch.where(means > 0, 1.0 / means.clamp_min(1e-300), torch.ones_like(means)), ok


def combined_gates(g: Float[Tensor, "n_layers n c"], factors: Float[Tensor, "n_layers c"]
                   ) -> Float[Tensor, "n_layers n"]:
    """What steering applies before any window: each concept's gate calibrated, then the max over concepts."""
    return (g.double() * factors[:, None, :]).amax(-1)
