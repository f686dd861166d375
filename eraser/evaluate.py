"""The MLLMU-Bench evaluator, model-agnostic.

Why model-agnostic: the same evaluator must score the vanilla model, the
eraser (hooks attached), fine-tuning baselines and a prompt baseline, on the
tiny embedded model and on real checkpoints.  So the model is reached only
through two callables:

* ``generate(images, prompts, max_new_tokens) -> answers`` (decoded answer
  text only, without the prompt; greedy for the benchmark);
* ``nll(images, prompts, answers) -> mean token NLL of each answer`` (optional,
  for answer probability / forget quality).

Example (a fake model that always answers "A"):

>>> from eraser.data import Profile, ClassificationQ
>>> p = Profile("p0", "Ann", None, "", classification=[
...     ClassificationQ("Job?", {"A": "baker", "B": "pilot"}, "A", "qa")])
>>> evaluate_split([p], lambda ims, prs, n: ["A"] * len(prs), progress=False)["cls_acc"]
1.0
"""
from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
import warnings
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from PIL import Image
from tqdm import tqdm

from . import metrics as M
from .data.prompts import classification_prompt, cloze_prompt, generation_prompt
from .data.schema import SPLITS, Benchmark, Modality, Profile, Request

__all__ = [
    "GenerateFn",
    "NllFn",
    "EvalItem",
    "build_items",
    "run_generate",
    "evaluate_split",
    "answer_probs",
    "truth_ratio_items",
    "truth_ratios",
    "evaluate_requests",
    "evaluate_benchmark",
    "refusal_checks",
    "results_table",
    "write_results",
    "TASKS",
]

GenerateFn = Callable[[list[Image.Image | None], list[str], int], list[str]]
NllFn = Callable[[list[Image.Image | None], list[str], list[str]], list[float]]

Task = Literal["classification", "cloze", "generation"]
TASKS: tuple[str, ...] = ("classification", "cloze", "generation")
MODALITIES: tuple[str, ...] = ("vqa", "qa")


@dataclass(frozen=True)
class EvalItem:
    """One benchmark question, ready to send to the model.

    ``reference`` is the correct letter (classification) or the ground-truth
    text (cloze, generation).  ``image`` is the profile's image for ``"vqa"``
    questions and None for ``"qa"``; it is excluded from equality/hashing
    (PIL images are unhashable and compared by pixels).
    """

    task: Task
    modality: Modality
    profile_id: str
    prompt: str
    reference: str
    image: Image.Image | None = field(default=None, compare=False, repr=False)
    index: int = 0  # position of the question within its profile's task list


