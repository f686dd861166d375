"""Experiments as functions: set up the default model and benchmark, fit MLLMEraser variants, evaluate.

The CLI (:mod:`eraser.cli`) and the analyses call these, so a result in a
figure and a number in ``results.json`` come from the same code path.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

from interp import HookedVLM
from interp.fingerprint import model_fingerprint

from .autotune import (DEFAULT_GRID, Selection, choose_answer_steps, choose_gate, choose_strength, measure,
                       validation_split)
from .backend import generate_fn, nll_fn
from .data.schema import Benchmark
from .evaluate import (answer_probs, evaluate_benchmark, evaluate_split, refusal_checks, truth_ratio_items,
                       truth_ratios)
from .config import EraserConfig
from .method import MLLMEraser
from .metrics import forget_quality
from .pairs import fit_data, forget_queries
from .stats import FitStats
from .variants import ERASER_VARIANTS, NOT_CONFIG, stacked_layers
from .zoo import TARGETS, Recipe, load_or_train, train_log


class LocalSetupError(ValueError):
    """A local run asked for something it does not have (a checkpoint that does not load, an oracle never given)."""


@dataclass
class Setup:
    """Everything an experiment needs: the model, the benchmark and (for the embedded default) its recipe and
    generator.

    Two kinds: the zoo's model on MiniMLLMU (:func:`load_setup`: ``recipe`` and ``source`` set, the oracle
    trained on demand), or a local checkpoint on a local MLLMU-Bench copy (:func:`load_local_setup`:
    ``recipe`` and ``source`` None, ``local`` says what was loaded, an oracle only if one was given).
    """

    recipe: Recipe | None
    model: HookedVLM
    bench: Benchmark
    source: Any
    forget_ratio: int
    batch_size: int = 64
    cache_dir: str | None = None
    progress: bool = True
    _oracle: HookedVLM | None = field(default=None, repr=False)
    # {"model": path, "data": path, "oracle": path | None, "seed": n, "dtype": name}
    local: dict[str, Any] | None = None
    _memo: dict[Any, Any] = field(default_factory=dict, repr=False)  # validation split and vanilla numbers

    def validation(self) -> tuple[dict[str, list[Any]], str]:
        """The validation split (:func:`~eraser.autotune.validation_split`: fresh questions), drawn once per
        setup, so every variant's settings are chosen on the same questions."""
        if "validation" not in self._memo:
            self._memo["validation"] = validation_split(self.bench, self.source, seed=self.seed)
        return self._memo["validation"]

    def vanilla_validation(self) -> dict[str, dict[str, float]]:
        """The unsteered model's validation numbers (:func:`~eraser.autotune.measure` per split), measured once
        per weights: each variant's strength search compares against them (the demo fits nine variants)."""
        key = ("vanilla", model_fingerprint(self.model)["weights"], self.batch_size)
        if key not in self._memo:
            gen = generate_fn(self.model, batch_size=self.batch_size)
            self._memo[key] = {k: measure(gen, v) for k, v in self.validation()[0].items()}
        return copy.deepcopy(self._memo[key])

    @property
    def seed(self) -> int:
        """The seed of data draws (validation questions, pair sampling): the recipe's, or the local run's."""
        return self.recipe.seed if self.recipe is not None else int((self.local or {}).get("seed", 0))

    @property
    def has_oracle(self) -> bool:
        """Whether a retain-only oracle exists or can be trained (never for a local checkpoint without one)."""
        return self._oracle is not None or self.recipe is not None

    @property
    def oracle(self) -> HookedVLM:
        """The retain-only oracle (trained on first use, then cached; a local run's, if it was given)."""
        if self._oracle is None:
            if self.recipe is None:
                raise LocalSetupError("no retain-only oracle for a local checkpoint: give one (--oracle-model PATH) "
                                      "or skip what needs it (--no-oracle)")
            self._oracle = load_or_train(self.recipe.oracle_for(self.forget_ratio), self.cache_dir, self.progress)
        return self._oracle

    def config(self) -> dict[str, Any]:
        """What ran: the recipe and, where its checkpoint recorded it, the machine that trained the model
        (``trained_on``, :func:`eraser.zoo.machine.machine_info`; None for a checkpoint older than that record);
        for a local run, the checkpoint and data paths instead of a recipe."""
        if self.recipe is None:
            return {"arch": self.model.arch, "seed": self.seed, "forget_ratio": self.forget_ratio, "recipe": None,
                    "recipe_hash": None, "trained_on": None, "local": dict(self.local or {}),
                    "benchmark": self.bench.name}
        log = train_log(self.recipe, self.cache_dir) or {}
        return {"arch": self.recipe.arch, "seed": self.recipe.seed, "forget_ratio": self.forget_ratio,
                "recipe": self.recipe.to_dict(), "recipe_hash": self.recipe.hash(), "trained_on": log.get("machine")}

    def describe(self) -> str:
        if self.recipe is not None:
            return self.recipe.describe()
        return f"{self.model!r} from {self.local['model']}, {self.bench.name}"


