"""``mllmeraser demo``: the main job on the embedded default, end to end.

Loads (or trains, once) the default model, fits MLLMEraser with the
automatically chosen strength and its ablations, runs the baselines, evaluates
everything with one evaluator, and writes ``results.json``, ``results.md``,
``gates.json``, ``sweep.jsonl`` and the figures.  Every file is written
atomically; the sweep resumes if interrupted.
"""
from __future__ import annotations

import argparse
import random
import time
from pathlib import Path
from typing import Any, Sequence

from interp.io import write_json
from interp.sweep import run_sweep

from .autotune import measure, validation_split
from .baselines.finetune import DEMO_BASELINES
from .backend import generate_fn
from .diagnostics import gate_report
from .evaluate import results_table, write_results
from .pairs import queries
from .pipeline import Setup, eraser_checks, evaluate_model, fit_variant, memorisation_checks, setup_from_args
from .variants import ERASER_VARIANTS

SWEEP_STRENGTHS = (-0.1, -0.25, -0.5, -1.0, -2.0)
#: The layer sweep's validation questions: ``validation_split`` arguments, then at most ``per_set`` per set.
SWEEP_VALIDATION = {"n_retain_profiles": 6, "n_celebrities": 3, "per_set": 60}


def sweep_context(setup: Setup, eraser=None) -> dict[str, Any]:
    """What a layer sweep's numbers depend on besides (layer, strength): a journal written under another model,
    split or artifact is refused instead of resumed.  Without ``eraser``, the part known before fitting one."""
    context = {"recipe_hash": setup.recipe.hash() if setup.recipe else None, "local": setup.local,
               "forget_ratio": setup.forget_ratio,
               "validation": SWEEP_VALIDATION}
    if eraser is not None:
        context["eraser"] = eraser.digest()
    return context


def check_sweep_journal(setup: Setup, path: Path, eraser=None) -> None:
    """Refuse an existing journal written for another model or split, before fitting (so a mismatch costs
    seconds, not a fit), and, given the fitted ``eraser``, for another artifact, before anything is written
    beside the journal (so a refused run leaves the folder as it was)."""
    from interp.sweep import Sweep, check_context

    if not path.exists():
        return
    journal = Sweep(path)
    wanted = sweep_context(setup, eraser)
    if journal.context is not None or eraser is not None:
        on_disk = None if journal.context is None else {k: journal.context.get(k) for k in wanted}
        check_context(path, on_disk, len(journal.result), wanted)


def layer_sweep(setup: Setup, eraser, out: Path, strengths=SWEEP_STRENGTHS) -> Path:
    """Forget refusal and retain accuracy when steering one layer at a time (and all layers: layer -1)."""
    v = SWEEP_VALIDATION
    val, _ = validation_split(setup.bench, setup.source, n_retain_profiles=v["n_retain_profiles"],
                              n_celebrities=v["n_celebrities"], seed=setup.seed)
    rng = random.Random(setup.seed)
    val = {k: rng.sample(items, min(len(items), v["per_set"])) for k, items in val.items()}
    gen = generate_fn(setup.model, batch_size=setup.batch_size)
    settings = [{"layer": l, "strength": s} for l in [-1] + list(eraser.layers) for s in strengths]

    def evaluate(setting: dict[str, Any]) -> dict[str, float]:
        lam = setting["strength"]
        strength = lam if setting["layer"] == -1 else {l: (lam if l == setting["layer"] else 0.0) for l in eraser.layers}
        with eraser.attached(setup.model, strength=strength):
            f, r = measure(gen, val["forget"]), measure(gen, val["retain"])
        return {"forget_refusal_rate": f["refusal_rate"], "forget_cls_acc": f["cls_acc"], "retain_cls_acc": r["cls_acc"]}

    path = out / "sweep.jsonl"
    run_sweep(settings, evaluate, path=path, progress=setup.progress, context=sweep_context(setup, eraser))
    return path


