"""Choosing each training baseline's learning rate and epochs by a small sweep on a validation split.

Why: a baseline run at one arbitrary setting is either too weak (forgets
nothing) or too strong (destroys the model), and either makes MLLMEraser look
better than it is.  So every baseline gets the same treatment as the eraser's
strength (:mod:`eraser.autotune`): on a validation split of freshly drawn
questions (never the evaluation prompts when the benchmark has a generator),
take the setting that forgets the most, i.e. the lowest forget classification
accuracy, then the highest forget refusal rate, then the lowest forget
generation ROUGE-L (without it, a model whose multiple choice no feasible
setting moves got the cheapest setting, a no-op, although the baselines do
forget generation: measured on the quick model an Intel Xeon trains), subject to retain
classification accuracy >= vanilla - ``tolerance`` and retain generation
ROUGE-L >= vanilla - ``gen_tolerance`` (when the split measures it).  Why the
second constraint: the key rewards forgetting generation, and a fine-tuned
model forgets generation most cheaply by losing it everywhere (measured on the
Intel-trained quick model with the multiple-choice constraint alone: the chosen
settings cost retain generation 39-57 points while retain multiple choice held);
the eraser's strength is not rewarded for generation forgetting, and its retain
generation cost in the demo is 0-2 points.  If no setting is feasible, take the
one with the best retain accuracy among those that forget at least somewhat,
flagged ``feasible=False``.

Epochs are swept within one run per learning rate: training uses a constant
learning rate and a seeded batch order drawn epoch by epoch, so the checkpoint
after epoch ``k`` is exactly a ``k``-epoch run (see
:mod:`eraser.baselines.finetune`).  ``fit_s`` of a candidate is the training
time up to its checkpoint, evaluation excluded.

>>> from eraser.baselines.select import rank_key
>>> row = {"lr": 1e-3, "epochs": 2, "forget": {"cls_acc": 0.2, "refusal_rate": 0.0},
...        "retain": {"cls_acc": 0.9, "refusal_rate": 0.0}}
>>> rank_key(row)[:3]
(0.8, 0.0, 0.0)
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Sequence

from tqdm.auto import tqdm

from interp.model import HookedVLM

from ..autotune import ValItem, measure, validation_split
from ..backend import generate_fn
from ..data.schema import Benchmark
from .finetune import METHODS, Example, unlearn, unlearning_data

__all__ = ["DEFAULT_LRS", "DEFAULT_EPOCHS", "GEN_TOLERANCE", "BaselineSelection", "rank_key", "annotate", "choose",
           "select_baseline", "select_baselines"]

DEFAULT_LRS: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
DEFAULT_EPOCHS: tuple[int, ...] = (1, 2, 4)
#: How far retain generation ROUGE-L may fall below vanilla's on the validation split (198 answers on the quick
#: benchmark, so one answer lost entirely moves it 0.005): ten answers' worth, a few times the eraser's own cost in
#: the demo (0-1 point).
GEN_TOLERANCE = 0.05
#: Forget accuracy must fall (or refusal rise) by more than this to count as "forgets at least somewhat".
MIN_FORGET_EFFECT = 1e-9


@dataclass
class BaselineSelection:
    """The chosen ``lr``/``epochs`` of one baseline, every candidate's validation numbers, and why.

    ``model`` is the trained model at the chosen setting (kept so callers need not retrain; excluded from
    :meth:`to_dict`); ``fit_s`` is that setting's training wall time.
    """

    method: str
    lr: float | None
    epochs: int | None
    feasible: bool
    vanilla: dict[str, dict[str, float]]
    candidates: list[dict[str, Any]] = field(default_factory=list)
    tolerance: float = 0.03
    gen_tolerance: float = GEN_TOLERANCE
    validation: str = ""
    reason: str = ""
    fit_s: float | None = None
    select_s: float = 0.0
    model: HookedVLM | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: everything but the model."""
        d = asdict(replace(self, model=None))  # asdict would otherwise deep-copy the model
        d.pop("model")
        return d


def rank_key(row: dict[str, Any]) -> tuple:
    """Higher is better: forgetting (1 - forget cls_acc, then forget refusal, then 1 - forget generation ROUGE-L
    to 0.01), then retain accuracy, then the cheaper setting (fewer epochs, smaller lr)."""
    f, r = row["forget"], row["retain"]
    return (round(1 - f["cls_acc"], 9), round(f["refusal_rate"], 9), _gen_forgetting(f), round(r["cls_acc"], 9),
            -row["epochs"], -row["lr"])