def load_setup(arch: str = "llava", seed: int = 0, forget_ratio: int = 5, quick: bool = False,
               cache_dir: str | None = None, progress: bool = True, batch_size: int = 64) -> Setup:
    """The cached (or freshly trained) default model for ``arch``/``seed`` and its benchmark split."""
    if forget_ratio not in (5, 10, 15):
        raise ValueError(f"forget ratio must be 5, 10 or 15, got {forget_ratio}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    recipe = (Recipe.quick(arch) if quick else Recipe.default(arch)).replace(seed=seed, data_seed=seed)
    model = load_or_train(recipe, cache_dir, progress)
    return Setup(recipe, model, recipe.benchmark(forget_ratio), recipe.mini(), forget_ratio,
                 batch_size=batch_size, cache_dir=cache_dir, progress=progress)


def setup_from_args(args: Any) -> Setup:
    """The setup a command line asks for: ``--model`` + ``--mllmu`` (a local checkpoint on a local MLLMU-Bench),
    or the embedded default (``--arch``, ``--seed``, ``--quick``)."""
    arch = getattr(args, "arch", None)  # None: not given (the embedded default's is llava; a checkpoint has its own)
    if getattr(args, "model", None) or getattr(args, "mllmu", None):
        if not (args.model and args.mllmu):
            raise LocalSetupError("--model and --mllmu go together: a local checkpoint is evaluated on a local "
                                  "MLLMU-Bench copy (the embedded default needs neither)")
        if getattr(args, "quick", False):
            raise LocalSetupError("--quick picks the embedded default's small model; with --model the checkpoint is "
                                  "the model (unset MLLMERASER_QUICK, or leave out --quick)")
        import torch

        from interp.loading import checkpoint_arch

        saved_arch = checkpoint_arch(args.model)  # refused before minutes of loading weights, where it can be told
        if arch is not None and saved_arch is not None and arch != saved_arch:
            raise LocalSetupError(f"--arch {arch}, but --model {args.model} is a {saved_arch} checkpoint "
                                  "(leave out --arch: a checkpoint's architecture is read from it)")
        dtype = getattr(torch, args.dtype) if getattr(args, "dtype", None) else None
        setup = load_local_setup(args.model, args.mllmu, args.forget_ratio, args.seed,
                                 oracle_path=getattr(args, "oracle_model", None), progress=not args.no_progress,
                                 batch_size=args.batch_size, dtype=dtype)
        if arch is not None and arch != setup.model.arch:
            raise LocalSetupError(f"--arch {arch}, but --model {args.model} is a {setup.model.arch} checkpoint "
                                  "(leave out --arch: a checkpoint's architecture is read from it)")
        return setup
    if getattr(args, "oracle_model", None):
        raise LocalSetupError("--oracle-model goes with --model: the embedded default trains its own oracle")
    if getattr(args, "dtype", None):
        raise LocalSetupError("--dtype goes with --model: the embedded default is float32")
    return load_setup(arch or "llava", args.seed, args.forget_ratio, args.quick, args.cache_dir,
                      progress=not args.no_progress, batch_size=args.batch_size)


def load_local_setup(model_path: str, data_path: str, forget_ratio: int = 5, seed: int = 0,
                     oracle_path: str | None = None, progress: bool = True, batch_size: int = 64,
                     dtype: Any = None, device_map: Any = None) -> Setup:
    """A local checkpoint (``HookedVLM.from_pretrained``: LLaVA-1.5 or Qwen2.5-VL, or any saved ``HookedVLM``) on a
    local MLLMU-Bench copy (:func:`eraser.data.mllmu.load_mllmu`): the paper's setting, with no download.

    The data is read (and checked) before the model is loaded, so a bad folder fails in seconds.  Without a
    generator there are no fresh validation questions: settings are chosen on the benchmark's own forget and
    retain questions (``validation_split``'s "eval-subset"), and there are no refusal checks (MLLMU-Bench has
    no refusal behaviour).  ``oracle_path``, a checkpoint fine-tuned without the forget set, enables forget
    quality and the oracle check.
    """
    from .data.mllmu import load_mllmu

    if forget_ratio not in (5, 10, 15):
        raise ValueError(f"forget ratio must be 5, 10 or 15, got {forget_ratio}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    bench = load_mllmu(data_path, forget_ratio)

    def load(path: str, what: str) -> HookedVLM:
        try:
            return HookedVLM.from_pretrained(path, dtype=dtype, device_map=device_map, progress=progress)
        except (OSError, ValueError, KeyError) as e:  # transformers' errors for a folder that is not a checkpoint
            raise LocalSetupError(f"{what} {path} does not load as a vision-language checkpoint "
                                  f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None

    model = load(model_path, "--model")
    oracle = load(oracle_path, "--oracle-model") if oracle_path else None
    local = {"model": str(model_path), "data": str(data_path), "oracle": str(oracle_path) if oracle_path else None,
             "seed": seed, "dtype": str(model.dtype).removeprefix("torch.")}  # what ran, given or as saved
    return Setup(None, model, bench, None, forget_ratio, batch_size=batch_size, progress=progress, _oracle=oracle,
                 local=local)


def evaluate_model(setup: Setup, hooks_context: Callable[[], Any] | None = None, model: HookedVLM | None = None,
                   with_probs: bool = True) -> tuple[dict[str, dict[str, float]], dict[str, Any], float]:
    """All splits' metrics (+ refusal checks; with ``with_probs`` every split's answer probability, and the
    forget split's per-question probabilities for forget quality) under an optional context."""
    import contextlib

    model = model or setup.model
    ctx = hooks_context or contextlib.nullcontext
    gen = generate_fn(model, batch_size=setup.batch_size)
    t0 = time.perf_counter()
    with ctx():
        nll = nll_fn(model, batch_size=setup.batch_size) if with_probs else None  # answer_prob on every split
        results = evaluate_benchmark(setup.bench, gen, nll, batch_size=setup.batch_size, progress=setup.progress)
        checks = refusal_checks(setup.bench, gen, batch_size=setup.batch_size, progress=setup.progress)
        probs = ratios = None
        if nll is not None:
            probs = answer_probs(setup.bench.forget, nll)
            ratios = truth_ratios(setup.bench.forget, nll) if truth_ratio_items(setup.bench.forget) else None
    infer_s = time.perf_counter() - t0
    extra = {"refusal": checks}
    if probs is not None:
        extra["forget_answer_probs"] = probs
    if ratios is not None:
        extra["forget_truth_ratios"] = ratios
    return results, extra, infer_s


def variant_config(model: HookedVLM, name: str, config: EraserConfig | None = None
                   ) -> tuple[EraserConfig, dict[str, Any]]:
    """``(config, switches)`` for variant ``name`` on ``model``: ``config`` (default: EraserConfig()) with the
    variant's field changes and its ``stack`` switch resolved to layers, and every switch of
    :data:`~eraser.variants.ERASER_VARIANTS` (``pgd``, ``gated``, ...), for callers that fit by hand."""
    if name not in ERASER_VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose one of {sorted(ERASER_VARIANTS)}")
    opts = ERASER_VARIANTS[name]
    config = config or EraserConfig()
    config = replace(config, **{k: v for k, v in opts.items() if k not in NOT_CONFIG})
    if opts.get("stack"):
        layers = config.layers if config.layers is not None else range(1, model.n_layers)
        stack, steered = stacked_layers(layers, opts["stack"])
        config = replace(config, gate_stack=stack, layers=steered)
    return config, dict(opts)


def retain_budget(model: HookedVLM, config: EraserConfig, opts: dict[str, Any]) -> int | None:
    """How many retain queries a variant's statistics stream: ``retain_per_feature`` x the gate's width, or all.

    Why per feature: the retain second moment is F x F (F = d_model, or the stacked layers' width), and it
    needs a few samples per feature to be estimated, not every retain question.  Streaming them is most of a
    fit's cost (4125 of the ~4300 queries a default-model fit streams, ~85 % of its time), so a sample
    bounded by the width makes the fit cost independent of how many retain questions there are, and it
    scales to 7B widths.
    """
    k = opts.get("retain_per_feature")
    if k is None:
        return None
    if k <= 0:
        raise ValueError(f"retain_per_feature must be > 0, got {k!r}")
    width = (len(config.gate_stack) if config.gate_stack else 1) * model.d_model
    return math.ceil(k * width)


def fit_eraser(setup: Setup, name: str = "mllmeraser", config: EraserConfig | None = None, pgd: Any = None
               ) -> tuple[MLLMEraser, FitStats, EraserConfig, dict[str, Any], dict[str, float]]:
    """The fit alone of variant ``name``: PGD recall pairs, streaming statistics, closed-form solve.

    Returns ``(eraser, stats, config, switches, timing)``; the eraser has the config's default settings
    (:func:`fit_variant` then chooses them).  This is what a fit time measures, here and in
    ``analyses.bench_fit``, so both time the same code.
    """
    config, opts = variant_config(setup.model, name, config)
    if opts.get("pgd", True) is False:
        pgd = None
    elif pgd is None:
        from .pgd import PGDConfig

        pgd = PGDConfig()
    t0 = time.perf_counter()
    data = fit_data(setup.model, setup.bench, seed=setup.seed, pgd=pgd, source=setup.source,
                    # a local benchmark has no generator to draw the extra retain requests with
                    retain_requests=opts.get("retain_requests", False) and setup.source is not None,
                    retain_limit=retain_budget(setup.model, config, opts))
    pgd_s = time.perf_counter() - t0
    stats = MLLMEraser.collect_stats(setup.model, data.forget, data.retain, data.recall, data.erase, config,
                                     progress=setup.progress, forget_concepts=data.forget_concepts)
    eraser = MLLMEraser.from_stats(stats, config)
    return eraser, stats, config, opts, {"pgd_s": pgd_s, "fit_s": time.perf_counter() - t0}


def fit_variant(setup: Setup, name: str = "mllmeraser", config: EraserConfig | None = None,
                pgd: Any = None, auto: bool = True, grid: Any = None, auto_gate: bool = True
                ) -> tuple[MLLMEraser, Selection | None, dict[str, float]]:
    """Fit one MLLMEraser variant and choose its settings automatically; returns timings too.

    With ``auto``: gamma and the null-space rule by gate separation (:func:`~eraser.autotune.choose_gate`,
    unless ``auto_gate=False`` or the variant is ungated), then the strength by constrained forgetting
    (:func:`~eraser.autotune.choose_strength`), then, for a variant that steers answer tokens, the fewest answer
    steps that forget as much (:func:`~eraser.autotune.choose_answer_steps`), all on the validation split.  ``fit_s`` is the fit alone
    (:func:`fit_eraser`: PGD, statistics, closed-form solve), comparable to a baseline's training time; the
    choice is ``select_s``.
    """
    t0 = time.perf_counter()
    eraser, stats, config, opts, timing = fit_eraser(setup, name, config, pgd)
    pgd_s, fit_s = timing["pgd_s"], timing["fit_s"]
    selection = None
    if auto:
        val, kind = setup.validation()
        gate = None
        if opts.get("gated", True) and auto_gate:
            gate = choose_gate(setup.model, stats, val, config, batch_size=setup.batch_size,
                               window=opts.get("window", False))
            eraser = MLLMEraser.from_stats(stats, replace(config, **gate.config_changes())).scaled(gate.calibration)
        selection = choose_strength(setup.model, eraser, val, grid=grid or DEFAULT_GRID,
                                    batch_size=setup.batch_size, validation=kind, progress=setup.progress,
                                    gated=opts.get("gated", True), vanilla=setup.vanilla_validation())
        selection.gate = gate.to_dict() if gate is not None else None
        strength = selection.strength if selection.strength is not None else 0.0
        eraser = eraser.with_config(strength=strength)
        if eraser.config.answer_steps > 1:
            steps = choose_answer_steps(setup.model, eraser, val, selection, batch_size=setup.batch_size,
                                        progress=setup.progress)
            eraser = eraser.with_config(answer_steps=steps)
    eraser = replace(eraser, info={**eraser.info, "variant": name})  # saved with the artifact: what was fitted
    timing = {"pgd_s": pgd_s, "fit_s": fit_s, "select_s": time.perf_counter() - t0 - fit_s}
    return eraser, selection, timing


def run_methods(setup: Setup, methods: list[str], oracle: bool = True,
                erasers: dict[str, MLLMEraser] | None = None, journal: Any = None) -> dict[str, Any]:
    """Evaluate ``methods`` (vanilla and eraser variants); returns results.json's content minus nothing.

    ``oracle=False`` leaves out forget quality (the KS test against the retain-only oracle), so the
    oracle is never trained or loaded.  ``erasers`` maps method names (listed in ``methods``) to already
    fitted erasers, e.g. a saved artifact, which are evaluated as they are: no fit, no choice of settings.
    ``journal`` (a path) records each finished method (:func:`interp.sweep.run_sweep`, with the setup's config,
    the oracle switch and the given erasers' digests as its context): a killed evaluation run again with the
    same arguments skips what finished, and one under another context is refused, not mixed in.
    """
    erasers = dict(erasers or {})
    for given in erasers.values():  # before any evaluation: a wrong artifact should cost seconds, not a run
        given.check_model(setup.model)
        given.check_forget_set(forget_queries(setup.bench))
    unknown = [m for m in methods if m != "vanilla" and m not in erasers and m not in ERASER_VARIANTS]
    if unknown:
        raise ValueError(f"unknown method {unknown[0]!r}")
    oracle_cache: dict[str, Any] = {}

    def oracle_values(key: str, compute: Callable[[], Any]) -> Any:
        if key not in oracle_cache:
            oracle_cache[key] = compute()
        return oracle_cache[key]

    def evaluate_method(name: str) -> dict[str, Any]:
        selection = None
        if name == "vanilla":
            res, extra, infer_s = evaluate_model(setup)
            timing = {"fit_s": 0.0, "infer_s": infer_s}
        elif name in erasers:
            given = erasers[name]
            res, extra, infer_s = evaluate_model(setup, lambda: given.attached(setup.model))
            timing = {"fit_s": 0.0, "infer_s": infer_s}
        else:
            eraser, sel, fit_timing = fit_variant(setup, name)
            gated = ERASER_VARIANTS[name].get("gated", True)
            res, extra, infer_s = evaluate_model(setup, lambda: eraser.attached(setup.model, gated=gated))
            timing = {**fit_timing, "infer_s": infer_s}
            selection = sel.to_dict() if sel else None
        if "forget_answer_probs" in extra and oracle:
            probs = oracle_values("probs", lambda: answer_probs(setup.bench.forget, nll_fn(setup.oracle,
                                                                                          batch_size=setup.batch_size)))
            res["forget"]["forget_quality"] = forget_quality(extra["forget_answer_probs"], probs)
        if extra.get("forget_truth_ratios"):  # TOFU's truth ratio, and its forget quality (KS against the oracle's)
            ratios = extra["forget_truth_ratios"]
            res["forget"]["truth_ratio"] = sum(ratios) / len(ratios)
            if oracle:
                theirs = oracle_values("ratios", lambda: truth_ratios(setup.bench.forget, nll_fn(
                    setup.oracle, batch_size=setup.batch_size)))
                res["forget"]["forget_quality_truth_ratio"] = forget_quality(ratios, theirs)
        return {"results": res, "timing": timing, "selection": selection, "refusal": extra["refusal"]}

    config = setup.config()
    if journal is None:
        done = {name: evaluate_method(name) for name in methods}
    else:
        from interp.sweep import run_sweep

        context = {"config": config, "oracle": bool(oracle),
                   "erasers": {name: e.digest() for name, e in sorted(erasers.items())}}
        swept = run_sweep([{"method": m} for m in methods], lambda s: evaluate_method(s["method"]), journal,
                          progress=False, context=context)
        done = {r["setting"]["method"]: r["result"] for r in swept.records}
    out: dict[str, Any] = {"config": config, "methods": {}, "timing": {}, "checks": {}, "selection": {}}
    for name in methods:
        entry = done[name]
        out["methods"][name] = entry["results"]
        out["timing"][name] = entry["timing"]
        out["checks"][name] = entry["refusal"]
        if name != "vanilla":
            out["selection"][name] = entry["selection"]
    return out


def memorisation_checks(setup: Setup, vanilla: dict[str, dict[str, float]], refusal: dict[str, float],
                        oracle: bool = True) -> dict[str, Any]:
    """Did the vanilla model learn what it should, and does the oracle not know the forget set?

    ``oracle=False`` skips the oracle's check without training it (it costs as much as the model on a
    first run); ``checks["skipped"]`` then names it, so ``all_pass`` is never read as covering it.
    """
    bar = TARGETS  # the memorisation bar the vanilla model must clear before unlearning means anything
    checks: dict[str, Any] = {}
    for split in ("forget", "retain", "celebrity"):
        checks[f"{split}_cls_acc"] = {"value": vanilla[split]["cls_acc"], "min": bar["cls_acc"]}
        checks[f"{split}_gen_rougeL"] = {"value": vanilla[split]["gen_rougeL"], "min": bar["gen_rougeL"]}
    checks["test_cls_acc"] = {"value": vanilla["test"]["cls_acc"], "min": bar["test_cls_acc"]}
    checks["test_gen_rougeL"] = {"value": vanilla["test"]["gen_rougeL"], "min": bar["test_gen_rougeL"]}
    skipped = []
    for key, side in (("forbidden_refusal_rate", "min"), ("answerable_refusal_rate", "max")):
        if key in refusal:
            checks[key] = {"value": refusal[key], side: bar[key]}
        else:  # a benchmark without refusal requests (the real MLLMU-Bench)
            skipped.append(f"{key} (the benchmark has no such requests)")
    if oracle:
        known = evaluate_split(setup.bench.forget, generate_fn(setup.oracle, batch_size=setup.batch_size),
                               batch_size=setup.batch_size, progress=setup.progress)
        checks["oracle_forget_cls_acc"] = {"value": known["cls_acc"], "max": bar["oracle_forget_cls_acc"]}
    for c in checks.values():
        c["pass"] = bool(c["value"] >= c["min"]) if "min" in c else bool(c["value"] <= c["max"])
    checks["all_pass"] = all(c["pass"] for c in checks.values() if isinstance(c, dict))
    if not oracle:
        skipped.append("oracle_forget_cls_acc (" + ("--no-oracle" if setup.has_oracle else
                                                     "no retain-only oracle for this model: --oracle-model PATH") + ")")
    if skipped:
        checks["skipped"] = skipped
    return checks


#: What MLLMEraser must reach on the embedded default (issue: the method), checked per eraser method.
ERASER_BAR = {"forget_cls_acc_max": 0.05, "forget_gen_rougeL_max": 0.2, "forget_refusal_min": 0.9,
              "test_cls_acc_max": 0.15, "utility_drop_max": 0.03, "gibberish_max": 0.02}


def eraser_checks(vanilla: dict[str, dict[str, float]], res: dict[str, dict[str, float]]) -> dict[str, Any]:
    bar = ERASER_BAR
    checks: dict[str, Any] = {
        "forget_cls_acc": {"value": res["forget"]["cls_acc"], "max": bar["forget_cls_acc_max"]},
        "forget_gen_rougeL": {"value": res["forget"]["gen_rougeL"], "max": bar["forget_gen_rougeL_max"]},
        "forget_refusal_rate": {"value": res["forget"]["refusal_rate"], "min": bar["forget_refusal_min"]},
        "test_cls_acc": {"value": res["test"]["cls_acc"], "max": bar["test_cls_acc_max"]},
    }
    for split in ("retain", "celebrity"):
        checks[f"{split}_cls_drop"] = {"value": vanilla[split]["cls_acc"] - res[split]["cls_acc"],
                                       "max": bar["utility_drop_max"]}
        checks[f"{split}_gibberish_rate"] = {"value": res[split]["gibberish_rate"], "max": bar["gibberish_max"]}
    for c in checks.values():
        c["pass"] = bool(c["value"] >= c["min"]) if "min" in c else bool(c["value"] <= c["max"])
    checks["all_pass"] = all(c["pass"] for c in checks.values() if isinstance(c, dict))
    return checks
