"""HookedVLM: a Hugging Face vision-language model with TransformerLens hook names, run through nnsight.

Why nnsight underneath: the same intervention code then runs on a local tiny
model, on a 7B model sharded with ``device_map``, and (through nnsight) on
remote hosts.  Every nnsight call of the project lives in this module and
:mod:`interp.tracing`, so an nnsight API change is one diff.

>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None], prompts=["who is this person"])
>>> logits, cache = model.run_with_cache(inputs, names="blocks.*.hook_resid_post")
>>> cache.stack("blocks.*.hook_resid_post").shape[0]
2
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .adapters import ArchAdapter, adapter_for, get_module
from .adapters.base import Site
from .attention import eager_attention, tower_root
from .cache import ActivationCache
from .hooks import HookSpec, expand_hooks
from .inputs import RowImages, VLMInputs, encode_batch
from .names import NameFilter, all_hook_names, is_vision_side, parse_block_name, resolve_names
from .sites import head_counts, resolve_site
from . import torch_hooks, tracing

if TYPE_CHECKING:
    from .gradients import GradRun
    from .patching import Metric


@dataclass
class Generation:
    """Output of :meth:`HookedVLM.generate`: token ids and decoded answers (prompt excluded, stopped at EOS)."""

    sequences: Int[Tensor, "batch total"]
    new_tokens: Int[Tensor, "batch new"]
    texts: list[str]


def sequence_nll(logits: Float[Tensor, "batch pos vocab"], labels: Int[Tensor, "batch pos"]) -> Float[Tensor, " batch"]:
    """Mean NLL over each row's labelled tokens (labels are shifted: position t predicts t+1)."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tgt = labels[:, 1:]
    mask = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return -(tok * mask).sum(-1) / mask.sum(-1).clamp(min=1)