def _gen_forgetting(f: dict[str, float]) -> float:
    """1 - forget generation ROUGE-L, to 0.01 (finer differences are noise in a ~20-answer split); 0 if unmeasured."""
    return round(1 - f.get("gen_rougeL", 1.0), 2)


def _fallback_key(row: dict[str, Any]) -> tuple:
    f, r = row["forget"], row["retain"]
    return (round(r["cls_acc"], 9), round(r.get("gen_rougeL", 0.0), 2), round(1 - f["cls_acc"], 9),
            round(f["refusal_rate"], 9), _gen_forgetting(f), -row["epochs"], -row["lr"])


def _feasible(row: dict[str, Any], vanilla: dict[str, dict[str, float]], tolerance: float,
              gen_tolerance: float = GEN_TOLERANCE) -> bool:
    r, v = row["retain"], vanilla["retain"]
    ok = r["cls_acc"] >= v["cls_acc"] - tolerance - 1e-9
    if "gen_rougeL" in r and "gen_rougeL" in v:
        ok = ok and r["gen_rougeL"] >= v["gen_rougeL"] - gen_tolerance - 1e-9
    return ok


def _forgets(row: dict[str, Any], vanilla: dict[str, dict[str, float]]) -> bool:
    f, v = row["forget"], vanilla["forget"]
    return (f["cls_acc"] < v["cls_acc"] - MIN_FORGET_EFFECT
            or f["refusal_rate"] > v["refusal_rate"] + MIN_FORGET_EFFECT
            or _gen_forgetting(f) > _gen_forgetting(v))


_SLOTS = ("feasible", "fallback", "any")


def _slot(row: dict[str, Any]) -> str:
    return "feasible" if row["feasible"] else "fallback" if row["forgets"] else "any"


def _key(row: dict[str, Any]) -> tuple:
    return rank_key(row) if row["feasible"] else _fallback_key(row)


def annotate(row: dict[str, Any], vanilla: dict[str, dict[str, float]], tolerance: float,
             gen_tolerance: float = GEN_TOLERANCE) -> dict[str, Any]:
    """Add ``feasible`` (retain cls_acc within ``tolerance`` of vanilla and, when measured, retain generation
    ROUGE-L within ``gen_tolerance``) and ``forgets`` (forget cls_acc fell, forget refusal rose or forget
    generation ROUGE-L fell) to a candidate row."""
    row["feasible"] = _feasible(row, vanilla, tolerance, gen_tolerance)
    row["forgets"] = _forgets(row, vanilla)
    return row


def choose(rows: Sequence[dict[str, Any]], tolerance: float = 0.03, gen_tolerance: float = GEN_TOLERANCE
           ) -> tuple[dict[str, Any], bool, str]:
    """The selection rule on annotated rows: ``(row, feasible, reason)``.

    Feasible rows: most forgetting (:func:`rank_key`).  Otherwise, among rows that forget at least somewhat,
    and failing that among all rows: the best retain cls_acc (ties: more forgetting, then cheaper).
    """
    if not rows:
        raise ValueError("no candidates")
    reasons = {
        "feasible": f"max forgetting (1 - forget cls_acc, then forget refusal, then 1 - forget gen ROUGE-L) subject "
                    f"to retain cls_acc >= vanilla - {tolerance} and retain gen ROUGE-L >= vanilla - {gen_tolerance}",
        "fallback": f"no setting kept retain cls_acc within {tolerance} and retain gen ROUGE-L within {gen_tolerance}; "
                    f"best retain cls_acc (then gen ROUGE-L) among those that forget",
        "any": f"no setting kept retain cls_acc within {tolerance} and retain gen ROUGE-L within {gen_tolerance}, "
               f"and none forgot; best retain cls_acc",
    }
    for slot in _SLOTS:
        cands = [r for r in rows if _slot(r) == slot]
        if cands:
            return max(cands, key=_key), slot == "feasible", reasons[slot]
    raise AssertionError("unreachable")


