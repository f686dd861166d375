"""Benchmark: 8 steering strengths in one batched forward (``run_coefficients``) vs one trace per strength.

Prints medians over interleaved repeats and their ratios (target >= 3x) on a
21M-parameter LLaVA-architecture config, batch of 4 prompts with images,
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

import argparse

import torch

from analyses._timing import interleaved
from interp.steering import add_vector, run_coefficients
from interp.tiny import tiny_vlm


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-coeffs", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--model", choices=("random", "default", "quick"), default="random",
                    help="a 24.8M-parameter random LLaVA config, or the zoo's trained default / quick model")
    ap.add_argument("--seed", type=int, default=0, help="the zoo model's seed (--model default / quick)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.model == "random":
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

    def hooks_for(scales):
        return [(site, add_vector(v, scale=scales, positions="last"))]

    def looped():
        return torch.stack([model.run_with_hooks(inputs, hooks_for(torch.full((args.batch,), c, device=model.device)))
                            for c in coeffs])

    def batched():
        return run_coefficients(model, inputs, hooks_for, coeffs)

    def shared():
        return run_coefficients(model, inputs, hooks_for, coeffs, shared_prefix=True)

    reference = looped()
    diff = (batched() - reference).abs().max().item()
    diff_shared = (shared() - reference).abs().max().item()
    assert diff <= 1e-4 and diff_shared <= 1e-4, (diff, diff_shared)

    def sync(fn):
        def timed():
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
        return timed

    med = interleaved({"looped": sync(looped), "batched": sync(batched), "shared_prefix": sync(shared)},
                      repeats=args.repeats, warmup=1)
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