class HookedVLM:
    """A VLM with stable hook names, modality-aware caches, hooks, and hooked generation."""

    def __init__(self, hf_model: torch.nn.Module, tokenizer: Any, image_processor: Any = None,
                 adapter: ArchAdapter | None = None) -> None:
        self.hf_model = hf_model
        self.adapter = adapter or adapter_for(hf_model)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self._heads = head_counts(self.adapter, hf_model.config)
        self._names = all_hook_names(self.n_layers, self.n_vision_layers, self.adapter.lm_block.site_names(),
                                     self.adapter.vision_block.site_names())
        self._envoy = None
        self._remote_envoy = None
        self._persistent: list[tuple[str, Any]] = []  # nnsight-backend hooks added by `hooks()`

    # -- construction -----------------------------------------------------
    @classmethod
    def from_hf(cls, hf_model: torch.nn.Module, processor: Any = None, *, tokenizer: Any = None,
                image_processor: Any = None) -> "HookedVLM":
        """Wrap an existing transformers model.  ``processor`` may be a combined processor or a tokenizer."""
        if processor is not None:
            tokenizer = tokenizer or getattr(processor, "tokenizer", processor)
            image_processor = image_processor or getattr(processor, "image_processor", None)
        if tokenizer is None:
            raise ValueError("from_hf needs a processor or a tokenizer")
        return cls(hf_model, tokenizer, image_processor)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype | str | None = None,
                        device_map: Any = None, progress: bool = True, **kwargs: Any) -> "HookedVLM":
        """Load a checkpoint (a local directory works offline), its tokenizer and its image processor.

        ``progress=False`` hides transformers' "Loading weights" bar for this call only."""
        from transformers import AutoConfig, AutoTokenizer

        from .loading import load_image_processor, local_checkpoint, model_class_for, transformers_progress

        path_or_id = local_checkpoint(path_or_id)
        config = AutoConfig.from_pretrained(path_or_id)
        model_cls = model_class_for(config)
        with transformers_progress(progress):
            model = model_cls.from_pretrained(path_or_id, dtype=dtype, device_map=device_map, **kwargs).eval()
        tok = AutoTokenizer.from_pretrained(path_or_id)
        tok.padding_side = "left"
        return cls(model, tok, load_image_processor(path_or_id))

    def save_pretrained(self, path: str | Path) -> None:
        """Save model, tokenizer and image processor so :meth:`from_pretrained` restores the same model."""
        path = Path(path)
        self.hf_model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        if self.image_processor is not None:
            self.image_processor.save_pretrained(path)

    # -- facts -------------------------------------------------------------
    @property
    def arch(self) -> str:
        return self.adapter.name

    @property
    def n_layers(self) -> int:
        return self.adapter.n_layers(self.hf_model)

    @property
    def n_vision_layers(self) -> int:
        return self.adapter.n_vision_layers(self.hf_model)

    @property
    def vision_feature_blocks(self) -> tuple[int, ...]:
        """The vision blocks whose outputs the projector reads (LLaVA-1.5: the second-to-last; Qwen2.5-VL: the last).

        Why it matters: to change what the language model sees, edit ``vision.blocks.{l}.hook_resid_post`` of
        one of these (or ``projector.hook_in``).  ``vision.blocks.{l+1}.hook_resid_pre`` caches the same tensor,
        but an edit there reaches only the later vision blocks, whose output LLaVA never reads; -1 means the
        projector reads the patch embeddings.
        """
        return self.adapter.feature_blocks(self.hf_model.config, self.n_vision_layers)

    @property
    def d_model(self) -> int:
        return get_module(self.hf_model, self.adapter.lm_head).in_features

    @property
    def device(self) -> torch.device:
        return get_module(self.hf_model, self.adapter.lm_layers + ".0").input_layernorm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf_model.parameters()).dtype

    @property
    def W_U(self) -> Float[Tensor, "d_model vocab"]:
        """The unembedding as TransformerLens lays it out, ``[d_model, vocab]`` (a view of ``lm_head.weight``):
        ``resid @ model.W_U[:, good] - ...`` reads a logit direction."""
        return get_module(self.hf_model, self.adapter.lm_head).weight.detach().T

    @property
    def head_counts(self) -> dict[str, tuple[int, int]]:
        """``{"lm": (query heads, key/value heads), "vision": (...)}``: how the per-head sites split."""
        return dict(self._heads)

    def hook_names(self) -> list[str]:
        """Every valid hook name, in execution order: the residual-level sites, and inside each block the
        attention and MLP sites the architecture has (``blocks.{l}.attn.hook_z``, ``blocks.{l}.mlp.hook_post``, ...)."""
        return list(self._names)

    def module_for(self, name: str) -> torch.nn.Module:
        """The torch module a hook name lives on (after validating the name)."""
        return get_module(self.hf_model, self.site(name).module)

    def site(self, name: str) -> Site:
        """Where hook name ``name`` lives on this model: module path, input or output, and its accessors."""
        (name,) = resolve_names([name], self._names)
        return resolve_site(self.adapter, name, self._heads)

    def _eager_roots(self, names: Sequence[str]) -> tuple[str, ...]:
        """The towers whose attention must run eagerly for ``names`` (those that read an ``attn.hook_pattern``)."""
        towers = {p[0] for p in map(parse_block_name, names) if p is not None and p[2] == "attn.hook_pattern"}
        return tuple(tower_root(self.adapter, t) for t in sorted(towers))

    @property
    def envoy(self):
        """The nnsight wrapper of :attr:`hf_model` (built on first use)."""
        if self._envoy is None:
            self._envoy = tracing.wrap(self.hf_model)
        return self._envoy

    @property
    def remote_envoy(self):
        """A remotable nnsight wrapper (``nnsight.TransformersModel``) over the same weights, built on first use."""
        if self._remote_envoy is None:
            self._remote_envoy = tracing.wrap_remotable(self.hf_model, self.tokenizer)
        return self._remote_envoy

    # -- inputs ------------------------------------------------------------
    def encode(self, images: Sequence[RowImages] | None = None, prompts: Sequence[str] | str = (),
               chat: bool = True, answers: Sequence[str] | None = None) -> VLMInputs:
        """Batch prompts (and one image, list of images or None per prompt), left-padded, on the model's device.

        With ``answers`` the answers are appended (teacher forcing) and ``inputs.labels`` is set,
        for training and for scoring answers with :meth:`answer_nll`.
        """
        enc = encode_batch(self.adapter, self.tokenizer, self.image_processor, self.hf_model.config,
                           images, prompts, chat=chat, answers=answers)
        return enc.to(self.device, dtype=self.dtype)

    def answer_nll(self, inputs: VLMInputs, logits: Tensor | None = None, hooks: HookSpec | None = None,
                   ) -> Float[Tensor, " batch"]:
        """Mean token negative log-likelihood of each row's answer (inputs from ``encode(..., answers=...)``)."""
        if inputs.labels is None:
            raise ValueError("answer_nll needs inputs encoded with answers=[...]")
        if logits is None:
            logits = self.run_with_hooks(inputs, hooks or [])
        return sequence_nll(logits, inputs.labels)

    # -- running -----------------------------------------------------------
    def _plan(self, names: NameFilter, hooks: HookSpec | None, inputs: VLMInputs) -> tracing.Plan:
        cache_names = [] if names is None else resolve_names(names, self._names)
        hook_map = expand_hooks(list(self._persistent) + list(hooks or ()), self._names)
        wanted = set(cache_names) | set(hook_map)
        if not inputs.has_images:
            vision = sorted(n for n in wanted if is_vision_side(n))
            if vision:
                raise ValueError(f"{vision[:3]} are vision-side sites, but this batch has no images")
        ordered = [n for n in self._names if n in wanted]
        return tracing.Plan(
            sites=[(n, resolve_site(self.adapter, n, self._heads)) for n in ordered],
            hooks=hook_map,
            cache=set(cache_names),
            eager=self._eager_roots(ordered),
            attached=frozenset(id(fn) for _, fn in self._persistent),
        )

    def run_with_cache(self, inputs: VLMInputs, names: NameFilter = None, hooks: HookSpec | None = None,
                       remote: bool | str = False, stop_early: bool = False
                       ) -> tuple[Float[Tensor, "batch pos vocab"] | None, ActivationCache]:
        """One forward pass; returns logits and an :class:`ActivationCache` of ``names`` (if None, every name the
        batch runs: all of them, or without the vision tower's and projector's for a text-only batch).

        ``hooks`` run in the same pass, and cached values are the values after the hooks at that site.
        ``remote=True`` runs the trace on an NDIF host; ``remote="local"`` simulates that round trip here.
        ``stop_early=True`` (TransformerLens's ``stop_at_layer``, by name) halts the pass after the last site
        it caches or hooks and returns ``None`` for the logits: reading layer 15 of a 32-layer model then
        costs half a forward pass.  A call that reads (or hooks) an ``attn.hook_pattern`` runs that tower's
        attention eagerly for the call (:mod:`interp.attention`), since only eager attention builds the weights.
        """
        if names is None:  # every name the batch has: a text-only batch never runs the vision tower
            names = [n for n in self._names if inputs.has_images or not is_vision_side(n)]
        plan = self._plan(names, hooks, inputs)
        with torch_hooks.active_inputs(inputs), eager_attention(self.hf_model, plan.eager):
            logits, acts = tracing.run(self, inputs, plan, remote=remote, stop=stop_early)
        return logits, ActivationCache(acts, inputs.image_mask, inputs.text_mask, inputs.last_index,
                                       inputs.image_kwargs.get("image_grid_thw"))

    def run_with_hooks(self, inputs: VLMInputs, hooks: HookSpec, remote: bool | str = False
                       ) -> Float[Tensor, "batch pos vocab"]:
        """One forward pass with ``hooks = [(name, fn), ...]``; returns the logits (``remote`` as in run_with_cache)."""
        plan = self._plan(None, hooks, inputs)
        with torch_hooks.active_inputs(inputs), eager_attention(self.hf_model, plan.eager):
            logits, _ = tracing.run(self, inputs, plan, remote=remote)
        return logits

    def generate(self, inputs: VLMInputs, max_new_tokens: int = 32, hooks: HookSpec | None = None,
                 every_step: bool = False, **generate_kwargs: Any) -> Generation:
        """Greedy generation (by default) with hooks on the prefill pass only, or on every step.

        A hook marked :func:`~interp.hooks.first_steps` ``(fn, k)`` acts on its steps ``0..k`` either way (its
        mark says where it acts), as it does under the plain-PyTorch backend."""
        if max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if "backend" in generate_kwargs:
            raise TypeError("generate() takes no backend: attach hooks on a backend with model.hooks(hooks, "
                            "backend=...) (or eraser.attached(model, backend=...)) and call generate inside it")
        plan = self._plan(None, hooks, inputs)
        kwargs = dict(do_sample=False, pad_token_id=self.tokenizer.pad_token_id,
                      eos_token_id=self.tokenizer.eos_token_id)
        kwargs.update(generate_kwargs)
        with torch_hooks.active_inputs(inputs), eager_attention(self.hf_model, plan.eager):
            seqs = tracing.generate(self, inputs, plan, max_new_tokens, every_step, kwargs)
        new = seqs[:, inputs.input_ids.shape[1]:]
        return Generation(sequences=seqs, new_tokens=new, texts=self.decode(new))

    def generate_with_cache(self, inputs: VLMInputs, names: NameFilter = None, max_new_tokens: int = 32,
                            hooks: HookSpec | None = None, every_step: bool = False, **generate_kwargs: Any
                            ) -> tuple[Generation, ActivationCache]:
        """:meth:`generate`, also caching ``names`` on every step: an :class:`ActivationCache` over the prompt and
        the answer tokens fed back, the answer's positions in ``cache.answer_mask`` (:mod:`interp.recording`:
        why this and not a teacher-forced ``run_with_cache``, and what is recorded after which hooks)."""
        from .recording import generate_with_cache

        return generate_with_cache(self, inputs, names, max_new_tokens, hooks, every_step, **generate_kwargs)

    def run_with_grads(self, inputs: VLMInputs, names: NameFilter, metric: "Metric", hooks: HookSpec | None = None
                       ) -> "GradRun":
        """One forward and one backward pass: ``metric(logits, inputs)`` per row, and the activations at ``names``
        with the gradient of the summed metric at each (a :class:`~interp.gradients.GradRun`; weights untouched).
        The building block of attribution patching (:mod:`interp.attribution_patching`)."""
        from .gradients import run_with_grads

        return run_with_grads(self, inputs, names, metric, hooks)

    @contextlib.contextmanager
    def hooks(self, hooks: HookSpec, backend: str = "torch") -> Iterator["HookedVLM"]:
        """Attach hooks to every call inside the block; they are removed on exit, whatever happens.

        ``backend="torch"`` registers plain module hooks (no tracing cost; the
        deployment path); ``backend="nnsight"`` adds them to every trace's plan.
        Both call the hook functions with the same context and give the same outputs: in ``generate``, a
        function acts on every step (as a module hook does) unless it is marked
        :func:`~interp.hooks.prefill_only` / :func:`~interp.hooks.first_steps`.
        """
        hook_map = expand_hooks(hooks, self._names)  # validate names before touching anything
        if backend == "torch":
            handles = torch_hooks.register(self, hook_map)
            try:
                with eager_attention(self.hf_model, self._eager_roots(list(hook_map))):
                    yield self
            finally:
                torch_hooks.remove(handles)
        elif backend == "nnsight":
            added = [(n, fn) for n, fns in hook_map.items() for fn in fns]
            self._persistent.extend(added)
            try:
                yield self
            finally:
                # each block removes exactly its own entries (these tuple objects), also when blocks exit out
                # of order (two erasers attached, the first detached first), not the last len(added) entries
                mine = {id(e) for e in added}
                self._persistent[:] = [e for e in self._persistent if id(e) not in mine]
        else:
            raise ValueError(f"unknown hook backend {backend!r}; use 'torch' or 'nnsight'")

    # -- tokens (TransformerLens's names) ------------------------------------
    def to_single_token(self, text: str) -> int:
        """The id of ``text`` if it is exactly one token (no special tokens added): for logit-difference metrics.

        Raises with the pieces it splits into otherwise (with a sentencepiece tokenizer, ``" Paris"`` and
        ``"Paris"`` are different tokens: pass the form that follows the prompt).
        """
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            pieces = self.tokenizer.convert_ids_to_tokens(ids)
            raise ValueError(f"{text!r} is {len(ids)} tokens {pieces}, not one")
        unk = self.tokenizer.unk_token_id
        if unk is not None and ids[0] == unk and text != self.tokenizer.unk_token:
            # a word-level vocabulary maps every unknown word to one id: its logit says nothing about ``text``
            raise ValueError(f"{text!r} is not in the vocabulary: it tokenises to the unknown token "
                             f"{self.tokenizer.unk_token!r}")
        return int(ids[0])

    def to_tokens(self, text: str | Sequence[str], prepend_bos: bool = True) -> Int[Tensor, "batch pos"]:
        """Token ids of plain text, no chat template and no image: ``[batch, pos]``, left-padded, on the model's
        device (TransformerLens's ``to_tokens``).  For prompts with images use :meth:`encode`."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("to_tokens needs at least one string")
        # left whatever the tokenizer's own setting (a tokenizer passed to from_hf may pad right)
        enc = self.tokenizer(texts, add_special_tokens=prepend_bos, padding=True, padding_side="left",
                             return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def to_string(self, tokens: Int[Tensor, "... pos"] | Sequence[int]) -> str | list[str]:
        """Decode ids to text, special tokens included: one string for ``[pos]``, a list for ``[batch, pos]``
        (for answers cut at EOS, use :meth:`decode`)."""
        t = torch.as_tensor(tokens)
        if t.dim() == 2:
            return [self.tokenizer.decode(r.tolist()) for r in t]
        if t.dim() != 1:
            raise ValueError(f"to_string takes [pos] or [batch, pos] ids, got shape {tuple(t.shape)}")
        return self.tokenizer.decode(t.tolist())

    def to_str_tokens(self, x: str | VLMInputs | Tensor | Sequence[int], row: int = 0) -> list[str]:
        """One string per token, for labelling positions in plots (TransformerLens's ``to_str_tokens``).

        ``x`` is plain text (tokenised with special tokens, no chat template), ids ``[pos]``, or
        :class:`VLMInputs` (row ``row``): then the list has one entry per position of the batch, padding and
        image tokens included, so index ``p`` labels position ``p`` of the cache.
        """
        if isinstance(x, VLMInputs):
            if not -x.batch_size <= row < x.batch_size:
                raise IndexError(f"row {row} is out of range for a batch of {x.batch_size}")
            ids = x.input_ids[row]
        elif isinstance(x, str):
            ids = self.tokenizer(x)["input_ids"]
        else:
            ids = torch.as_tensor(x)
            if ids.dim() != 1:
                raise ValueError(f"to_str_tokens takes [pos] ids (or text, or VLMInputs), got shape {tuple(ids.shape)}")
        return self.tokenizer.convert_ids_to_tokens(torch.as_tensor(ids).tolist())

    def decode(self, tokens: Int[Tensor, "batch n"]) -> list[str]:
        """Decode answer tokens, cutting each row at its first EOS."""
        eos = self.tokenizer.eos_token_id
        texts = []
        for row in tokens.tolist():
            if eos is not None and eos in row:
                row = row[: row.index(eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    def __repr__(self) -> str:
        return (f"HookedVLM({self.arch}: {self.n_layers} LM blocks x d_model {self.d_model}, "
                f"{self.n_vision_layers} vision blocks, {len(self._names)} hook names)")
