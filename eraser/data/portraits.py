"""Procedurally drawn cartoon portraits for the embedded MiniMLLMU benchmark.

Why cartoons: the model that has to recognise these faces is a tiny LLaVA
(a few layers, trained from scratch on 2 CPU cores, images of 32-64 px).  It
can only learn identities that are carried by *bold, large colour regions*:
background, hair colour, skin, face outline, hair silhouette, a big
accessory.  Each identity is one combination of seven discrete attributes,
and :func:`sample_distinct_attrs` keeps every two identities at least
``min_hamming`` attributes apart, so that no single attribute (blurred by the
Test split's jitter, or simply too small to see, like the eye colour) is all
that separates two people.

A :class:`Jitter` (a few pixels of shift, a few percent of scale, a small
global colour cast) turns the canonical training portrait into a "new photo"
of the same person: that is how the Test split and the training-time
augmentation are made.  Drawing is plain ``ImageDraw`` on the target canvas,
no anti-aliasing, so an image is a pure function of (attrs, size, jitter):
identical bytes on every run, and well under a millisecond per image.
"""
from __future__ import annotations

import random
from dataclasses import astuple, dataclass, fields
from typing import Union

import numpy as np
from PIL import Image, ImageDraw

RandomLike = Union[random.Random, np.random.Generator]
RGB = tuple[int, int, int]

# Palettes: every pair of colours inside one palette is far apart (> 40 per
# channel somewhere), so a colour jitter of ~10 cannot turn one into another.
FACE_SHAPES: tuple[str, ...] = ("oval", "round", "square", "long")
SKIN_TONES: dict[str, RGB] = {
    "pale": (255, 226, 200), "light": (238, 190, 145), "tan": (205, 150, 100),
    "brown": (150, 100, 60), "dark": (95, 60, 35),
}
HAIR_COLOURS: dict[str, RGB] = {
    "black": (25, 25, 25), "brown": (115, 65, 25), "blonde": (240, 210, 100),
    "red": (205, 55, 15), "white": (240, 240, 240), "blue": (35, 60, 200),
}
HAIR_STYLES: tuple[str, ...] = ("bald", "short", "long", "spiky", "bun")
EYE_COLOURS: dict[str, RGB] = {
    "blue": (40, 120, 240), "green": (30, 170, 60), "brown": (110, 60, 20), "grey": (140, 140, 140),
}
ACCESSORIES: tuple[str, ...] = ("none", "glasses", "hat", "earrings", "bowtie")
BACKGROUNDS: dict[str, RGB] = {
    "red": (220, 50, 50), "orange": (245, 145, 30), "yellow": (240, 225, 60), "green": (60, 175, 70),
    "teal": (40, 175, 175), "blue": (55, 95, 215), "purple": (145, 60, 195), "pink": (245, 135, 195),
}

#: The allowed values of every attribute, in :class:`PortraitAttrs` field order.
ATTRIBUTE_VALUES: dict[str, tuple[str, ...]] = {
    "face_shape": FACE_SHAPES,
    "skin": tuple(SKIN_TONES),
    "hair_colour": tuple(HAIR_COLOURS),
    "hair_style": HAIR_STYLES,
    "eye_colour": tuple(EYE_COLOURS),
    "accessory": ACCESSORIES,
    "background": tuple(BACKGROUNDS),
}

_SHIRT: RGB = (120, 120, 130)
_INK: RGB = (20, 20, 20)
_MOUTH: RGB = (150, 30, 40)
_GOLD: RGB = (255, 200, 0)
_BOWTIE: RGB = (230, 20, 150)
_HATBAND: RGB = (200, 20, 20)
_EYE_WHITE: RGB = (250, 250, 250)

# Face bounding boxes in the 64-unit design frame (x0, y0, x1, y1).
_FACE_BOX: dict[str, tuple[float, float, float, float]] = {
    "oval": (21, 14, 43, 46), "round": (18, 16, 46, 44), "square": (19, 15, 45, 45), "long": (22, 11, 42, 48),
}


