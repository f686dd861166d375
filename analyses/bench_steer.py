"""Benchmark: steered generation vs vanilla ``generate``, for the plain-PyTorch fast path and the nnsight graph.

Targets: fast path <= 1.02x, nnsight graph <= 1.10x of vanilla generation (each the median of per-round
ratios, with their quartiles: the three contenders run back to back in every round).  Also prints the artifact
size against the release's d x d per-layer matrices (target: >= d/4 times smaller) and against the same steering
as dense matrices, and the peak memory of fitting as the retain set grows 10x (target: flat, thanks to streaming
statistics; the high-water mark is reset after the model is built, see ``analyses._memory``).
Run: ``python -m analyses.bench_steer`` (a 24.8M-parameter LLaVA config, random weights, 2 CPU threads), or
``--model default`` / ``--model quick`` for the embedded default / quick trained models (trained once if not cached).
``--variant`` picks the eraser (default: the paper's ``mllmeraser``); ``mllmeraser_stacked_gate`` also steers the
first answer tokens, so its hooks act on decode steps and its nnsight graph runs with ``every_step=True``.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import torch
from PIL import Image

from analyses._cli import script_parser
from analyses._memory import current_rss, peak_rss, reset_peak
from analyses._timing import interleaved_times, paired_ratios, ratio_summary
from eraser.argtypes import nonneg_int, positive_int
from eraser import EraserConfig, MLLMEraser
from eraser.pipeline import variant_config
from eraser.variants import GATED_VARIANTS
from interp.tiny import tiny_vlm

WORDS = "who is the person in this image what name city job year hobby pet likes".split()


def _queries(n: int, seed: int, size: int = 64):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        words = " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (8,), generator=g))
        colour = tuple(int(c) for c in torch.randint(0, 255, (3,), generator=g))
        out.append((Image.new("RGB", (size, size), colour) if i % 2 == 0 else None, words))
    return out


def fit_memory(n_retain: int, small: bool, n_layers: int | None = None) -> dict[str, int]:
    """Run in a fresh process: resident bytes before fitting on ``n_retain`` retain queries, and the peak while
    fitting (the high-water mark is reset after the model is built, so the build's peak does not hide the fit's;
    ``reset`` False: the OS could not, and ``after`` is the process's lifetime peak)."""
    torch.set_num_threads(2)
    model = tiny_vlm("llava", seed=0, **_size(small, n_layers))
    forget, recall, erase, retain = _queries(16, 1), _queries(8, 2), _queries(8, 3), _queries(n_retain, 4)
    before, reset = current_rss(), reset_peak()
    MLLMEraser.fit(model, forget, retain, recall, erase, EraserConfig(batch_size=16))
    return {"before": before, "after": peak_rss(), "reset": reset}


def fit_peak(n_retain: int, small: bool, n_layers: int | None = None) -> dict[str, int]:
    """Peak RSS before and after the fit, measured in a fresh subprocess (the random model of that size)."""
    code = ("import json; from analyses.bench_steer import fit_memory; "
            f"print(json.dumps(fit_memory({n_retain}, {small}, {n_layers})))")
    # glibc's adaptive mmap threshold makes a peak depend on the allocation history (0-121 MiB of run-to-run
    # spread measured on the 24.8M config); a fixed threshold returns large blocks at once, so the peak is what
    # the fit holds
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _size(small: bool, n_layers: int | None = None) -> dict:
    size = dict(d_model=128, n_layers=4) if small else dict(
        d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_mlp=1024, vision_d_model=256, vision_layers=4,
        vision_heads=4, image_size=64, patch_size=8)
    return size if n_layers is None else {**size, "n_layers": n_layers}


def _model(which: str, small: bool, n_layers: int | None = None, seed: int = 0):
    if which == "random":
        return tiny_vlm("llava", seed=0, **_size(small, n_layers))
    from eraser.pipeline import load_setup

    setup = load_setup(seed=seed, quick=which == "quick")
    print(f"loaded the zoo's {which} model ({setup.recipe.describe()})")
    return setup.model


def main(argv: list[str] | None = None) -> dict[str, float | str]:
    ap = script_parser("bench_steer", __doc__)
    ap.add_argument("--repeats", type=positive_int, default=10, help="interleaved timing rounds (medians of paired ratios)")
    ap.add_argument("--new-tokens", type=positive_int, default=16, help="tokens each generate call produces")
    ap.add_argument("--small", action="store_true", help="a 1M-parameter random model, for a quick look")
    ap.add_argument("--model", choices=("random", "default", "quick"), default="random",
                    help="random weights (24.8M, or 1M with --small), or the zoo's trained default / quick model")
    ap.add_argument("--variant", default="mllmeraser",
                    choices=GATED_VARIANTS,
                    help="the eraser variant to steer with (its config; fitted on synthetic queries)")
    ap.add_argument("--n-layers", type=positive_int, default=None,
                    help="decoder layers of the random model (default 8, or 4 with --small); a 7B model has 32, "
                         "and a trace's per-module cost grows with them")
    ap.add_argument("--seed", type=nonneg_int, default=0, help="the zoo model's seed (--model default / quick)")
    ap.add_argument("--threads", type=positive_int, default=2,
                    help="torch CPU threads (use 1 when other jobs share the cores: oversubscribed threads make "
                         "every timing meaningless)")
    args = ap.parse_args(argv)
    if args.n_layers is not None and (args.model != "random" or args.n_layers < 2):
        ap.error("--n-layers sizes the random model only, and needs >= 2 layers")
    if args.seed and args.model == "random":
        ap.error("--seed picks the zoo model (--model default / quick)")
    torch.set_num_threads(args.threads)
    model = _model(args.model, args.small, args.n_layers, args.seed)
    config, _ = variant_config(model, args.variant, EraserConfig(batch_size=16))
    eraser = MLLMEraser.fit(model, _queries(16, 1), _queries(64, 4), _queries(8, 2), _queries(8, 3), config,
                            forget_concepts=["a"] * 8 + ["b"] * 8)  # two "people", for per-person gates
    every_step = bool(eraser.config.every_step or eraser.config.answer_steps)  # the graph must see decode steps
    batch = _queries(4, 9)
    inputs = model.encode(images=[q[0] for q in batch], prompts=[q[1] for q in batch])
    kw = dict(max_new_tokens=args.new_tokens, eos_token_id=None)

    def vanilla():
        model.generate(inputs, **kw)

    def fast():
        with eraser.attached(model, backend="torch"):
            model.generate(inputs, **kw)

    def graph():
        model.generate(inputs, hooks=eraser.hooks(), every_step=every_step, **kw)

    times = interleaved_times({"vanilla": vanilla, "fast": fast, "graph": graph}, repeats=args.repeats, warmup=2)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: ratio_summary(paired_ratios(times, k, "vanilla")) for k in ("fast", "graph")}
    d, n_layers = model.d_model, len(eraser.layers)
    release_bytes = n_layers * d * d * 4
    out = {
        "variant": args.variant,
        "fast_ratio": spread["fast"][1],  # the median of paired per-round ratios (see paired_ratios)
        "graph_ratio": spread["graph"][1],
        "fast_ratio_iqr": spread["fast"][::2],
        "graph_ratio_iqr": spread["graph"][::2],
        "artifact_bytes": float(eraser.nbytes),
        "release_bytes": float(release_bytes),
        "size_ratio": release_bytes / eraser.nbytes,
        "release_form_ratio": eraser.release_form_nbytes / eraser.nbytes,
    }
    n_params = sum(p.numel() for p in model.hf_model.parameters())
    print(f"model: {n_params / 1e6:.1f}M params, d_model {d}, {args.variant}: {n_layers} steered layers"
          f"{f', {eraser.config.answer_steps} answer steps' if eraser.config.answer_steps else ''}; "
          f"batch 4, {args.new_tokens} new tokens")
    iqr = lambda k: f"quartiles {spread[k][0]:.3f}-{spread[k][2]:.3f}"  # noqa: E731
    print(f"vanilla generate {med['vanilla'] * 1e3:.1f} ms | fast path {med['fast'] * 1e3:.1f} ms "
          f"({out['fast_ratio']:.3f}x, {iqr('fast')}; target <= 1.02) | nnsight graph {med['graph'] * 1e3:.1f} ms "
          f"({out['graph_ratio']:.3f}x, {iqr('graph')}; target <= 1.10)")
    print("  (ratios: medians of per-round ratios, each round timing vanilla, fast and graph back to back)")
    print(f"artifact {eraser.nbytes:,} bytes vs release d x d matrices {release_bytes:,} bytes: "
          f"{out['size_ratio']:.0f}x smaller (d/4 = {d / 4:.0f}); the same steering as dense matrices "
          f"({eraser.release_form_nbytes:,} bytes): {out['release_form_ratio']:.0f}x")
    small, large = fit_peak(64, args.small, args.n_layers), fit_peak(640, args.small, args.n_layers)
    out.update(fit_peak_small=float(small["after"]), fit_peak_large=float(large["after"]))
    out.update(fit_growth_small=float(small["after"] - small["before"]),
               fit_growth_large=float(large["after"] - large["before"]))
    mib = lambda r: f"{r['after'] / 2**20:.0f} MiB (+{(r['after'] - r['before']) / 2**20:.0f} over the loaded model)"  # noqa: E731
    caveat = "" if small["reset"] and large["reset"] else " (lifetime peaks: this OS cannot reset the high-water mark)"
    which = f"the random model{' at --small' if args.small else ''}{f', {args.n_layers} layers' if args.n_layers else ''}"
    print(f"fit peak RSS ({which}): {mib(small)} with 64 retain queries, {mib(large)} with 640 "
          f"(10x the data; target: flat){caveat}")
    return out


if __name__ == "__main__":
    main()
