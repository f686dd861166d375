"""An eight-step tour of ``interp`` on a tiny random LLaVA: hook names, a modality-sliced cache, a steering hook, heads,
patching and its estimate from gradients, edges and a circuit (the vision tower's edges too).

Run: ``python -m analyses.interp_tour``.  Everything is built offline from config.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from analyses._cli import script_parser
from analyses.circuit import by_input
from interp.attribution_patching import attribution_patch
from interp.edge_attribution import attribution_edges
from interp.edge_patching import circuit_faithfulness
from interp.edges import edge_graph, greedy_circuit
from interp.patching import logit_diff, patch_sites
from interp.tiny import tiny_vlm
from interp.vision_edge_attribution import attribution_vision_edges


def main(argv: list[str] | None = None) -> None:
    ap = script_parser("interp_tour", __doc__)
    ap.add_argument("--arch", default="llava", choices=["llava", "qwen2_5_vl"], help="the tiny random model's architecture")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    model = tiny_vlm(args.arch, seed=0)
    print(f"1. {model}")
    names = model.hook_names()
    print(f"   first names: {names[:3]} ... last: {names[-3:]}")

    size = 32 if args.arch == "llava" else 64
    portrait = Image.new("RGB", (size, size), (200, 120, 80))
    inputs = model.encode(images=[portrait, None], prompts=["what is the name of the person in the image ?", "who is he ?"])
    print(f"2. encoded batch {tuple(inputs.input_ids.shape)}: {int(inputs.image_mask.sum())} image tokens, "
          f"text tokens per row {inputs.text_mask.sum(1).tolist()}, last prompt index {inputs.last_index.tolist()}")

    logits, cache = model.run_with_cache(inputs, names="blocks.*.hook_resid_post")
    name = "blocks.1.hook_resid_post"
    print(f"3. cache of {len(cache)} names; {name}: full {tuple(cache[name].shape)}, "
          f"image rows {[tuple(t.shape) for t in cache.image(name)]}, last {tuple(cache.last(name).shape)}, "
          f"stack {tuple(cache.stack('blocks.*.hook_resid_post').shape)}")

    direction = cache.last(name)[0] - cache.last(name)[1]

    def steer(x, ctx):
        return x + 4.0 * direction * ctx.last_token_mask(x).unsqueeze(-1)

    steered = model.run_with_hooks(inputs, hooks=[(name, steer)])
    last = inputs.last_index
    shift = (steered[torch.arange(2), last] - logits[torch.arange(2), last]).norm(dim=-1)
    print(f"4. steering the last token of {name}: next-token logit shift per row {[round(v, 3) for v in shift.tolist()]}")

    plain = model.generate(inputs, max_new_tokens=6)
    hooked = model.generate(inputs, max_new_tokens=6, hooks=[(name, steer)])
    print(f"5. greedy answers (random weights, so words are arbitrary):\n   vanilla {plain.texts}\n   steered {hooked.texts}")

    _, heads = model.run_with_cache(inputs, names=["blocks.1.attn.hook_z", "blocks.1.attn.hook_pattern"])
    z, pattern = heads["blocks.1.attn.hook_z"], heads["blocks.1.attn.hook_pattern"]
    to_image = pattern[0, :, last[0], inputs.image_mask[0]].sum(-1)  # row 0: each head, last token -> image tokens
    print(f"6. inside block 1: attn.hook_z {tuple(z.shape)} (batch, pos, head, d_head), attn.hook_pattern "
          f"{tuple(pattern.shape)} (batch, head, query, key); row 0's last token puts "
          f"{[round(v, 2) for v in to_image.tolist()]} of each head's attention on the image")

    other = Image.new("RGB", (size, size), (60, 90, 200))
    prompt = ["what is the name of the person in the image ?"]
    clean, corrupt = model.encode(images=[portrait], prompts=prompt), model.encode(images=[other], prompts=prompt)
    answer = int(model.run_with_hooks(clean, [])[0, clean.last_index[0]].argmax())
    metric = logit_diff(answer, int(model.run_with_hooks(corrupt, [])[0, corrupt.last_index[0]].argmax()))
    sites = "blocks.*.hook_resid_pre"
    patched = patch_sites(model, clean, corrupt, sites, metric, positions="image")
    estimated = attribution_patch(model, clean, corrupt, sites, metric, positions="image", steps=8)
    print(f"7. the image positions of each block's input, patched from one portrait's run into another's "
          f"(normalised effect per block): {[round(v, 2) for v in patched.effects.values()]}; estimated from "
          f"gradients (integrated, 9 passes for all blocks): {[round(v, 2) for v in estimated.effects.values()]}")

    edges = attribution_edges(model, clean, corrupt, metric, steps=8)
    top = [f"{u} -> {v} {edges.value(u, v):.2f}" for u, v in edges.top(3)]
    kept = {k: circuit_faithfulness(model, clean, corrupt, greedy_circuit(edges, k), metric) for k in (5, 20)}
    print(f"8. {len(edge_graph(model).edges())} edges (each head, MLP and the image/text embeddings into every later "
          f"reader), estimated in 9 passes; the largest: {top}; a circuit of the top 5 / 20 grown from the logits keeps "
          f"{kept[5]:.2f} / {kept[20]:.2f} of the difference (all edges: 1)")
    split = attribution_edges(model, clean, corrupt, metric, steps=8, qkv=True)
    kinds = by_input(split)
    print(f"   split per head ({len(split.graph.edges())} edges: each head's query, key and value a reader), the "
          f"summed effect into queries / keys / values: {kinds['q']:.2f} / {kinds['k']:.2f} / {kinds['v']:.2f}")
    vision = attribution_vision_edges(model, clean, corrupt, metric, steps=8)
    into = vision.downstream.index("projector")
    print(f"   inside the image writer: the vision tower's {len(vision.ranked())} edges (patches, vision heads and "
          f"MLPs into later vision blocks and the projector), the largest: "
          f"{[f'{u} -> {v} {e:.2f}' for u, v, e in vision.ranked()[:2]]}; those into the projector add up to "
          f"{float(np.nansum(vision.effects[:, into])):.2f}")


if __name__ == "__main__":
    main()