@dataclass(frozen=True)
class PortraitAttrs:
    """One identity's look: seven discrete attributes, each a name from :data:`ATTRIBUTE_VALUES`."""

    face_shape: str
    skin: str
    hair_colour: str
    hair_style: str
    eye_colour: str
    accessory: str
    background: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value not in ATTRIBUTE_VALUES[f.name]:
                raise ValueError(f"{f.name}={value!r} is not one of {ATTRIBUTE_VALUES[f.name]}")

    def hamming(self, other: PortraitAttrs) -> int:
        """Number of attributes in which the two identities differ."""
        return sum(a != b for a, b in zip(astuple(self), astuple(other)))

    @classmethod
    def random(cls, rng: RandomLike) -> PortraitAttrs:
        return cls(*(values[_randbelow(rng, len(values))] for values in ATTRIBUTE_VALUES.values()))


@dataclass(frozen=True)
class Jitter:
    """A "new photo" of the same person: shift (design-frame pixels), scale factor, and RGB colour cast."""

    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0
    colour: RGB = (0, 0, 0)

    @property
    def is_identity(self) -> bool:
        return self.dx == 0 and self.dy == 0 and self.scale == 1.0 and self.colour == (0, 0, 0)

    @classmethod
    def sample(
        cls,
        rng: RandomLike,
        max_shift: float = 3.0,
        max_scale: float = 0.08,
        max_colour: int = 12,
    ) -> Jitter:
        """Uniform shift in ``±max_shift`` units of a 64-px canvas, scale in ``1±max_scale``, colour in ``±max_colour``.

        The shift is at least half a unit in some direction whenever
        ``max_shift >= 1``, so a sampled jitter never reproduces the canonical
        image exactly (the Test split must show *new* images).
        """
        dx = round(_uniform(rng, -max_shift, max_shift), 2)
        dy = round(_uniform(rng, -max_shift, max_shift), 2)
        if max_shift >= 1 and max(abs(dx), abs(dy)) < 0.5:
            dx = 0.5 if dx >= 0 else -0.5
        scale = round(1.0 + _uniform(rng, -max_scale, max_scale), 3)
        colour = tuple(int(round(_uniform(rng, -max_colour, max_colour))) for _ in range(3))
        return cls(dx, dy, scale, colour)  # type: ignore[arg-type]