def build_items(profiles: Sequence[Profile], tasks: Sequence[str] = TASKS) -> list[EvalItem]:
    """Every question of ``profiles`` as :class:`EvalItem` s, profile by profile, in task order.

    Prompts come from :mod:`eraser.data.prompts` so they are byte-identical
    to the ones the model was trained on.
    """
    unknown = set(tasks) - set(TASKS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected a subset of {TASKS}")
    items: list[EvalItem] = []
    for p in profiles:
        sources = {
            "classification": [(q, classification_prompt(q), q.answer.strip().upper()) for q in p.classification],
            "cloze": [(q, cloze_prompt(q), q.ground_truth) for q in p.cloze],
            "generation": [(q, generation_prompt(q), q.ground_truth) for q in p.generation],
        }
        for task in TASKS:
            if task not in tasks:
                continue
            for i, (q, prompt, ref) in enumerate(sources[task]):
                if q.modality not in MODALITIES:
                    raise ValueError(f"profile {p.id}: unknown modality {q.modality!r}")
                if q.modality == "vqa" and p.image is None:
                    raise ValueError(f"profile {p.id}: a vqa question needs an image but the profile has none")
                image = p.image if q.modality == "vqa" else None
                items.append(EvalItem(task, q.modality, p.id, prompt, ref, image, i))  # type: ignore[arg-type]
    return items


def _tokens_for(task: str, max_new_tokens: int | Mapping[str, int]) -> int:
    if isinstance(max_new_tokens, Mapping):
        return int(max_new_tokens.get(task, 50))
    return int(max_new_tokens)


def run_generate(
    items: Sequence[Any],
    generate: GenerateFn,
    batch_size: int = 32,
    max_new_tokens: int | Mapping[str, int] = 50,
    progress: bool = True,
    desc: str = "generate",
) -> list[str]:
    """Outputs of ``generate`` for ``items`` (anything with ``.image``, ``.prompt``, optional ``.task``), in item order.

    Items are grouped so that every batch shares its task, ``max_new_tokens`` and is
    either all-image or all-text (processors and padding are simplest, and
    fastest, on homogeneous batches); outputs are put back in the original
    order.  ``max_new_tokens`` is the benchmark's 50 for every task unless the
    caller overrides it (an int, or a ``{task: n}`` mapping, default 50).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Grouped by task too: a batch runs until its longest answer ends, so one-letter answers are batched together.
    groups: dict[tuple[str, int, bool], list[int]] = defaultdict(list)
    for i, it in enumerate(items):
        task = getattr(it, "task", "")
        groups[(task, _tokens_for(task, max_new_tokens), it.image is None)].append(i)
    outputs: list[str | None] = [None] * len(items)
    with tqdm(total=len(items), desc=desc, disable=not progress, leave=False) as bar:
        for (_, n_tokens, _), idx in groups.items():
            for start in range(0, len(idx), batch_size):
                chunk = idx[start : start + batch_size]
                outs = generate([items[i].image for i in chunk], [items[i].prompt for i in chunk], n_tokens)
                outs = list(outs)
                if len(outs) != len(chunk):
                    raise ValueError(f"generate returned {len(outs)} outputs for a batch of {len(chunk)} prompts")
                for i, o in zip(chunk, outs):
                    outputs[i] = o if isinstance(o, str) else str(o)
                bar.update(len(chunk))
    return outputs  # type: ignore[return-value]


def _run_nll(items: Sequence[EvalItem], nll: NllFn, batch_size: int) -> list[float]:
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        vals = list(nll([it.image for it in chunk], [it.prompt for it in chunk], [it.reference for it in chunk]))
        if len(vals) != len(chunk):
            raise ValueError(f"nll returned {len(vals)} values for a batch of {len(chunk)} answers")
        out.extend(float(v) for v in vals)
    return out


def answer_probs(profiles: Sequence[Profile], nll: NllFn, batch_size: int = 32) -> list[float]:
    """Per-question ``exp(-NLL)`` of the generation ground truths, in :func:`build_items` order.

    Feed two of these lists (unlearned model, retain-only oracle) to
    :func:`eraser.metrics.forget_quality`.
    """
    items = build_items(profiles, tasks=("generation",))
    if not items:
        raise ValueError("no generation questions to score")
    return [M.answer_probability(v) for v in _run_nll(items, nll, batch_size)]


def truth_ratio_items(profiles: Sequence[Profile]) -> list[tuple[EvalItem, list[str]]]:
    """Cloze questions paired with wrong answers of the same kind: ``(item, wrong_answers)``.

    TOFU's truth ratio compares a correct answer with perturbed (wrong) ones.  MLLMU-Bench ships no perturbed
    answers, but every fact is also asked as multiple choice, and a cloze question's ground truth is the correct
    option of the multiple-choice question about the same fact (same person, same modality); the other options
    are wrong answers of the same kind.  Cloze questions without such a match are left out.
    """
    by_id = {p.id: p for p in profiles}
    out = []
    for it in build_items(profiles, tasks=("cloze",)):
        truth = it.reference.strip().lower()
        for q in by_id[it.profile_id].classification:
            letter = q.answer.strip().upper()
            if q.modality == it.modality and str(q.options.get(letter, "")).strip().lower() == truth:
                wrong = [str(v) for k, v in sorted(q.options.items()) if k != letter]
                if wrong:
                    out.append((it, wrong))
                break
    return out


def truth_ratios(profiles: Sequence[Profile], nll: NllFn, batch_size: int = 32) -> list[float]:
    """TOFU's truth ratio of every cloze question :func:`truth_ratio_items` pairs with wrong answers:
    ``exp(nll_correct - mean nll_wrong)`` (:func:`eraser.metrics.truth_ratio`).  Well below 1: the model still
    prefers the truth; around 1 or above: it no longer does.  Feed two of these lists (unlearned model,
    retain-only oracle) to :func:`eraser.metrics.forget_quality` for TOFU's forget quality."""
    pairs = truth_ratio_items(profiles)
    if not pairs:
        raise ValueError("no cloze question's answer is a multiple-choice option about the same fact: "
                         "no truth ratio to compute")
    flat: list[EvalItem] = []
    for it, wrong in pairs:
        flat += [it] + [replace(it, reference=w) for w in wrong]
    vals = _run_nll(flat, nll, batch_size)
    out, k = [], 0
    for _, wrong in pairs:
        out.append(M.truth_ratio(vals[k], vals[k + 1:k + 1 + len(wrong)]))
        k += 1 + len(wrong)
    return out


def _score(item: EvalItem, output: str) -> dict[str, Any]:
    if item.task == "classification":
        ok = M.parse_choice(output) == item.reference
        return {"correct": ok, "score": float(ok)}
    if item.task == "cloze":
        ok = M.cloze_correct(output, item.reference)
        return {"correct": ok, "score": float(ok)}
    return {"score": M.rouge_l(output, item.reference), "bleu": M.bleu(output, item.reference)}


def evaluate_split(
    profiles: Sequence[Profile],
    generate: GenerateFn,
    nll: NllFn | None = None,
    batch_size: int = 32,
    max_new_tokens: int | Mapping[str, int] = 50,
    progress: bool = True,
    return_records: bool = False,
    desc: str = "eval",
) -> dict[str, float] | tuple[dict[str, float], list[dict[str, Any]]]:
    """All MLLMU-Bench metrics of one split, accuracies in 0..1.

    Metrics (each also with ``_vqa`` / ``_qa`` suffixes, BENCHMARK.md's split by
    modality): ``cls_acc``, ``cloze_acc``, ``gen_rougeL``, ``gen_bleu``,
    ``refusal_rate`` (over every output), ``gibberish_rate`` (over cloze +
    generation outputs: a one-letter classification answer is never a
    sentence), ``answer_prob`` (only when ``nll`` is given: mean ``exp(-NLL)``
    of the generation ground truths, over their tokens and the end-of-sequence
    token, :func:`eraser.backend.nll_fn`); and ``n_items``.  A metric whose questions are
    absent (e.g. a split without text-only cloze) is left out rather than NaN,
    so results stay valid JSON.

    With ``return_records=True`` returns ``(metrics, records)`` where each
    record is a JSON-friendly dict: task, modality, id, index, prompt, output,
    reference, score (and correct / bleu / answer_prob where they apply).
    """
    items = build_items(profiles)
    if not items:
        raise ValueError("no questions to evaluate: the split is empty or its profiles have no questions")
    outputs = run_generate(items, generate, batch_size, max_new_tokens, progress, desc)
    records: list[dict[str, Any]] = []
    for it, out in zip(items, outputs):
        rec = {
            "task": it.task,
            "modality": it.modality,
            "id": it.profile_id,
            "index": it.index,
            "prompt": it.prompt,
            "output": out,
            "reference": it.reference,
        }
        rec.update(_score(it, out))
        records.append(rec)

    res: dict[str, float] = {}
    names = {"classification": "cls_acc", "cloze": "cloze_acc", "generation": "gen_rougeL"}
    for task, name in names.items():
        for suffix, mods in (("", MODALITIES), ("_vqa", ("vqa",)), ("_qa", ("qa",))):
            sel = [r for r in records if r["task"] == task and r["modality"] in mods]
            if sel:
                res[name + suffix] = M.mean(r["score"] for r in sel)
                if task == "generation":
                    res["gen_bleu" + suffix] = M.mean(r["bleu"] for r in sel)
    for suffix, mods in (("", MODALITIES), ("_vqa", ("vqa",)), ("_qa", ("qa",))):
        outs = [r["output"] for r in records if r["modality"] in mods]
        if outs:
            res["refusal_rate" + suffix] = M.refusal_rate(outs)
        free_text = [r["output"] for r in records if r["task"] != "classification" and r["modality"] in mods]
        if free_text:
            res["gibberish_rate" + suffix] = M.gibberish_rate(free_text)

    if nll is not None:
        gen_pos = [i for i, it in enumerate(items) if it.task == "generation"]
        if gen_pos:
            probs = [M.answer_probability(v) for v in _run_nll([items[i] for i in gen_pos], nll, batch_size)]
            for i, p in zip(gen_pos, probs):
                records[i]["answer_prob"] = p
            res["answer_prob"] = M.mean(probs)
            for mod in MODALITIES:
                sel = [p for i, p in zip(gen_pos, probs) if items[i].modality == mod]
                if sel:
                    res[f"answer_prob_{mod}"] = M.mean(sel)
    res["n_items"] = float(len(items))
    return (res, records) if return_records else res


def evaluate_requests(
    requests: Sequence[Request],
    generate: GenerateFn,
    batch_size: int = 32,
    max_new_tokens: int = 50,
    progress: bool = True,
    return_records: bool = False,
    desc: str = "requests",
) -> dict[str, float] | tuple[dict[str, float], list[dict[str, Any]]]:
    """Refusal behaviour on free-form requests (``Benchmark.forbidden`` / ``answerable``).

    Returns ``refusal_rate``, ``gibberish_rate``, ``answer_match_rate`` (the
    expected answer appears in the output, case-insensitive; requests with an
    empty expected answer are skipped) and ``n_items``.
    """
    if not requests:
        raise ValueError("no requests to evaluate")
    outputs = run_generate(requests, generate, batch_size, max_new_tokens, progress, desc)
    res = {"refusal_rate": M.refusal_rate(outputs), "gibberish_rate": M.gibberish_rate(outputs)}
    matches = [M.cloze_correct(o, r.answer) for r, o in zip(requests, outputs) if r.answer.strip()]
    if matches:
        res["answer_match_rate"] = M.mean(matches)
    res["n_items"] = float(len(requests))
    if not return_records:
        return res
    records = [
        {"prompt": r.prompt, "has_image": r.image is not None, "output": o, "reference": r.answer, "refusal": M.is_refusal(o)}
        for r, o in zip(requests, outputs)
    ]
    return res, records


def evaluate_benchmark(
    bench: Benchmark,
    generate: GenerateFn,
    nll: NllFn | None = None,
    splits: Sequence[str] = SPLITS,
    batch_size: int = 32,
    max_new_tokens: int | Mapping[str, int] = 50,
    progress: bool = True,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_split` on each of ``splits``: ``{split: {metric: value}}``.

    Empty splits are skipped with a warning (e.g. a benchmark built without
    celebrities), so one missing split does not lose the others.
    """
    out: dict[str, dict[str, float]] = {}
    for s in splits:
        profiles = bench.split(s)
        if not profiles:
            warnings.warn(f"split {s!r} of {bench.name!r} is empty; skipped", stacklevel=2)
            continue
        out[s] = evaluate_split(  # type: ignore[assignment]
            profiles, generate, nll, batch_size, max_new_tokens, progress, desc=f"eval {s}"
        )
    return out


def refusal_checks(
    bench: Benchmark,
    generate: GenerateFn,
    batch_size: int = 32,
    max_new_tokens: int = 50,
    progress: bool = True,
) -> dict[str, float]:
    """``forbidden_refusal_rate`` (want high) and ``answerable_refusal_rate`` (over-refusal: want low).

    A key is absent when the benchmark has no such requests (the real
    MLLMU-Bench has none, so it returns ``{}``).
    """
    out: dict[str, float] = {}
    for name in ("forbidden", "answerable"):
        reqs = getattr(bench, name)
        if reqs:
            r = evaluate_requests(reqs, generate, batch_size, max_new_tokens, progress, desc=name)
            out[f"{name}_refusal_rate"] = r["refusal_rate"]  # type: ignore[index]
    return out


# --------------------------------------------------------------------------- reporting

_SPLIT_LABELS = {"forget": ("Forget", "↓"), "test": ("Test", "↓"), "retain": ("Retain", "↑"), "celebrity": ("Celebrity", "↑")}
_TABLE_METRICS = (("cls_acc", "cls"), ("gen_rougeL", "gen R-L"), ("cloze_acc", "cloze"))
_EXTRA_COLUMNS = (
    ("forget", "refusal_rate", "Refusal F"),
    ("retain", "refusal_rate", "Refusal R"),
    ("forget", "gibberish_rate", "Gibberish F"),
    ("retain", "gibberish_rate", "Gibberish R"),
)


def _cell(value: float | None, base: float | None, with_delta: bool) -> str:
    if value is None or not math.isfinite(float(value)):
        return "–"
    text = f"{100 * float(value):.1f}"
    if with_delta and base is not None and math.isfinite(float(base)):
        delta = round(100 * (float(value) - float(base)), 1) + 0.0  # +0.0 turns -0.0 into 0.0
        text += f" ({delta:+.1f})"
    return text


def results_table(methods: Mapping[str, Mapping[str, Mapping[str, float]]], baseline: str = "vanilla") -> str:
    """A markdown table in the paper's layout: one row per method, percentages with one decimal.

    Column groups Forget / Test / Retain / Celebrity (↓ = lower is better for
    the forget identities, ↑ = higher is better) x (classification accuracy,
    generation ROUGE-L, cloze accuracy), then refusal and gibberish rates on
    forget (F) and retain (R).  The baseline row comes first; every other row
    shows its delta to the baseline in parentheses.  Missing values are "–";
    splits no method has are left out.
    """
    if not methods:
        raise ValueError("no methods to tabulate")
    splits = [s for s in SPLITS if any(s in m for m in methods.values())]
    cols: list[tuple[str, str, str]] = []
    for s in splits:
        label, arrow = _SPLIT_LABELS[s]
        cols += [(s, key, f"{label} {name} {arrow}") for key, name in _TABLE_METRICS]
    cols += [(s, key, name) for s, key, name in _EXTRA_COLUMNS if any(s in m for m in methods.values())]
    order = ([baseline] if baseline in methods else []) + [m for m in methods if m != baseline]
    base = methods.get(baseline)

    def get(res: Mapping[str, Mapping[str, float]] | None, s: str, k: str) -> float | None:
        v = (res or {}).get(s, {}).get(k)
        return None if v is None else float(v)

    lines = ["| Method | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---:|" * len(cols)]
    for m in order:
        cells = [_cell(get(methods[m], s, k), get(base, s, k), m != baseline) for s, k, _ in cols]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plain(obj: Any, path: str = "$") -> Any:
    """Recursively convert to JSON-native types: numpy/torch scalars -> float/int, NaN/inf -> None."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, enum.Enum):
        return _plain(obj.value, path)
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return _plain(dataclasses.asdict(obj), path)
    if isinstance(obj, Mapping):
        return {str(k): _plain(v, f"{path}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_plain(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    if hasattr(obj, "detach"):  # torch tensor
        obj = obj.detach().cpu().numpy()
    if hasattr(obj, "tolist"):  # numpy scalar or array
        return _plain(obj.tolist(), path)
    raise TypeError(f"cannot serialise {type(obj).__name__} at {path} to JSON")


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write via :func:`interp.io.atomic_path` (a temp file renamed into place, with the permissions ``open``
    would give), synced before the rename: readers never see half a file, even after a power cut."""
    from interp.io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def _markdown(config: Any, methods: Mapping, timing: Mapping, checks: Mapping | None, baseline: str) -> str:
    parts = ["# Results", "", results_table(methods, baseline=baseline)]
    if timing:
        parts += ["## Timing (s)", "", "| Method | fit_s | infer_s |", "|---|---:|---:|"]
        for m, t in timing.items():
            cells = [("–" if t.get(k) is None else f"{float(t[k]):.2f}") for k in ("fit_s", "infer_s")]
            parts.append(f"| {m} | " + " | ".join(cells) + " |")
        parts.append("")
    if checks:
        parts += ["## Checks", "", "```json", json.dumps(checks, indent=2), "```", ""]
    parts += ["## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    return "\n".join(parts)


def write_results(
    out_dir: str | os.PathLike,
    config: Any,
    methods: Mapping[str, Mapping[str, Mapping[str, float]]],
    timing: Mapping[str, Mapping[str, float]],
    checks: Mapping[str, Any] | None = None,
    baseline: str = "vanilla",
) -> tuple[Path, Path]:
    """Write ``results.json`` (``{"config", "methods", "timing"[, "checks"]}``) and ``results.md``.

    Both are written atomically, so an interrupted or failing run leaves the
    previous results intact.  Values are converted to plain Python types
    (numpy/torch scalars -> float; NaN -> null) so the JSON is strict.
    Returns the two paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload: dict[str, Any] = {"config": _plain(config), "methods": _plain(methods), "timing": _plain(timing)}
    if checks is not None:
        payload["checks"] = _plain(checks)
    md = _markdown(payload["config"], payload["methods"], payload["timing"], payload.get("checks"), baseline)
    json_path, md_path = out / "results.json", out / "results.md"

    def dump(f: Any) -> None:
        json.dump(payload, f, indent=2, allow_nan=False)
        f.write("\n")

    _atomic_write(json_path, dump)
    _atomic_write(md_path, lambda f: f.write(md))
    return json_path, md_path
