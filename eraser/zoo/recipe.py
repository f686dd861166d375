"""Training recipes for the tiny "vanilla" models: everything that determines the weights, and its hash.

Why a frozen, JSON-serialisable dataclass: the checkpoint cache is keyed by
``recipe.hash()``, so two runs that would train different weights must have
different hashes and two runs that train the same weights must share one.
The hash covers every field plus :data:`CODE_VERSION`, which is bumped
whenever the training code changes what a recipe produces.

>>> r = Recipe.quick()
>>> r.hash() == Recipe.quick().hash()
True
>>> r.oracle_for(5).hash() != r.hash()
True
>>> Recipe.from_json(r.to_json()) == r
True
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Mapping

#: Bump when the training code changes what a given recipe trains (invalidates every cached checkpoint).
CODE_VERSION = "zoo-5"
#: Per-architecture changes to what training produces, in the hash of that architecture's recipes only (so a
#: change that cannot affect the other architecture does not retrain its cached models).  ``mrope-1``: Qwen2.5-VL
#: batches carry ``mm_token_type_ids``, so image tokens get their 3-D rope positions (before, 1-D positions).
ARCH_CODE_VERSION: dict[str, str] = {"qwen2_5_vl": "mrope-1"}

ARCHS = ("llava", "qwen2_5_vl")

#: Model sizes per architecture for :meth:`Recipe.default` (``interp.tiny.tiny_vlm`` overrides).
DEFAULT_MODEL: dict[str, dict[str, Any]] = {
    "llava": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, vision_d_model=96, vision_layers=2,
                  vision_heads=3, image_size=32, patch_size=8, vision_feature_layer=-1),
    "qwen2_5_vl": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, vision_d_model=96, vision_layers=2,
                       vision_heads=3, image_size=32, patch_size=4),
}
QUICK_MODEL: dict[str, dict[str, Any]] = {
    "llava": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=4, vision_d_model=64, vision_layers=2,
                  vision_heads=2, image_size=32, patch_size=8, vision_feature_layer=-1),
    "qwen2_5_vl": dict(d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, vision_d_model=64, vision_layers=2,
                       vision_heads=2, image_size=32, patch_size=4),
}


#: Fields added after ``zoo-5`` checkpoints existed; omitted from :meth:`Recipe.to_dict` at their defaults.
_LATE_FIELDS = ("recognition_epochs", "fact_epochs", "recognition_lr", "recognition_batch", "mixture_hold",
                "mixture_restart", "match_epochs", "gen_repeat", "prompt_weight")


def _freeze(mapping: Mapping[str, Any] | tuple) -> tuple[tuple[str, Any], ...]:
    items = mapping.items() if isinstance(mapping, Mapping) else mapping
    return tuple(sorted((str(k), v) for k, v in items))


@dataclass(frozen=True)
class Recipe:
    """How to train one tiny vanilla (or retain-only oracle) model on MiniMLLMU.

    Stage 1 ("celebrity") teaches the celebrities ("pre-existing
    knowledge"); stage 2 ("main") teaches the fictitious profiles (all of
    them, or only the retained ones for an ``oracle``), the refusal
    behaviour, and replays ``celeb_replay`` of the celebrity examples so they
    are not forgotten.  Every epoch draws fresh question instances (new
    distractors and letter order) and jittered images.

    Without a curriculum (the quick recipe), each stage is one mixture of
    every task (``celeb_epochs``, ``main_epochs``) under one warmup + cosine
    schedule.  With one (``recognition_epochs``/``fact_epochs`` > 0, the
    default recipe), each stage first teaches only who is in the image (the
    VQA name question, ``recognition_epochs`` at ``recognition_lr``), then
    every fact in generation and cloze form plus the refusals
    (``fact_epochs``), then the mixture with multiple choice; see
    :mod:`eraser.zoo.train` for why.  ``match_epochs`` > 0 puts an
    option-matching warm-up before everything (multiple choice with the answer
    given, :func:`eraser.zoo.train.match_examples`); no preset uses it yet.

    ``model`` holds :func:`interp.tiny.tiny_vlm` overrides (stored as sorted
    pairs so the dataclass stays hashable; read it with
    :attr:`model_overrides`).  ``forget_ratio`` only matters for an oracle and
    is normalised to None otherwise, so a vanilla recipe has one hash.
    """

    arch: str = "llava"
    model: tuple[tuple[str, Any], ...] = field(default_factory=lambda: _freeze(DEFAULT_MODEL["llava"]))
    # data (MiniMLLMU)
    data_seed: int = 0
    n_profiles: int = 100
    n_celebrities: int = 30
    data_image_size: int = 64
    n_refusal_eval: int = 100
    # optimisation
    init_std: float = 0.1
    lr: float = 1e-3
    min_lr_frac: float = 0.05
    warmup_steps: int = 30
    weight_decay: float = 0.01
    batch_size: int = 16
    grad_clip: float = 1.0
    celeb_epochs: int = 6
    main_epochs: int = 16
    celeb_replay: float = 0.3
    cls_repeat: int = 6
    cls_weight: float = 1.0
    # how many instances of every generation and cloze question one epoch holds (classification: ``cls_repeat``)
    gen_repeat: int = 1
    # weight of the next-token loss on the prompt's own text tokens, next to the answer loss (0 = answers only)
    prompt_weight: float = 0.0
    refusal_per_profile: int = 1
    refusal_formats: tuple[str, ...] = ("generation", "classification", "cloze")
    clean_prob: float = 0.25
    # the curriculum (0 = off): before each stage's mixture, teach who is in the image, then the facts
    recognition_epochs: int = 0
    fact_epochs: int = 0
    recognition_lr: float = 2e-3
    recognition_batch: int = 26
    # a curriculum mixture's schedule: after ``mixture_restart`` epochs (0 = never) the rate warms up again (one
    # warm restart); the last cycle holds the full rate for ``mixture_hold`` of its epochs before its cosine decay
    mixture_restart: int = 0
    mixture_hold: float = 0.0
    # the option-matching warm-up (0 = off): before anything else, multiple choice with the answer given first
    match_epochs: int = 0
    # torch CPU threads while training: the thread count changes the order of float reductions, so the same
    # recipe trained with 1 and with 2 threads gives different weights (measured); it is part of the recipe
    threads: int = 2
    # what is learned
    oracle: bool = False
    forget_ratio: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {ARCHS}")
        object.__setattr__(self, "model", _freeze(self.model))
        object.__setattr__(self, "refusal_formats", tuple(self.refusal_formats))
        from eraser.data.mini import REFUSAL_FORMATS

        if not self.refusal_formats or set(self.refusal_formats) - set(REFUSAL_FORMATS):
            raise ValueError(f"refusal_formats must be a non-empty subset of {REFUSAL_FORMATS}")
        if self.oracle:
            from eraser.data.mini import FORGET_RATIOS

            if self.forget_ratio not in FORGET_RATIOS:
                raise ValueError(f"an oracle recipe needs forget_ratio in {FORGET_RATIOS}, got {self.forget_ratio!r}")
        elif self.forget_ratio is not None:
            object.__setattr__(self, "forget_ratio", None)  # irrelevant for a vanilla model: one hash
        for name in ("batch_size", "n_profiles", "threads", "recognition_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.celeb_epochs < 0 or self.main_epochs < 1 or self.cls_repeat < 1 or self.gen_repeat < 1:
            raise ValueError("need celeb_epochs >= 0, main_epochs >= 1, cls_repeat >= 1, gen_repeat >= 1")
        if not (0.0 <= self.prompt_weight < float("inf")):
            raise ValueError(f"prompt_weight must be finite and >= 0, got {self.prompt_weight!r}")
        if self.recognition_epochs < 0 or self.fact_epochs < 0 or self.recognition_lr <= 0:
            raise ValueError("need recognition_epochs >= 0, fact_epochs >= 0, recognition_lr > 0")
        if not 0.0 <= self.celeb_replay <= 1.0 or not 0.0 <= self.clean_prob <= 1.0:
            raise ValueError("celeb_replay and clean_prob must lie in [0, 1]")
        if not 0.0 <= self.mixture_hold < 1.0:
            raise ValueError(f"mixture_hold must lie in [0, 1), got {self.mixture_hold!r}")
        if self.match_epochs < 0:
            raise ValueError(f"match_epochs must be >= 0, got {self.match_epochs!r}")
        if self.mixture_restart < 0:
            raise ValueError(f"mixture_restart must be >= 0, got {self.mixture_restart!r}")
        if (self.mixture_hold or self.mixture_restart) and not self.curriculum:
            raise ValueError("mixture_hold and mixture_restart shape a curriculum's mixture; without one "
                             "(recognition_epochs = fact_epochs = 0) one schedule spans the whole run")

    # ----- presets --------------------------------------------------------------------------------
    @classmethod
    def default(cls, arch: str = "llava", **changes: Any) -> "Recipe":
        """The recipe behind ``mllmeraser demo``: MiniMLLMU defaults (100 profiles, 30 celebrities).

        A curriculum (see the class docstring): per stage, 75 epochs of "who is in the image", 12 of facts
        in generation and cloze form, then the mixture: 24 epochs under one cosine, then a warm restart of 26
        epochs (fresh optimizer state, 60 % held at the full rate, then decayed), which is what teaches
        multiple choice (see :mod:`eraser.zoo.train`); the celebrities' stage has no mixture of its own (all
        of their examples are replayed in the main one).  Measured (2 CPU cores, 2568 s, seed 0, forget 5 %):
        multiple choice 0.945 forget / 0.927 Test (new photos) / 0.956 retain / 0.961 celebrity, generation
        ROUGE-L and cloze 1.00 everywhere, forbidden requests refused 100 %, normal ones 0 %.  Without the
        restart (24 cosine epochs, 1317 s) multiple choice stayed at 0.36-0.44; without the curriculum (16
        mixture epochs, 630 s) the model named 9 % of the portraits.
        ``changes`` replace fields; ``model={...}`` is merged into the preset model sizes.
        """
        base = dict(recognition_epochs=75, fact_epochs=12, celeb_epochs=0, main_epochs=50, mixture_restart=24,
                    mixture_hold=0.6, celeb_replay=1.0)
        return cls._preset(arch, DEFAULT_MODEL, base, changes)

    @classmethod
    def quick(cls, arch: str = "llava", **changes: Any) -> "Recipe":
        """A small recipe for tests and ``demo --quick``: 20 profiles, 6 celebrities, a smaller vision tower.

        Trains in ~6 min on 2 CPU cores (the 60 s the issue asks for is not met).  36 main epochs, because
        the transition out of the multiple-choice plateau moves with float noise: at 20, the same recipe
        trained with 1 instead of 2 threads learned multiple choice to 0.80-0.86 instead of 0.94-1.00; at 28,
        earlier sessions' machines reached 0.94-0.96 on retain/celebrity and an AMD EPYC machine (same library
        versions, same threads, different kernels) 0.895 / 0.879, under the bar; at 36 it reaches 0.995 / 1.00.

        Faster recipes that know their facts exist (``gen_repeat=3, prompt_weight=0.5``, 16 main epochs, batch
        32, lr 2e-3: 142 s at d_model 64, 190 s at 96, 260 s at 128), but on each of them one of the eraser's
        method-bar tests failed (README, "Training budget"), so this preset stays the one they were measured on.
        """
        base = dict(n_profiles=20, n_celebrities=6, n_refusal_eval=40, celeb_epochs=8, main_epochs=36,
                    celeb_replay=1.0)
        return cls._preset(arch, QUICK_MODEL, base, changes)

    @classmethod
    def _preset(cls, arch: str, models: dict, base: dict, changes: dict) -> "Recipe":
        if arch not in ARCHS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {ARCHS}")
        changes = dict(changes)
        model = {**models[arch], **dict(changes.pop("model", {}))}
        return cls(arch=arch, model=_freeze(model), **{**base, **changes})

    def oracle_for(self, forget_ratio: int) -> "Recipe":
        """The retain-only oracle of this recipe for one forget ratio (never sees those forget profiles)."""
        return dataclasses.replace(self, oracle=True, forget_ratio=forget_ratio)

    def vanilla(self) -> "Recipe":
        """The vanilla model of this recipe (sees every fictitious profile)."""
        return dataclasses.replace(self, oracle=False, forget_ratio=None)

    def replace(self, **changes: Any) -> "Recipe":
        return dataclasses.replace(self, **changes)

    # ----- views ----------------------------------------------------------------------------------
    @property
    def curriculum(self) -> bool:
        """Whether each stage first teaches recognition and facts (see the class docstring)."""
        return self.recognition_epochs > 0 or self.fact_epochs > 0

    @property
    def model_overrides(self) -> dict[str, Any]:
        return dict(self.model)

    def mini(self):
        """The :class:`~eraser.data.mini.MiniMLLMU` generator this recipe trains on (and must be evaluated on)."""
        from eraser.data.mini import MiniMLLMU

        return MiniMLLMU(seed=self.data_seed, n_profiles=self.n_profiles, n_celebrities=self.n_celebrities,
                         image_size=self.data_image_size, n_refusal_eval=self.n_refusal_eval)

    def benchmark(self, forget_ratio: int = 5):
        """The :class:`~eraser.data.schema.Benchmark` of one forget ratio, as this recipe's model saw its data."""
        return self.mini().build(forget_ratio)

    # ----- serialisation --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Every field, except curriculum fields at their defaults.

        Why the exception: those fields postdate checkpoints trained without a
        curriculum; leaving them out when unused keeps those recipes' hashes (and
        cached weights) valid.  ``from_dict`` fills them back in.
        """
        d = dataclasses.asdict(self)
        d["model"] = dict(self.model)
        for f in dataclasses.fields(self):
            if f.name in _LATE_FIELDS and d[f.name] == f.default:
                del d[f.name]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Recipe":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown recipe field(s) {sorted(unknown)}")
        return cls(**{k: (_freeze(v) if k == "model" else v) for k, v in d.items()})

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        return cls.from_dict(json.loads(text))

    def hash(self, length: int = 16) -> str:
        """Stable sha256 over the recipe's JSON, :data:`CODE_VERSION` and the architecture's entry of
        :data:`ARCH_CODE_VERSION` if it has one (hex, first ``length`` chars)."""
        code = {"code_version": CODE_VERSION}
        if self.arch in ARCH_CODE_VERSION:
            code["arch_code_version"] = ARCH_CODE_VERSION[self.arch]
        payload = json.dumps({**code, "recipe": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:length]

    def describe(self) -> str:
        kind = f"oracle(forget {self.forget_ratio}%)" if self.oracle else "vanilla"
        m = self.model_overrides
        return (f"{self.arch} {kind}: d_model {m.get('d_model')} x {m.get('n_layers')} layers, "
                f"{self.n_profiles} profiles + {self.n_celebrities} celebrities, "
                f"{self.celeb_epochs}+{self.main_epochs} epochs, batch {self.batch_size}, lr {self.lr}"
                + (f", curriculum {self.recognition_epochs} recognition + {self.fact_epochs} fact epochs per stage"
                   if self.curriculum else "")
                + (f", warm restart after {self.mixture_restart} mixture epochs" if self.mixture_restart else "")
                + (f", mixture held {self.mixture_hold:.0%} of its epochs before decaying" if self.mixture_hold else "")
                + (f", {self.match_epochs} option-matching warm-up epochs" if self.match_epochs else ""))