def draw_portrait(attrs: PortraitAttrs, size: int = 64, jitter: Jitter | None = None) -> Image.Image:
    """Render one portrait as a ``size`` x ``size`` RGB image.

    Geometry is designed in a 64-unit frame centred at (32, 32) and mapped to
    the canvas as ``(u - 32) * scale + shift``, so the same identity looks the
    same at 32 px and at 64 px.
    """
    j = jitter or Jitter()
    k = size / 64.0

    def pt(x: float, y: float) -> tuple[float, float]:
        return (size / 2 + ((x - 32) * j.scale + j.dx) * k, size / 2 + ((y - 32) * j.scale + j.dy) * k)

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        a, b = pt(x0, y0)
        c, d = pt(x1, y1)
        return (a, b, c, d)

    def w(units: float) -> int:
        return max(1, round(units * k * j.scale))

    img = Image.new("RGB", (size, size), BACKGROUNDS[attrs.background])
    d = ImageDraw.Draw(img)
    skin, hair = SKIN_TONES[attrs.skin], HAIR_COLOURS[attrs.hair_colour]
    x0, y0, x1, y1 = _FACE_BOX[attrs.face_shape]
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2

    d.ellipse(box(8, 50, 56, 84), fill=_SHIRT)  # shoulders
    if attrs.hair_style == "long":  # hair behind the head, down to the shoulders
        d.rectangle(box(x0 - 5, y0 + 2, x1 + 5, y1 + 10), fill=hair)
    d.rectangle(box(cx - 4, y1 - 4, cx + 4, 54), fill=skin)  # neck
    if attrs.face_shape == "square":
        d.rounded_rectangle(box(x0, y0, x1, y1), radius=w(4), fill=skin)
    else:
        d.ellipse(box(x0, y0, x1, y1), fill=skin)

    if attrs.hair_style != "bald":  # a cap of hair over the top of the head
        d.chord(box(x0 - 2, y0 - 4, x1 + 2, y0 + 16), 180, 360, fill=hair)
    if attrs.hair_style == "spiky":
        step = (x1 - x0 + 4) / 5
        for i in range(5):
            a = x0 - 2 + i * step
            d.polygon([pt(a, y0 + 3), pt(a + step / 2, y0 - 9), pt(a + step, y0 + 3)], fill=hair)
    elif attrs.hair_style == "bun":
        d.ellipse(box(cx - 7, y0 - 13, cx + 7, y0 + 1), fill=hair)

    ey = cy - 2
    for ex in (cx - 5, cx + 5):
        d.ellipse(box(ex - 3.5, ey - 2.5, ex + 3.5, ey + 2.5), fill=_EYE_WHITE)
        d.ellipse(box(ex - 2, ey - 2, ex + 2, ey + 2), fill=EYE_COLOURS[attrs.eye_colour])
    d.line([pt(cx - 4, cy + 9), pt(cx + 4, cy + 9)], fill=_MOUTH, width=w(2))

    if attrs.accessory == "glasses":
        for ex in (cx - 5, cx + 5):
            d.rectangle(box(ex - 4.5, ey - 3.5, ex + 4.5, ey + 3.5), outline=_INK, width=w(1.5))
        d.line([pt(cx - 0.5, ey), pt(cx + 0.5, ey)], fill=_INK, width=w(1.5))
    elif attrs.accessory == "hat":
        d.rectangle(box(x0 + 2, y0 - 13, x1 - 2, y0 - 1), fill=_INK)
        d.rectangle(box(x0 + 2, y0 - 5, x1 - 2, y0 - 2), fill=_HATBAND)
        d.rectangle(box(x0 - 7, y0 - 2, x1 + 7, y0 + 2), fill=_INK)
    elif attrs.accessory == "earrings":
        for ex in (x0, x1):
            d.ellipse(box(ex - 3, cy + 4, ex + 3, cy + 10), fill=_GOLD)
    elif attrs.accessory == "bowtie":
        d.polygon([pt(cx, 56), pt(cx - 9, 51), pt(cx - 9, 61)], fill=_BOWTIE)
        d.polygon([pt(cx, 56), pt(cx + 9, 51), pt(cx + 9, 61)], fill=_BOWTIE)

    if j.colour != (0, 0, 0):
        lut: list[int] = []
        for offset in j.colour:
            lut.extend(min(255, max(0, v + offset)) for v in range(256))
        img = img.point(lut)
    return img


def sample_distinct_attrs(
    n: int, rng: RandomLike, min_hamming: int = 2, max_tries: int = 200_000
) -> list[PortraitAttrs]:
    """``n`` identities whose attributes pairwise differ in at least ``min_hamming`` places.

    Greedy rejection sampling: cheap (there are 96,000 combinations and we
    need ~130) and deterministic for a seeded ``rng``.  Raises ``ValueError``
    when ``max_tries`` candidates could not fill the set (``n`` too large for
    that distance).
    """
    n_attrs = len(ATTRIBUTE_VALUES)
    if not 0 <= min_hamming <= n_attrs:
        raise ValueError(f"min_hamming must be in [0, {n_attrs}], got {min_hamming}")
    chosen: list[PortraitAttrs] = []
    tries = 0
    while len(chosen) < n:
        if tries >= max_tries:
            raise ValueError(f"could only place {len(chosen)} of {n} identities at Hamming distance >= {min_hamming}")
        tries += 1
        cand = PortraitAttrs.random(rng)
        if all(cand.hamming(c) >= min_hamming for c in chosen):
            chosen.append(cand)
    return chosen


def _randbelow(rng: RandomLike, n: int) -> int:
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(n))
    return rng.randrange(n)


def _uniform(rng: RandomLike, lo: float, hi: float) -> float:
    return float(rng.uniform(lo, hi))
