"""Benchmark: a layer x image-token patching map by activation patching vs by attribution patching.

The map asks, for every language-model layer and every image token, how much patching that one residual-stream
entry (``blocks.{l}.hook_resid_pre`` at one image position) from a clean run (one image) into a corrupted run
(another image, same prompt) moves a logit difference.  Activation patching runs the corrupted batch once per
(layer, token) cell (batched over layers, one call per token, the clean run cached once); the first-order estimate is one clean forward pass
and one differentiated corrupted pass for the whole map, the integrated one (``--steps K``) K + 1 differentiated
passes.  Prints medians over interleaved repeats and the ratios, on a 24.8M-parameter random LLaVA config with 64
image tokens by default, and the agreement of the maps (on random weights it says little about a trained model:
``analyses/attribution.py`` measures that).

Run: ``python -m analyses.bench_attribution [--d-model 512 --n-layers 8 --image-size 64 --steps 8]``.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from analyses._cli import script_parser
from analyses._timing import interleaved
from eraser.argtypes import positive_int
from interp.attribution_patching import attribution_map
from interp.patching import image_token, logit_diff, patch_from_run
from interp.tiny import tiny_vlm


def patched_map(model, clean, corrupt, names: list[str], metric, max_rows: int | None) -> np.ndarray:
    """``[layer, image token]``: the metric's batch-mean change from patching each cell alone (the clean run is
    cached once; each call also runs the corrupted batch once, 1 / (layers + 1) of its rows)."""
    _, cache = model.run_with_cache(clean, names=names)
    n_image = int(corrupt.image_mask.sum(1).min())
    out = np.zeros((len(names), n_image))
    for k in range(n_image):
        res = patch_from_run(model, corrupt, cache, names, metric, positions=image_token(k), max_rows=max_rows)
        out[:, k] = [res.patched[n] - res.corrupted for n in names]
    return out


def estimated_map(model, clean, corrupt, names: list[str], metric, steps: int) -> np.ndarray:
    maps = attribution_map(model, clean, corrupt, names, metric, steps=steps)
    mask = corrupt.image_mask.cpu()
    return np.stack([torch.stack([m[row][mask[row]] for row in range(m.shape[0])]).mean(0).numpy()
                     for m in (maps[n] for n in names)])


def setup(d_model: int, n_layers: int, image_size: int, batch: int) -> tuple:
    """``(model, clean, corrupted, metric)``: a seeded random LLaVA config, two batches of seeded random images with
    one prompt, and the logit difference between the clean run's two most likely next tokens."""
    model = tiny_vlm("llava", seed=0, d_model=d_model, n_layers=n_layers, n_heads=8, n_kv_heads=8, d_mlp=2 * d_model,
                     vision_d_model=256, vision_layers=4, vision_heads=4, image_size=image_size, patch_size=8,
                     max_positions=max(256, (image_size // 8) ** 2 + 64))
    rng = np.random.RandomState(0)

    def images(n: int) -> list[Image.Image]:
        return [Image.fromarray(rng.randint(0, 255, (image_size, image_size, 3), dtype=np.uint8)) for _ in range(n)]

    prompt = ["what is the name of the person in the image ?"] * batch
    clean = model.encode(images=images(batch), prompts=prompt)
    corrupt = model.encode(images=images(batch), prompts=prompt)
    with torch.no_grad():
        top = model.run_with_hooks(clean, [])[torch.arange(batch), clean.last_index].topk(2, dim=-1).indices
    return model, clean, corrupt, logit_diff(top[:, 0], top[:, 1])


def parse_config(name: str, doc: str, argv: list[str] | None, more=None):
    """The options every estimate-vs-patching benchmark shares (the random config, the batch, the integrated
    steps, rows per patched pass, timing rounds, threads), plus ``more(ap)``'s; parsed, threads set, checked."""
    ap = script_parser(name, doc)
    ap.add_argument("--d-model", type=positive_int, default=512, help="the random model's width")
    ap.add_argument("--n-layers", type=positive_int, default=8, help="its decoder depth")
    ap.add_argument("--image-size", type=positive_int, default=64, help="pixels per side (8-pixel patches)")
    ap.add_argument("--batch", type=positive_int, default=1, help="image pairs per run")
    ap.add_argument("--steps", type=positive_int, default=8, help="segments of the integrated estimate")
    ap.add_argument("--max-rows", type=positive_int, default=32, help="rows per patched forward pass")
    ap.add_argument("--repeats", type=positive_int, default=3, help="interleaved timing rounds (the median is printed)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="torch CPU threads (use 1 when other jobs share the cores)")
    if more is not None:
        more(ap)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.image_size % 8:
        raise SystemExit(f"--image-size must be a multiple of the 8-pixel patch, got {args.image_size}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_config("bench_attribution", __doc__, argv)

    model, clean, corrupt, metric = setup(args.d_model, args.n_layers, args.image_size, args.batch)
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    names = [f"blocks.{l}.hook_resid_pre" for l in range(args.n_layers)]
    n_image = int(corrupt.image_mask[0].sum())

    maps: dict[str, np.ndarray] = {}
    fns = {"patching": lambda: maps.__setitem__("patching", patched_map(model, clean, corrupt, names, metric,
                                                                         args.max_rows)),
           "first_order": lambda: maps.__setitem__("first_order", estimated_map(model, clean, corrupt, names, metric, 0)),
           "integrated": lambda: maps.__setitem__("integrated", estimated_map(model, clean, corrupt, names, metric,
                                                                             args.steps))}
    med = interleaved(fns, repeats=args.repeats, warmup=1)
    agreement = {m: float(np.corrcoef(maps["patching"].ravel(), maps[m].ravel())[0, 1]) for m in ("first_order", "integrated")}
    cells = args.n_layers * n_image
    print(f"model: {n_params / 1e6:.1f}M params, {args.n_layers} layers, batch {args.batch}, "
          f"seq {corrupt.input_ids.shape[1]} ({n_image} image tokens): a {args.n_layers} x {n_image} map, {cells} cells")
    rows = [(f"activation patching ({n_image} calls, {cells * args.batch} patched rows)", "patching", ""),
            ("first-order estimate (2 passes, 1 backward)", "first_order", ""),
            (f"integrated, {args.steps} steps ({args.steps + 2} passes, {args.steps + 1} backward)", "integrated", "")]
    for label, key, _ in rows:
        extra = "" if key == "patching" else (f"  ({med['patching'] / med[key]:.1f}x faster; r with patching "
                                              f"{agreement[key]:.2f})")
        print(f"{label:<52} {med[key]:8.3f} s{extra}")
    return {**med, "ratio_first_order": med["patching"] / med["first_order"],
            "ratio_integrated": med["patching"] / med["integrated"], "agreement": agreement, "cells": cells,
            "maps": {k: v.tolist() for k, v in maps.items()}}

if __name__ == "__main__":
    main()
