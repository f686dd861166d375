"""Benchmark: 8 steering strengths in one batched forward (``run_coefficients``) vs one trace per strength.

Prints medians over interleaved repeats and their ratios (target >= 3x) on a
24.8M-parameter LLaVA-architecture config, batch of 4 prompts with images,
steering the last prompt token at the middle block.  Every contender computes
the same logits (asserted before timing).  Run: ``python -m analyses.bench_sweep``.

Two batched contenders:

- ``batched``: the batch repeated once per strength, one pass.  The arithmetic
  is the same as the loop's; the gain is the fixed cost of each pass (tracing,
  Python, kernel launches, small matmuls that use the cores poorly), so on a
  CPU it is small and depends on the machine and its load.
- ``shared_prefix``: last-token steering leaves every earlier position the same
  at every strength, so the prefix runs once and only the last position runs
  per strength, over the prefix's KV cache (``run_coefficients(...,
  shared_prefix=True)``).  This removes arithmetic, so it pays on any device;
  it applies to hooks that touch the last position only.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from analyses._cli import script_parser, torch_device
from analyses._timing import interleaved, synced
from eraser.argtypes import nonneg_int, positive_int
from interp.steering import add_vector, run_coefficients
from interp.tiny import tiny_vlm


def sweep_fns(model, inputs, v: Tensor, site: str, coeffs: list[float]) -> dict[str, Callable[[], Tensor]]:
    """The contenders, each returning ``[n_coeffs, batch, pos, vocab]`` logits of last-token steering along ``v``
    at ``site``: ``looped`` (one trace per strength), ``batched`` and, where the architecture can continue
    from a cached prefix, ``shared_prefix``."""
    b = inputs.input_ids.shape[0]

    def hooks_for(scales):
        return [(site, add_vector(v, scale=scales, positions="last"))]

    fns = {
        "looped": lambda: torch.stack([model.run_with_hooks(inputs, hooks_for(torch.full((b,), c, device=model.device)))
                                       for c in coeffs]),
        "batched": lambda: run_coefficients(model, inputs, hooks_for, coeffs),
    }
    if model.adapter.continues_from_cache:
        fns["shared_prefix"] = lambda: run_coefficients(model, inputs, hooks_for, coeffs, shared_prefix=True)
    return fns


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = script_parser("bench_sweep", __doc__)
    ap.add_argument("--n-coeffs", type=positive_int, default=8, help="steering strengths per sweep")
    ap.add_argument("--batch", type=positive_int, default=4, help="prompts per forward")
    ap.add_argument("--repeats", type=positive_int, default=7, help="interleaved timing rounds (the median is printed)")
    ap.add_argument("--threads", type=positive_int, default=2, help="torch CPU threads")
    ap.add_argument("--device", type=torch_device, default="cuda" if torch.cuda.is_available() else "cpu",
                    help="cpu or cuda[:N]")
    ap.add_argument("--model", choices=("random", "default", "quick"), default="random",
                    help="a 24.8M-parameter random LLaVA config, or the zoo's trained default / quick model")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="the zoo model's seed (--model default / quick)")
    ap.add_argument("--small", action="store_true", help="with --model random: a 1M-parameter model, for a quick look")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.small and args.model != "random":
        ap.error("--small sizes the random model only")
    if args.model == "random" and args.small:
        model = tiny_vlm("llava", seed=0)
    elif args.model == "random":
        model = tiny_vlm("llava", seed=0, d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_mlp=1024,
                         vision_d_model=256, vision_layers=4, vision_heads=4, image_size=64, patch_size=8)
    else:
        from eraser.pipeline import load_setup

        model = load_setup(seed=args.seed, quick=args.model == "quick").model
    model.hf_model.to(args.device)
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    from PIL import Image

    images = [Image.new("RGB", (64, 64), (40 * i, 30, 200 - 40 * i)) for i in range(args.batch)]
    prompts = ["what is the name of the person in the image ?", "who is this", "name this person please", "who is it"]
    inputs = model.encode(images=images, prompts=(prompts * args.batch)[: args.batch])
    coeffs = torch.linspace(-2, 2, args.n_coeffs).tolist()
    v = torch.randn(model.d_model, generator=torch.Generator().manual_seed(0)).to(model.device)
    site = f"blocks.{model.n_layers // 2}.hook_resid_pre"

    fns = sweep_fns(model, inputs, v, site, coeffs)
    reference = fns["looped"]()
    diff = (fns["batched"]() - reference).abs().max().item()
    diff_shared = (fns["shared_prefix"]() - reference).abs().max().item()
    assert diff <= 1e-4 and diff_shared <= 1e-4, (diff, diff_shared)

    med = interleaved({k: synced(fn) for k, fn in fns.items()}, repeats=args.repeats, warmup=1)
    ratio = med["looped"] / med["batched"]
    ratio_shared = med["looped"] / med["shared_prefix"]
    print(f"model: {n_params / 1e6:.1f}M params on {args.device} ({args.threads} threads), batch {args.batch} with images, "
          f"seq {inputs.input_ids.shape[1]}, {args.n_coeffs} strengths at {site}; max |batched - looped| = {diff:.1e}, "
          f"max |shared_prefix - looped| = {diff_shared:.1e}")
    print(f"one trace per strength ({args.n_coeffs} x batch {args.batch}):        {med['looped'] * 1e3:.1f} ms")
    print(f"run_coefficients (1 x batch {args.n_coeffs * args.batch}):              {med['batched'] * 1e3:.1f} ms "
          f"({ratio:.2f}x)")
    print(f"run_coefficients, shared_prefix (prefix once + last position x {args.n_coeffs}): "
          f"{med['shared_prefix'] * 1e3:.1f} ms ({ratio_shared:.2f}x)")
    print(f"speed-up: batched {ratio:.2f}x, shared prefix {ratio_shared:.2f}x (target >= 3x)")
    return {**med, "ratio": ratio, "ratio_shared_prefix": ratio_shared, "max_abs_diff": diff,
            "max_abs_diff_shared_prefix": diff_shared}


if __name__ == "__main__":
    main()
