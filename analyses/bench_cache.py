"""Benchmark: ``run_with_cache`` over every residual-stream name vs a plain ``output_hidden_states=True`` forward.

Prints medians over interleaved repeats and their ratio (target <= 1.3) on a
24.8M-parameter LLaVA-architecture config.  Run: ``python -m analyses.bench_cache``.
"""
from __future__ import annotations


import torch

from analyses._cli import script_parser
from analyses._timing import interleaved
from eraser.argtypes import positive_int
from interp.tiny import tiny_vlm


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = script_parser("bench_cache", __doc__)
    ap.add_argument("--d-model", type=positive_int, default=512, help="the random model's width")
    ap.add_argument("--n-layers", type=positive_int, default=8, help="its decoder depth")
    ap.add_argument("--batch", type=positive_int, default=4, help="prompts per forward")
    ap.add_argument("--repeats", type=positive_int, default=30, help="interleaved timing rounds (the median is printed)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="torch CPU threads (use 1 when other jobs share the cores: oversubscribed threads make "
                         "every timing meaningless)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = tiny_vlm("llava", seed=0, d_model=args.d_model, n_layers=args.n_layers, n_heads=8, n_kv_heads=8, d_mlp=2 * args.d_model,
                     vision_d_model=256, vision_layers=4, vision_heads=4, image_size=64, patch_size=8)
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    from PIL import Image

    img = Image.new("RGB", (64, 64), (120, 30, 200))
    inputs = model.encode(images=[img] * args.batch, prompts=["what is the name of the person in the image ?"] * args.batch)
    names = "blocks.*.hook_resid_*"

    def plain():
        with torch.no_grad():
            model.hf_model(**inputs.model_kwargs(), output_hidden_states=True)

    def cached():
        model.run_with_cache(inputs, names=names)

    _, cache = model.run_with_cache(inputs, names=names)
    n_names = len(cache.names)  # resid_pre, resid_mid and resid_post of every block
    med = interleaved({"plain": plain, "run_with_cache": cached}, repeats=args.repeats)
    ratio = med["run_with_cache"] / med["plain"]
    print(f"model: {n_params / 1e6:.1f}M params, batch {args.batch}, seq {inputs.input_ids.shape[1]}, "
          f"{n_names} resid names cached")
    print(f"plain forward (output_hidden_states): {med['plain'] * 1e3:.2f} ms")
    print(f"run_with_cache (all resid names):     {med['run_with_cache'] * 1e3:.2f} ms")
    print(f"ratio: {ratio:.3f} (target <= 1.3)")
    return {**med, "ratio": ratio, "n_names": n_names}


if __name__ == "__main__":
    main()
