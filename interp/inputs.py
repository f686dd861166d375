"""Encoding prompts and images into one left-padded batch, with modality masks.

Why our own encoder instead of each model's processor: the masks and the last
prompt index must mean the same thing on every architecture (an off-by-one
here is the most common bug in steering code, and the MLLMEraser release has
it), and Qwen2.5-VL's processor cannot be built without torchvision.  Each
adapter says how to format a chat turn, preprocess images and count image
tokens; everything else is shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from jaxtyping import Bool, Int
from PIL import Image
from torch import Tensor

from .adapters.base import ArchAdapter

ImageLike = Union[Image.Image, np.ndarray, None]
RowImages = Union[ImageLike, Sequence[Image.Image]]


class InputError(ValueError):
    """Bad prompts or images: the message names the row and the problem."""


@dataclass
class VLMInputs:
    """A left-padded batch ready for the model, with the positions of each modality.

    ``image_mask`` marks image-token positions, ``text_mask`` real text tokens
    (not padding, not image), and ``last_index`` the last prompt token of
    each row, the position MLLMEraser reads and steers.
    """

    input_ids: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    image_mask: Bool[Tensor, "batch pos"]
    text_mask: Bool[Tensor, "batch pos"]
    last_index: Int[Tensor, " batch"]
    image_kwargs: dict[str, Tensor] = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    n_images: list[int] = field(default_factory=list)
    labels: Optional[Int[Tensor, "batch pos"]] = None
    #: pass ``mm_token_type_ids`` (1 at image tokens) with images: the adapter's ``token_types`` (Qwen2.5-VL)
    token_types: bool = False

    @property
    def answer_mask(self) -> Optional[Bool[Tensor, "batch pos"]]:
        """Positions whose next token is an answer token (where the loss is read), when answers were encoded."""
        return None if self.labels is None else self.labels[:, 1:] != -100

    def model_kwargs(self) -> dict[str, Tensor]:
        """Keyword arguments to pass straight to ``hf_model(**kwargs)`` or ``hf_model.generate(**kwargs)``.

        For an architecture with ``token_types`` (Qwen2.5-VL), a batch with images also carries
        ``mm_token_type_ids``, derived from ``image_mask`` here so that row selections and repeats of the
        batch keep it consistent: the model needs it to give image tokens their 3-D rope positions.
        """
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.image_kwargs}
        if self.token_types and self.image_kwargs:
            kwargs["mm_token_type_ids"] = self.image_mask.long()
        return kwargs

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]

    def __len__(self) -> int:
        return self.batch_size

    @property
    def has_images(self) -> bool:
        return bool(self.image_kwargs)

    def map_tensors(self, fn: Any, **changes: Any) -> "VLMInputs":
        """A copy with ``fn`` applied to every tensor field (image kwargs included); ``changes`` replace other fields."""
        return replace(
            self,
            input_ids=fn(self.input_ids),
            attention_mask=fn(self.attention_mask),
            image_mask=fn(self.image_mask),
            text_mask=fn(self.text_mask),
            last_index=fn(self.last_index),
            labels=None if self.labels is None else fn(self.labels),
            image_kwargs={k: fn(v) for k, v in self.image_kwargs.items()},
            **changes,
        )

    def with_tokens(self, tokens: Int[Tensor, "batch n"]) -> "VLMInputs":
        """The batch with ``tokens`` appended to every row as text (attended, not image; labels, if any, -100
        there), ``last_index`` moved to the last appended token: prompt + the first answer tokens, teacher-forced,
        so that one forward pass gives the logits generation computed step by step."""
        tokens = torch.as_tensor(tokens, device=self.input_ids.device, dtype=self.input_ids.dtype)
        if tokens.ndim != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(f"tokens must be [batch, n] with batch {self.batch_size}, got shape {tuple(tokens.shape)}")
        n = tokens.shape[1]
        if n == 0:
            return self
        ones = torch.ones_like(tokens, dtype=self.attention_mask.dtype)
        text = torch.ones_like(tokens, dtype=torch.bool)
        return replace(
            self,
            input_ids=torch.cat([self.input_ids, tokens], 1),
            attention_mask=torch.cat([self.attention_mask, ones], 1),
            image_mask=torch.cat([self.image_mask, ~text], 1),
            text_mask=torch.cat([self.text_mask, text], 1),
            last_index=torch.full_like(self.last_index, self.input_ids.shape[1] + n - 1),
            labels=None if self.labels is None else torch.cat([self.labels, torch.full_like(tokens, -100)], 1),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "VLMInputs":
        """Move every tensor to ``device``; ``dtype`` applies to floating image tensors only."""

        def mv(t: Tensor) -> Tensor:
            t = t.to(device)
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return self.map_tensors(mv)


def _as_rgb(img: Any, row: int) -> Image.Image:
    """Accept PIL images of any mode and HxW / HxWx{1,3,4} arrays; anything else is an error naming the row.

    Arrays: uint8 as is; floats in [0, 1] are scaled to 0-255 (the convention of torchvision and matplotlib),
    other floats and integers must already lie in [0, 255].  Why so strict: a float image in [0, 1] cast to
    uint8 is silently black, and out-of-range values wrap around; both would run, and be wrong.
    """
    if isinstance(img, np.ndarray):
        if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] in (1, 3, 4))):
            raise InputError(f"row {row}: image array has shape {img.shape}; expected HxW or HxWx{{1,3,4}}")
        if img.dtype != np.uint8:
            if img.dtype == bool or not (np.issubdtype(img.dtype, np.floating) or np.issubdtype(img.dtype, np.integer)):
                raise InputError(f"row {row}: image array has dtype {img.dtype}; expected uint8, integers in "
                                 "[0, 255] or floats in [0, 1]")
            if img.size and not np.isfinite(img).all():
                raise InputError(f"row {row}: image array has NaN or infinite values")
            lo, hi = (float(img.min()), float(img.max())) if img.size else (0.0, 0.0)
            if np.issubdtype(img.dtype, np.floating) and lo >= 0.0 and hi <= 1.0:
                img = np.rint(img * 255.0)
            elif lo < 0.0 or hi > 255.0:
                raise InputError(f"row {row}: image array values span [{lo:g}, {hi:g}]; expected uint8 [0, 255] "
                                 "or floats in [0, 1]")
            elif np.issubdtype(img.dtype, np.floating) and not np.array_equal(img, np.rint(img)):
                raise InputError(f"row {row}: float image array with values up to {hi:g} is neither in [0, 1] "
                                 "nor whole numbers in [0, 255]")
            img = img.astype(np.uint8)
        img = Image.fromarray(img[..., 0] if img.ndim == 3 and img.shape[-1] == 1 else img)
    if not isinstance(img, Image.Image):
        raise InputError(f"row {row}: expected a PIL image, a numpy array or None, got {type(img).__name__}")
    if img.width < 1 or img.height < 1:
        raise InputError(f"row {row}: image has zero size {img.size}")
    return img if img.mode == "RGB" else img.convert("RGB")


def _row_images(entry: RowImages, row: int) -> list[Image.Image]:
    if entry is None:
        return []
    if isinstance(entry, (list, tuple)):
        return [_as_rgb(im, row) for im in entry]
    return [_as_rgb(entry, row)]


def encode_batch(
    adapter: ArchAdapter,
    tokenizer: Any,
    image_processor: Any,
    config: Any,
    images: Sequence[RowImages] | None,
    prompts: Sequence[str] | str,
    chat: bool = True,
    answers: Sequence[str] | None = None,
) -> VLMInputs:
    """Encode a batch: format each prompt, expand image placeholders, left-pad, build masks.

    ``images`` has one entry per prompt: None (text only), an image, or a list
    of images.  With ``chat=True`` the adapter's chat template wraps the prompt
    and inserts one placeholder per image unless the prompt already has them;
    with ``chat=False`` the prompt is used as is.  Either way the number of
    placeholders must equal the number of images.

    With ``answers``, each answer (plus EOS) is appended after its prompt and
    ``labels`` holds the answer token ids at their positions (-100 elsewhere),
    the standard causal-LM convention; ``last_index`` still points at the last
    *prompt* token.
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("encode() needs at least one prompt")
    if images is None:
        images = [None] * len(prompts)
    elif isinstance(images, Image.Image) or (isinstance(images, np.ndarray) and images.ndim in (2, 3)):
        if len(prompts) != 1:
            raise InputError(f"got one image for {len(prompts)} prompts; pass one entry (an image, a list of "
                             "images, or None) per prompt")
        images = [images]  # one prompt, one image: the bare form, like a bare prompt string
    images = list(images)
    if len(images) != len(prompts):
        raise InputError(f"got {len(images)} image entries for {len(prompts)} prompts; pass one entry (or None) per prompt")

    placeholder = adapter.image_placeholder
    image_token = adapter.image_token_id(config)
    placeholder_id = tokenizer.convert_tokens_to_ids(placeholder)
    if placeholder_id != image_token:
        raise InputError(f"tokenizer maps {placeholder!r} to {placeholder_id}, but the model's image token id is {image_token}")

    rows_imgs = [_row_images(e, i) for i, e in enumerate(images)]
    texts: list[str] = []
    for i, (p, imgs) in enumerate(zip(prompts, rows_imgs)):
        if not isinstance(p, str):
            raise InputError(f"row {i}: prompt must be a string, got {type(p).__name__}")
        n_ph = p.count(placeholder)
        if chat and n_ph == 0:
            text = adapter.chat_template(p, len(imgs))
        else:
            text = adapter.chat_template(p, 0) if chat else p
        n_ph = text.count(placeholder)
        if n_ph != len(imgs):
            raise InputError(
                f"row {i}: the prompt has {n_ph} image placeholder(s) {placeholder!r} but {len(imgs)} image(s) were given"
            )
        texts.append(text)

    flat = [im for imgs in rows_imgs for im in imgs]
    image_kwargs: dict[str, Tensor] = {}
    counts: list[int] = []
    if flat:
        if adapter.preprocess_images is None or image_processor is None:
            raise InputError(f"{adapter.name}: this model has no image processor, so it cannot take images")
        image_kwargs = adapter.preprocess_images(image_processor, flat)
        counts = adapter.tokens_per_image(config, image_kwargs)

    if answers is not None and len(answers) != len(prompts):
        raise InputError(f"got {len(answers)} answers for {len(prompts)} prompts")
    seqs: list[list[int]] = []
    n_answer: list[int] = []
    k = 0
    for row, (text, imgs) in enumerate(zip(texts, rows_imgs)):
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        out: list[int] = []
        for t in ids:
            if t == image_token:
                out.extend([image_token] * counts[k])
                k += 1
            else:
                out.append(t)
        if answers is not None:
            ans = tokenizer(" " + answers[row], add_special_tokens=False)["input_ids"]
            if tokenizer.eos_token_id is not None:
                ans = ans + [tokenizer.eos_token_id]
            n_answer.append(len(ans))
            out = out + ans
        else:
            n_answer.append(0)
        seqs.append(out)

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    width = max(len(s) for s in seqs)
    ids_t = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_t[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attn[i, width - len(s):] = 1
    image_mask = (ids_t == image_token) & attn.bool()
    text_mask = attn.bool() & ~image_mask
    last_index = torch.tensor([width - 1 - n for n in n_answer], dtype=torch.long)
    labels = None
    if answers is not None:
        labels = torch.full_like(ids_t, -100)
        for i, n in enumerate(n_answer):
            labels[i, width - n:] = ids_t[i, width - n:]
    return VLMInputs(
        input_ids=ids_t,
        attention_mask=attn,
        image_mask=image_mask,
        text_mask=text_mask,
        last_index=last_index,
        image_kwargs=image_kwargs,
        prompts=texts,
        n_images=[len(r) for r in rows_imgs],
        labels=labels,
        token_types=adapter.token_types,
    )