def run_baselines(setup: Setup, methods: Sequence[str] = DEMO_BASELINES) -> dict[str, dict[str, Any]]:
    """The training-based baselines ``methods`` (lr/epochs chosen by a small constrained sweep) and prompting."""
    from .baselines import forget_names, prompted_generate_fn, select_baselines
    from .evaluate import evaluate_benchmark, refusal_checks

    out: dict[str, dict[str, Any]] = {}
    print(f"[demo] baselines: {', '.join(methods) or 'none'} (lr/epochs by a small sweep), prompting")
    selections = select_baselines(setup.model, setup.bench, setup.source, methods=tuple(methods),
                                  progress=setup.progress) if methods else {}
    for name, sel in selections.items():
        res, extra, infer_s = evaluate_model(setup, model=sel.model, with_probs=False)
        out[name] = {"results": res, "refusal": extra["refusal"], "selection": sel.to_dict(),
                     "timing": {"fit_s": sel.fit_s, "select_s": sel.select_s, "infer_s": infer_s}}
        print(f"[demo]   {name}: lr {sel.lr}, {sel.epochs} epochs, fit {sel.fit_s:.1f}s")
    gen = prompted_generate_fn(setup.model, forget_names(setup.bench), setup.batch_size)
    t0 = time.perf_counter()
    res = evaluate_benchmark(setup.bench, gen, batch_size=setup.batch_size, progress=setup.progress)
    refusal = refusal_checks(setup.bench, gen, batch_size=setup.batch_size, progress=setup.progress)
    out["prompt"] = {"results": res, "refusal": refusal, "timing": {"fit_s": 0.0, "infer_s": time.perf_counter() - t0}}
    return out


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    setup = setup_from_args(args)
    check_sweep_journal(setup, out / "sweep.jsonl")  # a journal of another run is refused before any work
    print(f"[demo] model: {setup.describe()}")
    methods: dict[str, Any] = {}
    timing: dict[str, Any] = {}
    refusal: dict[str, Any] = {}
    selection: dict[str, Any] = {}

    print("[demo] evaluating vanilla")
    res, extra, infer_s = evaluate_model(setup, with_probs=False)
    methods["vanilla"], timing["vanilla"], refusal["vanilla"] = res, {"fit_s": 0.0, "infer_s": infer_s}, extra["refusal"]

    erasers = {}
    for name in ERASER_VARIANTS:
        print(f"[demo] fitting {name}")
        eraser, sel, t = fit_variant(setup, name)
        erasers[name] = eraser
        gated = ERASER_VARIANTS[name].get("gated", True)
        res, extra, infer_s = evaluate_model(setup, lambda: eraser.attached(setup.model, gated=gated), with_probs=False)
        methods[name], refusal[name] = res, extra["refusal"]
        timing[name] = {**t, "infer_s": infer_s}
        selection[name] = sel.to_dict() if sel else None
        print(f"[demo]   strength {eraser.config.strength}: forget cls {res['forget']['cls_acc']:.3f}, "
              f"retain cls {res['retain']['cls_acc']:.3f}")

    for name, b in run_baselines(setup, getattr(args, "baselines", DEMO_BASELINES)).items():
        methods[name], timing[name], refusal[name] = b["results"], b["timing"], b["refusal"]
        selection[name] = b.get("selection")

    print("[demo] gate diagnostics and layer sweep")
    main = erasers["mllmeraser"]
    rng = random.Random(setup.seed)
    sample = lambda qs, n: rng.sample(qs, min(n, len(qs)))  # noqa: E731
    sets = {"forget": queries(setup.bench.forget), "retain": sample(queries(setup.bench.retain + setup.bench.celebrity), 200),
            "test": queries(setup.bench.test)}
    check_sweep_journal(setup, out / "sweep.jsonl", main)  # before writing beside it: the folder stays one run's
    write_json(out / "gates.json", gate_report(setup.model, main, sets, batch_size=setup.batch_size))
    main.save(out / "eraser.safetensors")
    layer_sweep(setup, main, out)

    # callers that build their own Namespace may leave no_oracle out; a local checkpoint may have no oracle
    oracle = not getattr(args, "no_oracle", False) and setup.has_oracle
    memorisation = memorisation_checks(setup, methods["vanilla"], refusal["vanilla"], oracle)
    checks: dict[str, Any] = {"refusal": refusal, "memorisation": memorisation}
    for name in methods:
        if name != "vanilla":
            checks[name] = eraser_checks(methods["vanilla"], methods[name])
    if not oracle:
        print("[demo] --no-oracle: the oracle check is skipped (checks.memorisation.skipped)")
    config = {**setup.config(), "quick": bool(args.quick), "selection": selection,
              "total_s": time.perf_counter() - t_start}
    write_results(out, config, methods, timing, checks=checks)

    from .plots import make_all

    figs = make_all(out)
    print(results_table(methods))
    print(f"[demo] wrote {out / 'results.json'}, {out / 'results.md'} and {len(figs)} figures "
          f"in {time.perf_counter() - t_start:.0f}s")
    return {"methods": methods, "timing": timing, "checks": checks}
