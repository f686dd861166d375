"""MLLMEraser: fit an input-aware erasure steering on a HookedVLM and attach it reversibly.

>>> from eraser import MLLMEraser, EraserConfig                       # doctest: +SKIP
>>> eraser = MLLMEraser.fit(model, forget=f, retain=r, recall_pairs=rp, erase_pairs=ep, config=EraserConfig())
>>> with eraser.attached(model, strength=-0.25):
...     out = model.generate(inputs, max_new_tokens=32)
>>> eraser.save("eraser.safetensors"); MLLMEraser.load("eraser.safetensors", model)

Nothing touches the weights: ``attached`` registers one hook per steered
layer and removes it on exit, so outputs after detaching are bit-identical
to vanilla.  Queries are ``(image_or_None, prompt)`` pairs.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from interp import HookedVLM
from interp.fingerprint import fingerprint_mismatch, model_fingerprint

from .artifact import ArtifactError, ArtifactMismatchError, check_fingerprint, read_artifact, write_artifact
from .config import APPLICATION_FIELDS, EraserConfig
from .direction import ErasureDirection, directions_from_pairs, first_answer_means
from .features import check_stack, gate_row_stream, gate_rows
from .gate import NullSpaceGate
from .nullspace import SecondMoment
from .queries import Query, hash_queries, split_queries
from .stats import FitStats, gates_from_stats
from .steer import gated_hook, stacked_hooks, static_hook

FORMAT = "mllmeraser.v1"


def check_nonzero(layers: Sequence[int], directions: Tensor) -> None:
    """Refuse directions that are exactly zero at some layer: steering along them would do nothing, silently."""
    zero = [l for l, v in zip(layers, directions) if not bool(v.abs().max() > 0)]
    if zero:
        raise ValueError(f"the erasure direction is exactly zero at layers {zero}: the recall and erase pairs "
                         "give identical activations there (the same queries on both sides?), so steering "
                         "would do nothing")


@dataclass
class MLLMEraser:
    """Per steered layer ``l``: gate weights ``w_l`` and direction ``d_l`` (2d floats), plus provenance.

    With ``config.answer_steps``, ``d_answer`` adds one answer direction per steered layer.

    With ``config.concept_gates``, ``w`` holds one gate per forget concept, ``[n_layers, C, d]``, and
    ``info["concepts"]`` names them.  With ``config.gate_stack``, ``w`` has one row for all steered layers
    over the stacked features, ``[1, F]`` or ``[1, C, F]`` with ``F = len(gate_stack) * d``.
    """

    layers: list[int]
    w: Tensor  # [gate rows, d] or [gate rows, C, d]: rows = steered layers, or 1 stacked gate
    d: Tensor  # [n_layers, d]
    config: EraserConfig
    fingerprint: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    d_answer: Tensor | None = None  # [n_layers, d], the answer directions (config.answer_steps)

    # -- fitting -------------------------------------------------------------
    @classmethod
    def fit(cls, model: HookedVLM, forget: Sequence[Query], retain: Sequence[Query],
            recall_pairs: Sequence[Query], erase_pairs: Sequence[Query],
            config: EraserConfig = EraserConfig(), progress: bool = False,
            forget_concepts: Sequence[str] | None = None) -> "MLLMEraser":
        """Stage 1 (directions) and stage 2 (null-space gates) in four streaming passes over the data.

        ``forget_concepts`` labels each forget query with its concept (profile id); per-concept gates
        (``config.concept_gates``) need it.
        """
        stats = cls.collect_stats(model, forget, retain, recall_pairs, erase_pairs, config, progress, forget_concepts)
        return cls.from_stats(stats, config)

    @staticmethod
    def collect_stats(model: HookedVLM, forget: Sequence[Query], retain: Sequence[Query],
                      recall_pairs: Sequence[Query], erase_pairs: Sequence[Query],
                      config: EraserConfig = EraserConfig(), progress: bool = False,
                      forget_concepts: Sequence[str] | None = None) -> FitStats:
        """The four streaming passes: directions and the forget/retain second moments (see :class:`FitStats`).

        Why separate from :meth:`from_stats`: gamma, rho and the energy threshold only enter the closed-form
        solve, so an automatic choice of them (``eraser.autotune.choose_gate``) refits from these statistics
        in milliseconds instead of re-running the model.  With ``forget_concepts`` (one label per forget
        query) the forget sums are also kept per concept (``FitStats.S_f``), for per-concept gates.
        """
        t0 = time.perf_counter()
        layers = list(config.layers) if config.layers is not None else list(range(1, model.n_layers))
        bad = [l for l in layers if not 0 <= l < model.n_layers]
        if bad or not layers:
            raise ValueError(f"layers {bad or layers} are not decoder layers of this {model.n_layers}-layer model")
        if config.gate_stack:
            check_stack(config.gate_stack, layers, model.n_layers)
        names = [config.hook_name(l) for l in layers]
        rows = gate_rows(config, layers)
        sets = {k: split_queries(v, k) for k, v in
                (("forget", forget), ("retain", retain), ("recall", recall_pairs), ("erase", erase_pairs))}
        concepts: list[str] = []
        if forget_concepts is not None:
            forget_concepts = [str(c) for c in forget_concepts]
            if len(forget_concepts) != len(sets["forget"][1]):
                raise ValueError(f"{len(forget_concepts)} concept labels for {len(sets['forget'][1])} forget queries")
            concepts = list(dict.fromkeys(forget_concepts))
        elif config.concept_gates:
            raise ValueError("concept_gates needs forget_concepts: one concept label (profile id) per forget query")

        def gate_stream(key: str):  # what each gate row reads: [rows] of [batch, F]
            return gate_row_stream(model, list(zip(*sets[key])), config, layers, progress=progress, desc=key)

        directions = directions_from_pairs(model, sets["recall"], sets["erase"], names, config.batch_size, progress)
        answer_directions = None
        if config.answer_steps:
            first = {key: first_answer_means(model, *sets[key], names, config.answer_prefix, config.batch_size,
                                             progress, desc=f"{key} answer") for key in ("recall", "erase")}
            answer_directions = torch.stack([first["recall"][n] - first["erase"][n] for n in names])

        f = len(rows[0]) * model.d_model  # every row has the same width: one site, or the whole stack
        K_r = [SecondMoment(f) for _ in rows]
        for feats in gate_stream("retain"):
            for K, h in zip(K_r, feats):
                K.update(h)
        K_f = [SecondMoment(f) for _ in rows]
        device = K_r[0].K.device  # where the activations were (the statistics stay there: see SecondMoment)
        s_f = [torch.zeros(f, dtype=torch.float64, device=device) for _ in rows]
        S_f = [torch.zeros(len(concepts), f, dtype=torch.float64, device=device) for _ in rows]
        position = {c: i for i, c in enumerate(concepts)}
        index = torch.tensor([position[c] for c in forget_concepts], device=device) if concepts else None
        start = 0
        for feats in gate_stream("forget"):
            for i, h in enumerate(feats):
                K_f[i].update(h)
                h = h.to(device, torch.float64)
                s_f[i] += h.sum(0)
                if index is not None:
                    S_f[i].index_add_(0, index[start:start + h.shape[0]], h)
            start += feats[0].shape[0]
        return FitStats(
            layers=layers, site=config.site, directions=directions, answer_directions=answer_directions,
            K_r=torch.stack([K.K for K in K_r]), K_f=torch.stack([K.K for K in K_f]),
            s_f=torch.stack(s_f), gate_stack=list(config.gate_stack) if config.gate_stack else None,
            S_f=torch.stack(S_f) if concepts else None, concepts=concepts,
            counts={k: len(v[1]) for k, v in sets.items()},
            data_hashes={k: hash_queries(list(zip(*v))) for k, v in sets.items()},
            fingerprint=model_fingerprint(model), seconds=time.perf_counter() - t0)

    @classmethod
    def from_stats(cls, stats: FitStats, config: EraserConfig = EraserConfig()) -> "MLLMEraser":
        """The closed-form stage 2 (projector + ridge gate) on collected statistics; ``config`` sets rho/energy/gamma."""
        if config.site != stats.site:
            raise ValueError(f"statistics were collected at {stats.site!r}, config asks for {config.site!r}")
        if config.layers is not None and list(config.layers) != stats.layers:
            raise ValueError(f"statistics cover layers {stats.layers}, config asks for {list(config.layers)}")
        if config.answer_steps and stats.answer_directions is None:
            raise ValueError("answer_steps needs answer directions: collect the statistics with answer_steps > 0")
        if list(config.gate_stack or []) != list(stats.gate_stack or []):
            raise ValueError(f"statistics were collected for gate_stack {stats.gate_stack}, config asks for "
                             f"{config.gate_stack}")
        check_nonzero(stats.layers, stats.directions)
        t0 = time.perf_counter()
        ws, infos = gates_from_stats(stats, config)
        info = {
            "projector": dict(zip(map(str, stats.layers), infos)),
            "counts": dict(stats.counts),
            "data_hashes": dict(stats.data_hashes),
            "fit_s": stats.seconds + time.perf_counter() - t0,
        }
        if config.concept_gates:
            info["concepts"] = list(stats.concepts)
        d_answer = stats.answer_directions.float() if stats.answer_directions is not None else None
        return cls(layers=list(stats.layers), w=ws.float(), d=stats.directions.float(), config=config,
                   fingerprint=dict(stats.fingerprint), info=info, d_answer=d_answer)

    # -- applying --------------------------------------------------------------
    def _strengths(self, strength: float | Sequence[float] | dict[int, float] | None) -> dict[int, float]:
        """``{layer: strength}`` for every steered layer; a NaN or infinite strength is refused here, before
        it silently turns every steered activation into NaN."""
        if strength is None:
            strength = self.config.strength
        if isinstance(strength, dict):
            unknown = set(strength) - set(self.layers)
            if unknown:
                raise ValueError(f"strengths given for layers {sorted(unknown)} that this eraser does not steer")
            out = {l: float(strength.get(l, 0.0)) for l in self.layers}
        elif isinstance(strength, (list, tuple)):
            if len(strength) != len(self.layers):
                raise ValueError(f"{len(strength)} strengths for {len(self.layers)} layers")
            out = dict(zip(self.layers, map(float, strength)))
        else:
            out = {l: float(strength) for l in self.layers}
        bad = {l: v for l, v in out.items() if not math.isfinite(v)}
        if bad:
            raise ValueError(f"strengths must be finite numbers, got {bad} (layer: strength)")
        return out

    def hooks(self, strength: float | Sequence[float] | dict[int, float] | None = None,
              every_step: bool | None = None, gated: bool = True, record: list | None = None) -> list:
        """Hook specs ``[(name, fn), ...]`` for ``model.run_with_hooks`` / ``generate`` / ``hooks``.

        ``gated=False`` gives the static-steering ablation (same direction, no gate).
        """
        every = self.config.every_step if every_step is None else every_step
        if gated and self.config.gate_stack:
            steered = [(self.config.hook_name(l), self.d[i], lam, self._answer(i))
                       for i, (l, lam) in enumerate(self._strengths(strength).items()) if lam != 0.0]
            if not steered:
                return []
            return stacked_hooks([self.config.hook_name(l) for l in self.config.gate_stack], steered, self.w[0],
                                 every, record, read=self.config.gate_read, window=self.config.gate_window,
                                 answer_steps=self.config.answer_steps)
        specs = []
        for i, (l, lam) in enumerate(self._strengths(strength).items()):
            if lam == 0.0:
                continue
            fn = (gated_hook(self.w[i], self.d[i], lam, every, record, read=self.config.gate_read,
                             window=self.config.gate_window, answer_direction=self._answer(i),
                             answer_steps=self.config.answer_steps) if gated
                  else static_hook(self.d[i], lam, every))
            specs.append((self.config.hook_name(l), fn))
        return specs

    def _answer(self, i: int) -> Tensor | None:
        if not self.config.answer_steps:
            return None
        if self.d_answer is None:
            raise ValueError("this eraser has answer_steps but no answer directions (fit it with answer_steps > 0)")
        return self.d_answer[i]

    @contextlib.contextmanager
    def attached(self, model: HookedVLM, strength: float | Sequence[float] | dict[int, float] | None = None,
                 backend: str = "torch", every_step: bool | None = None, gated: bool = True) -> Iterator[HookedVLM]:
        """Steer every call on ``model`` inside the block; detaching restores vanilla outputs bit for bit.

        The gates and directions are moved to the model's device once here (see :meth:`to`), so a CPU
        artifact attached to a GPU model costs no host-to-device copy per hooked call.
        """
        self.check_model(model)
        with model.hooks(self.to(model.device).hooks(strength, every_step, gated), backend=backend):
            yield model

    def to(self, device: torch.device | str) -> "MLLMEraser":
        """This eraser with its tensors on ``device`` (itself when they are there already).

        Why: each hook moves what it reads to the activation's device, which for a loaded (CPU) artifact on a
        GPU model is a blocking copy per hooked layer and call; ``eraser.to(model.device).hooks()`` (what
        :meth:`attached` does) copies once.
        """
        tensors = [t for t in (self.w, self.d, self.d_answer) if t is not None]
        if all(t.device == torch.device(device) for t in tensors):
            return self
        return replace(self, w=self.w.to(device), d=self.d.to(device),
                       d_answer=None if self.d_answer is None else self.d_answer.to(device))

    # -- diagnostics ------------------------------------------------------------
    def gate_values(self, model: HookedVLM, queries: Sequence[Query], batch_size: int | None = None,
                    raw: bool = False) -> Tensor:
        """``[n_queries, n_layers]`` gate values on vanilla activations (what each layer's gate sees unsteered).

        They pass through the config's ``gate_window`` (what steering applies) unless ``raw``.
        """
        return self.gate.values(model, queries, batch_size or self.config.batch_size, raw)

    # -- the two stages as value objects ------------------------------------------------
    @property
    def direction(self) -> ErasureDirection:
        """Stage 1: the erasure directions (and answer directions, if fitted), as a value object of their own."""
        return ErasureDirection(list(self.layers), self.config.site, self.d, dict(self.fingerprint), self.d_answer,
                                self._info_for("counts", "recall", "erase"),
                                self._info_for("data_hashes", "recall", "erase"),
                                self.config.answer_prefix if self.d_answer is not None else None)

    def _info_for(self, key: str, *sets: str) -> dict[str, Any]:
        """``info[key]`` (per-set counts or data hashes) restricted to ``sets``: what one stage was fitted on."""
        return {k: v for k, v in (self.info.get(key) or {}).items() if k in sets}

    @property
    def gate(self) -> NullSpaceGate:
        """Stage 2: the null-space gates (with their calibration, window and read), as a value object of their own."""
        c = self.config
        concepts = list(self.info.get("concepts") or []) if c.concept_gates else []
        if c.concept_gates and len(concepts) != self.w.shape[1]:  # an artifact without its concepts' names
            concepts = [f"concept {i}" for i in range(self.w.shape[1])]
        stack = list(c.gate_stack) if c.gate_stack else None
        return NullSpaceGate(list(self.layers), c.site, self.w, c.gate_read, stack,
                             c.gate_window, concepts,
                             {"gamma": c.gamma, "rho": c.rho, "energy": c.energy, "use_null_space": c.use_null_space},
                             dict(self.info.get("projector") or {}), dict(self.fingerprint),
                             self._info_for("counts", "forget", "retain"),
                             self._info_for("data_hashes", "forget", "retain"))

    @classmethod
    def from_parts(cls, direction: ErasureDirection, gate: NullSpaceGate, **settings: Any) -> "MLLMEraser":
        """An eraser from a direction and a gate fitted separately (e.g. one seed's gate with another's direction,
        or a direction from image-only pairs): they must cover the same layers and site on the same model.

        ``settings`` are application settings (``strength``, ``every_step``, ``answer_steps``, ``batch_size``;
        see :meth:`with_config`); answer steering needs the direction's answer directions, which are kept whenever
        the direction has them (``answer_steps`` 0, the default, leaves them unused, as ``with_config`` does).
        """
        if direction.layers != gate.layers or direction.site != gate.site:
            raise ValueError(f"the direction covers layers {direction.layers} at {direction.site}, the gate "
                             f"{gate.layers} at {gate.site}: they must match")
        if direction.vectors.shape[-1] != gate.d_model:
            raise ArtifactMismatchError(f"the direction is {direction.vectors.shape[-1]} wide and the gate reads "
                                        f"{gate.d_model}-wide activations: they come from different models")
        diffs = (fingerprint_mismatch(direction.fingerprint, gate.fingerprint, ("direction", "gate"))
                 if direction.fingerprint and gate.fingerprint else [])
        if diffs:
            raise ArtifactMismatchError("the direction and the gate were fitted on different models: "
                                        + "; ".join(diffs))
        allowed = sorted(APPLICATION_FIELDS - {"gate_window"})
        fitted = set(settings) - set(allowed)
        if fitted:
            raise ValueError(f"from_parts takes application settings only ({allowed}), not {sorted(fitted)}"
                             + (": the window is the gate's" if "gate_window" in fitted else
                                ": the rest comes from the direction and the gate"))
        check_nonzero(direction.layers, direction.vectors)
        s = gate.settings
        config = EraserConfig(layers=tuple(gate.layers), site=gate.site, rho=s.get("rho", 0.3), energy=s.get("energy"),
                              gamma=s.get("gamma", 0.1), use_null_space=s.get("use_null_space", True),
                              gate_read=gate.read, gate_window=gate.window, concept_gates=bool(gate.concepts),
                              gate_stack=tuple(gate.stack) if gate.stack else None,
                              answer_prefix=direction.answer_prefix or "I", **settings)
        if config.answer_steps and direction.answer is None:
            raise ValueError("answer_steps > 0 needs answer directions; read the direction with answer_prefix")
        info: dict[str, Any] = {"projector": dict(gate.projector), "counts": {**gate.counts, **direction.counts},
                                "data_hashes": {**gate.data_hashes, **direction.data_hashes}}
        if gate.concepts:
            info["concepts"] = list(gate.concepts)
        return cls(list(gate.layers), gate.w, direction.vectors.float(), config,
                   dict(direction.fingerprint or gate.fingerprint), info,
                   direction.answer.float() if direction.answer is not None else None)

    def check_forget_set(self, forget: Sequence[Query]) -> None:
        """Refuse a forget set other than the one this eraser was fitted on (its queries' hash is in
        ``info["data_hashes"]``): an artifact fitted for forget 5 %, applied to the forget 10 % split, steers only
        some of the people the evaluation counts as forgotten.  Artifacts without the record pass."""
        fitted = (self.info.get("data_hashes") or {}).get("forget")
        if fitted is not None and fitted != hash_queries(forget):
            n = (self.info.get("counts") or {}).get("forget")
            raise ArtifactMismatchError(
                f"this eraser was fitted on another forget set ({n} queries, hash {fitted}) than the one given "
                f"({len(forget)} queries, hash {hash_queries(forget)}): use the same benchmark split "
                "(--forget-ratio, --seed) it was fitted on")

    def check_model(self, model: HookedVLM) -> None:
        check_fingerprint(self.fingerprint, model)

    def __repr__(self) -> str:
        # the dataclass repr would print every tensor (12k characters for the quick model's artifact)
        fp = self.fingerprint or {}
        changed = {k: v for k, v in asdict(self.config).items()
                   if v != getattr(EraserConfig, k, None) and k != "layers"}
        extra = f", d_answer {tuple(self.d_answer.shape)}" if self.d_answer is not None else ""
        return (f"MLLMEraser({fp.get('arch', '?')} d_model {fp.get('d_model', '?')}: layers {self.layers}, "
                f"w {tuple(self.w.shape)}, d {tuple(self.d.shape)}{extra}, {self.nbytes} bytes; config {changed})")

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w, self.d, self.d_answer) if t is not None)

    @property
    def release_form_nbytes(self) -> int:
        """Bytes the same steering would take stored as the release stores it: dense ``F x d`` matrices.

        The release keeps ``S_l = w_l d_l^T`` (``d x d``) per steered layer; this artifact keeps ``w_l`` and
        ``d_l``.  For the extensions the matrix form grows with what they add: a gate that reads ``F``
        stacked features needs ``F x d`` per steered layer, per-concept gates one matrix per concept (the
        max over concepts is not one linear map), and answer steering a second set for the answer
        direction.  So ``release_form_nbytes / nbytes`` is the saving of the rank-one form on the same
        steering, while ``len(layers) * d * d`` (what the benchmarks also print) is the paper method's size.
        Same element size as this artifact's tensors.
        """
        n_concepts = self.w.shape[1] if self.w.ndim == 3 else 1
        per_layer = n_concepts * self.w.shape[-1] * self.d.shape[-1] * (2 if self.d_answer is not None else 1)
        return len(self.layers) * per_layer * self.d.element_size()

    def digest(self, length: int = 16) -> str:
        """A short sha256 over the steering itself (layers, config, tensors): equal digests steer identically.

        Used to tie results to the artifact that produced them (a sweep's journal context)."""
        h = hashlib.sha256(json.dumps({"layers": self.layers, "config": asdict(self.config)}, sort_keys=True,
                                      default=str).encode())
        for t in (self.w, self.d, self.d_answer):
            if t is not None:
                h.update(str(tuple(t.shape)).encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:length]

    # -- persistence --------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {"format": FORMAT, "layers": self.layers, "config": asdict(self.config),
                "fingerprint": self.fingerprint, "info": self.info}

    def save(self, path: str | Path) -> Path:
        """One safetensors file; its header holds the JSON metadata.  Written atomically."""
        path = Path(path)
        if path.is_dir():
            path = path / "eraser.safetensors"
        return write_artifact(path, {"w": self.w, "d": self.d, "d_answer": self.d_answer}, "mllmeraser",
                              self.metadata())

    @classmethod
    def load(cls, path: str | Path, model: HookedVLM | None = None) -> "MLLMEraser":
        """Read an artifact (no code is executed: safetensors + JSON only); refuse it if ``model`` does not match."""
        path = Path(path)
        if path.is_dir():
            path = path / "eraser.safetensors"
        tensors, meta = read_artifact(path, "mllmeraser", FORMAT, "MLLMEraser artifact", tensors=("w", "d"),
                                      fields=("layers", "config", "fingerprint"))
        fp = meta["fingerprint"]
        layers = meta["layers"]
        depth = fp.get("n_layers") if isinstance(fp, dict) else None
        if (not isinstance(layers, list) or not layers
                or not all(isinstance(l, int) and not isinstance(l, bool) and l >= 0 for l in layers)
                or (isinstance(depth, int) and max(layers) >= depth)):
            raise ArtifactError(f"{path}: its steered layers {layers!r} are not layer indices of the "
                                f"{depth if depth is not None else '?'}-layer model it names")
        try:
            cfg = dict(meta["config"])
            if cfg.get("layers") is not None:
                cfg["layers"] = tuple(cfg["layers"])
            config = EraserConfig(**cfg)
        except (TypeError, ValueError) as e:  # an unknown field, or a value the config refuses
            raise ArtifactError(f"{path}: its metadata holds a config this version cannot use ({e})") from None
        if len(set(layers)) != len(layers) or (config.layers is not None and list(config.layers) != list(layers)):
            raise ArtifactError(f"{path}: its steered layers {layers} and its config's layers "
                                f"{None if config.layers is None else list(config.layers)} disagree (or repeat)")
        eraser = cls(layers=list(layers), w=tensors["w"], d=tensors["d"], config=config,
                     fingerprint=fp, info=meta.get("info", {}), d_answer=tensors.get("d_answer"))
        w, dd, n = eraser.w, eraser.d, len(eraser.layers)
        expected = 3 if eraser.config.concept_gates else 2
        stack = eraser.config.gate_stack
        rows, width = (1, len(stack) * dd.shape[-1]) if stack else (n, dd.shape[-1])
        if dd.ndim != 2 or dd.shape[0] != n or w.ndim != expected or w.shape[0] != rows or w.shape[-1] != width:
            raise ArtifactError(f"{path}: tensor shapes {tuple(w.shape)} / {tuple(dd.shape)} do not match "
                                f"{n} layers" + (" with per-concept gates" if eraser.config.concept_gates else "")
                                + (f" and a gate stacked over {len(stack)} layers" if stack else ""))
        if eraser.config.answer_steps and (eraser.d_answer is None or eraser.d_answer.shape != dd.shape):
            raise ArtifactError(f"{path}: answer_steps {eraser.config.answer_steps} needs answer directions of shape "
                                f"{tuple(dd.shape)}, found "
                                f"{None if eraser.d_answer is None else tuple(eraser.d_answer.shape)}")
        if model is not None:
            eraser.check_model(model)
        return eraser

    def scaled(self, factors: Sequence[float] | Sequence[Sequence[float]]) -> "MLLMEraser":
        """The same gates multiplied per layer by ``factors`` (a calibration: ``g -> factor * g``), recorded in info.

        Per-concept gates take one factor per layer and concept (``[n_layers][C]``), or one per layer.
        """
        if len(factors) != self.w.shape[0]:
            raise ValueError(f"{len(factors)} factors for " + ("1 stacked gate" if self.config.gate_stack
                                                                else f"{len(self.layers)} layers"))
        try:
            f = torch.tensor(factors, dtype=self.w.dtype, device=self.w.device)
        except (TypeError, ValueError) as e:
            raise ValueError(f"gate scale factors must be numbers, one per layer (and concept): {e}") from None
        if f.ndim == 2 and self.w.ndim == 3 and f.shape[1] in (1, self.w.shape[1]):
            f = f[..., None]
        elif f.ndim == 1:
            f = f.reshape(-1, *([1] * (self.w.ndim - 1)))
        else:
            raise ValueError(f"gate scale factors of shape {tuple(f.shape)} do not fit gates of shape "
                             f"{tuple(self.w.shape)}")
        if not torch.isfinite(f).all() or (f <= 0).any():
            raise ValueError(f"gate scale factors must be finite and positive, got {f.flatten().tolist()}")
        info = {**self.info, "gate_scale": f.reshape(len(self.layers), -1).squeeze(-1).tolist()}
        return replace(self, w=self.w * f, info=info)

    def with_config(self, **changes: Any) -> "MLLMEraser":
        """The same fitted gates with other application settings: ``strength``, ``every_step``,
        ``gate_window``, ``answer_steps`` (0 to drop answer steering, or another count when it was fitted)
        and ``batch_size``.

        Why only those: every other field (layers, site, gate_read, rho / energy / gamma, the null space,
        concept gates, the stack, the answer prefix) decides what the gates and directions *are*; changing it
        here would keep the fitted tensors while the config, and so a saved artifact, claimed otherwise (e.g.
        ``layers=(1,)`` still steered every fitted layer).  Refit with :meth:`fit` or :meth:`from_stats`.
        """
        fit_time = sorted(set(changes) - APPLICATION_FIELDS)
        if fit_time:
            raise ValueError(f"with_config() changes application settings only ({sorted(APPLICATION_FIELDS)}); "
                             f"{fit_time} decide what was fitted: refit with MLLMEraser.fit or from_stats "
                             "(from FitStats, the solve alone takes milliseconds)")
        if changes.get("answer_steps") and self.d_answer is None:
            raise ValueError("answer_steps > 0 needs answer directions, and this eraser was fitted without them "
                             "(fit with EraserConfig(answer_steps=...))")
        return replace(self, config=replace(self.config, **changes))