def _snapshot(model: HookedVLM) -> HookedVLM:
    return HookedVLM.from_hf(copy.deepcopy(model.hf_model), tokenizer=model.tokenizer,
                             image_processor=model.image_processor)


def select_baseline(
    model: HookedVLM,
    bench: Benchmark,
    method: str,
    source: Any = None,
    lrs: Sequence[float] = DEFAULT_LRS,
    epochs: Sequence[int] = DEFAULT_EPOCHS,
    tolerance: float = 0.03,
    gen_tolerance: float = GEN_TOLERANCE,
    batch_size: int = 16,
    eval_batch_size: int = 64,
    beta: float = 0.1,
    seed: int = 0,
    data: tuple[Sequence[Example], Sequence[Example]] | None = None,
    val: tuple[dict[str, list[ValItem]], str] | None = None,
    vanilla: dict[str, dict[str, float]] | None = None,
    keep_model: bool = True,
    progress: bool = True,
    **unlearn_kwargs: Any,
) -> BaselineSelection:
    """Sweep ``lrs`` x ``epochs`` for ``method`` on the validation split; returns a :class:`BaselineSelection`.

    ``data`` (from :func:`~eraser.baselines.finetune.unlearning_data`), ``val`` (from
    :func:`eraser.autotune.validation_split`) and ``vanilla`` (the vanilla model's validation numbers) are
    computed when not given; pass them to share them across methods.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if not lrs or not epochs or min(epochs) < 1:
        raise ValueError("need at least one lr and epochs >= 1")
    t0 = time.perf_counter()
    forget, retain = data if data is not None else unlearning_data(bench, seed=seed)
    split, kind = val if val is not None else validation_split(bench, source, seed=seed)
    if vanilla is None:
        gen = generate_fn(model, batch_size=eval_batch_size)
        vanilla = {k: measure(gen, v) for k, v in split.items()}
    wanted = sorted(set(int(e) for e in epochs))
    rows: list[dict[str, Any]] = []
    best: dict[str, tuple[tuple, int, HookedVLM | None]] = {}  # per slot: key, row index, snapshot

    for lr in tqdm(sorted(lrs), desc=f"select {method}", disable=not progress, leave=False):
        def on_epoch(epoch: int, m: HookedVLM, info: dict[str, Any], lr: float = lr) -> None:
            if epoch not in wanted:
                return
            gen = generate_fn(m, batch_size=eval_batch_size)
            row = {"lr": lr, "epochs": epoch, "fit_s": info["fit_s"], "steps": info["steps"],
                   **{k: measure(gen, v) for k, v in split.items()}}
            rows.append(annotate(row, vanilla, tolerance, gen_tolerance))
            slot, key = _slot(row), _key(row)
            if slot not in best or key > best[slot][0]:  # keep only the running best model of each slot
                best[slot] = (key, len(rows) - 1, _snapshot(m) if keep_model else None)

        unlearn(model, method, forget, retain, lr=lr, epochs=max(wanted), batch_size=batch_size, beta=beta,
                seed=seed, progress=False, on_epoch=on_epoch, **unlearn_kwargs)

    row, ok, reason = choose(rows, tolerance, gen_tolerance)
    _, index, chosen = best[_slot(row)]
    assert rows[index] is row, "the running best and the selection rule disagree"
    return BaselineSelection(method, row["lr"], row["epochs"], ok, vanilla, rows, tolerance, gen_tolerance, kind,
                             reason, fit_s=row["fit_s"], select_s=time.perf_counter() - t0, model=chosen)


def select_baselines(
    model: HookedVLM,
    bench: Benchmark,
    source: Any = None,
    methods: Sequence[str] = tuple(METHODS),
    seed: int = 0,
    eval_batch_size: int = 64,
    progress: bool = True,
    **kwargs: Any,
) -> dict[str, BaselineSelection]:
    """:func:`select_baseline` for each of ``methods``, sharing the data, validation split and vanilla numbers."""
    data = unlearning_data(bench, seed=seed)
    val = validation_split(bench, source, seed=seed)
    gen = generate_fn(model, batch_size=eval_batch_size)
    vanilla = {k: measure(gen, v) for k, v in val[0].items()}
    return {m: select_baseline(model, bench, m, source, seed=seed, data=data, val=val, vanilla=vanilla,
                               eval_batch_size=eval_batch_size, progress=progress, **kwargs)
            for m in methods}
