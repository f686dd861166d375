"""What the eraser's gate reads: each component's exact share of the gate value, on forget and retain questions.

Why: the gate decides where MLLMEraser steers, and it is linear in the residual stream (``w . h`` at the
sites it reads, before its window), so its value splits exactly over what wrote those sites
(:func:`interp.readout.readout_attribution`): the image features at the image tokens, the text embeddings,
each earlier head and MLP.  That answers, with numbers, whether the gate recognises a forget person from the
picture (the image's own share, or heads that move it to the text) or from the words, and which blocks write
the signal it keys on; reviewers asked whether a linear gate is enough (METHOD.md), and this is what it is.

For each question of the forget, retain and celebrity splits (every task, with the picture and text-only) the
gate's raw value is decomposed (for per-concept gates, the concept that scores highest, which is the one the
gate takes), grouped by split and modality: the mean share of each component, and of each family (the image,
the text, each block's heads, each block's MLP, and "other": rounding).  The shares add up to the raw gate of
every question, checked against the eraser's own gate values.

Writes ``OUT/gate_attribution.json`` and ``OUT/gate_attribution.png``.  The eraser comes from ``--eraser PATH``
or is fitted (``--variant``), as in every analysis (``analyses/common.py``).

Run: ``python -m analyses.gate_attribution [--quick] [--limit N]``.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from eraser.evaluate import build_items
from eraser.features import read_names
from interp.collect import prompt_mean, prompt_positions
from interp.ablation import ablation_hook, modality_means
from interp.hooks import HookContext
from interp.readout import prompt_read, readout_attribution, readout_names, site_writers

from .common import Context, base_parser, limited, load_context, write_outputs

SPLITS = ("forget", "retain", "celebrity")
MODALITIES = ("vqa", "qa")


def family(label: str) -> str:
    """A component's family: ``"image"``, ``"text"``, ``"other"``, ``"L{l} heads"`` or ``"L{l} mlp"``."""
    if label in ("image", "text", "other"):
        return label
    block = label.split("H")[0].split(".")[0]
    return f"{block} mlp" if label.endswith(".mlp") else f"{block} heads"


def gate_readouts(gate, rows: list[list[str]], feats: list[torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Per gate row, the readout it applies to each query (``{site: [batch, d]}``; for per-concept gates the
    highest-scoring concept's weights) and the raw gate value it gives."""
    out = []
    for i, (names, f) in enumerate(zip(rows, feats)):
        w = gate.w[i].float().to(f.device)
        if w.ndim == 1:
            per_row = w.expand(f.shape[0], -1)
        else:  # [concepts, F]: the max is taken, so the winning concept's weights are the readout
            per_row = w[(f @ w.T).argmax(-1)]
        d = f.shape[-1] // len(names)
        readout = {n: per_row[:, k * d:(k + 1) * d] for k, n in enumerate(names)}
        out.append((readout, (f * per_row).sum(-1)))
    return out


def _gate_names(model, gate) -> list[str]:
    """What a cache needs for the gate's features and their attribution: its sites and everything that wrote them."""
    return readout_names(model, {n: torch.zeros(model.d_model) for n in read_names(gate.rows())})


def _reads(gate, inputs, cache) -> list[torch.Tensor]:
    """Each gate row's features, read from ``cache`` as the deployed gate reads them (:mod:`eraser.features`)."""
    rows = gate.rows()
    names = read_names(rows)
    mask = prompt_positions(inputs, cache[names[0]].shape[1])
    reads = {n: (cache.last(n).float() if gate.read == "last" else prompt_mean(cache[n].float(), mask)) for n in names}
    return [torch.cat([reads[n] for n in row], dim=-1) for row in rows]


def collect(model, gate, images: Sequence[Any], prompts: Sequence[str], batch_size: int = 32,
            progress: bool = False) -> list[dict[str, Any]]:
    """Per gate row of ``gate`` (an eraser's :class:`~eraser.gate.NullSpaceGate`), every query's component shares
    of its raw gate value: ``{"labels", "values": [component, query], "gate": [query], "max_abs_gap"}``, the last
    the largest difference between the shares' sum and the gate's own value."""
    if len(images) != len(prompts) or not prompts:
        raise ValueError(f"need one image (or None) per prompt and at least one query, got {len(images)} and "
                         f"{len(prompts)}")
    rows = gate.rows()
    every = _gate_names(model, gate)
    per_row: list[dict[str, Any]] = [{"labels": None, "values": [], "gate": [], "check": []} for _ in rows]
    for s in tqdm(range(0, len(prompts), batch_size), desc="gate attribution", disable=not progress, leave=False):
        inputs = model.encode(images=list(images[s:s + batch_size]), prompts=list(prompts[s:s + batch_size]))
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names=every, stop_early=True)
        feats = _reads(gate, inputs, cache)
        deployed = gate.score(feats, raw=True)  # [batch, steered layers]: what the eraser itself computes
        for i, (readout, raw) in enumerate(gate_readouts(gate, rows, feats)):
            att = readout_attribution(model, cache, readout, read=gate.read)
            per_row[i]["labels"] = att.labels
            per_row[i]["values"].append(att.values)
            per_row[i]["gate"].append(raw)
            column = 0 if gate.stack else i
            per_row[i]["check"].append((att.values.sum(0) - deployed[:, column].cpu()).abs().max())
    for r in per_row:
        r["values"] = torch.cat(r["values"], dim=1)
        r["gate"] = torch.cat(r["gate"])
        r["max_abs_gap"] = float(max(r.pop("check")))
    return per_row


def family_ablations(model, gate) -> dict[str, tuple[str, str]]:
    """Each component family that writes the gate's sites, as ``(site, positions)`` to mean-ablate: the image and
    the text (``hook_embed`` at their positions), each block's heads (``hook_attn_out``: the heads' sum) and MLP."""
    names = read_names(gate.rows())
    heads = max(site_writers(model, n)[0] for n in names)
    mlps = max(site_writers(model, n)[1] for n in names)
    fams = {"image": ("hook_embed", "image"), "text": ("hook_embed", "text")}
    for l in range(max(heads, mlps)):
        if l < heads:
            fams[f"L{l} heads"] = (f"blocks.{l}.hook_attn_out", "all")
        if l < mlps:
            fams[f"L{l} mlp"] = (f"blocks.{l}.hook_mlp_out", "all")
    return fams


def _writes_into(model, fam: str, site: str) -> bool:
    if fam in ("image", "text"):
        return True
    heads, mlps = site_writers(model, site)
    layer = int(fam.split()[0][1:])
    return layer < (heads if fam.endswith("heads") else mlps)


def ablation_effects(model, gate, images: Sequence[Any], prompts: Sequence[str], means, batch_size: int = 32,
                     progress: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """Per family (:func:`family_ablations`), the raw gate's change when that family is replaced by its mean
    (``means``: :class:`~interp.ablation.ModalityMeans`), per query and gate row: ``"total"`` as the model then
    computes it (through every later component), ``"direct"`` the family's own share of the change alone (what
    its readout share predicts).  Their difference is what the family does to the gate through later
    components."""
    fams = family_ablations(model, gate)
    rows = gate.rows()
    names = read_names(rows)
    wanted = list(dict.fromkeys(_gate_names(model, gate) + [site for site, _ in fams.values()]))
    out: dict[str, dict[str, list[torch.Tensor]]] = {f: {"total": [], "direct": []} for f in fams}
    col = [0 if gate.stack else i for i in range(len(rows))]
    for s in tqdm(range(0, len(prompts), batch_size), desc="gate ablations", disable=not progress, leave=False):
        inputs = model.encode(images=list(images[s:s + batch_size]), prompts=list(prompts[s:s + batch_size]))
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names=wanted, stop_early=True)
        feats = _reads(gate, inputs, cache)
        base = gate.score(feats, raw=True)[:, col]
        readouts = gate_readouts(gate, rows, feats)
        for fam, (site, positions) in fams.items():
            hook = ablation_hook(model, site, "mean", means, positions=positions)
            with torch.no_grad():
                _, hooked = model.run_with_cache(inputs, names=names, hooks=[(site, hook)], stop_early=True)
                # the same replacement, applied to the cached (unablated) value
                ablated = hook(cache[site], HookContext(name=site, layer=None, step=0, inputs=inputs))
            out[fam]["total"].append(gate.score(_reads(gate, inputs, hooked), raw=True)[:, col] - base)
            delta = (ablated - cache[site]).float()
            direct = torch.zeros_like(base)
            for i, (readout, _) in enumerate(readouts):
                for n, w in readout.items():
                    if _writes_into(model, fam, n):
                        direct[:, i] += (prompt_read(delta, cache, gate.read) * w.to(delta.device)).sum(-1).cpu()
            out[fam]["direct"].append(direct)
    return {f: {k: torch.cat(v) for k, v in d.items()} for f, d in out.items()}


def summarise(labels: list[str], values: torch.Tensor, gate: torch.Tensor, groups: dict[str, list[int]]
              ) -> dict[str, Any]:
    """Per group of items: its size, mean raw gate, the mean share of every component and of every family."""
    families = list(dict.fromkeys(family(l) for l in labels))
    out = {}
    for key, idx in groups.items():
        if not idx:
            continue
        v = values[:, idx].mean(1)
        fam = {f: float(sum(v[i] for i, l in enumerate(labels) if family(l) == f)) for f in families}
        out[key] = {"n": len(idx), "gate": float(gate[idx].mean()), "components": dict(zip(labels, v.tolist())),
                    "families": fam}
    return out


def contrast(groups: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per modality, each family's forget share minus its retain share: what makes the gate tell them apart
    (the retain gate is ~0 by construction, but not each of its shares)."""
    out = {}
    for m in MODALITIES:
        f, r = groups.get(f"forget/{m}"), groups.get(f"retain/{m}")
        if f and r:
            out[m] = {k: f["families"][k] - r["families"][k] for k in f["families"]}
    return out


def run(ctx: Context) -> dict[str, Any]:
    bench, limit = ctx.setup.bench, ctx.args.limit
    profiles = {"forget": limited(bench.forget, limit), "retain": limited(bench.retain, limit),
                "celebrity": limited(bench.celebrity, limit)}
    items, groups = [], {}
    for split in SPLITS:
        for it in build_items(profiles[split]):
            groups.setdefault(f"{split}/{it.modality}", []).append(len(items))
            items.append(it)
    if not items:
        raise SystemExit("no questions to attribute (every split is empty)")
    gate = ctx.eraser.gate
    got = collect(ctx.model, gate, [it.image for it in items], [it.prompt for it in items], ctx.args.batch_size,
                  ctx.progress)
    # part 2: each family mean-ablated (to the retain questions' per-modality means), total vs direct change
    fams = family_ablations(ctx.model, gate)
    reference = [it for it in items if it.profile_id in {p.id for p in profiles["retain"]}]
    bs = ctx.args.batch_size
    means = modality_means(ctx.model, (ctx.model.encode(images=[it.image for it in reference[s:s + bs]],
                                                         prompts=[it.prompt for it in reference[s:s + bs]])
                                       for s in range(0, len(reference), bs)),
                           list(dict.fromkeys(site for site, _ in fams.values())))
    effects = ablation_effects(ctx.model, gate, [it.image for it in items], [it.prompt for it in items], means, bs,
                               ctx.progress)
    rows = []
    for i, (names, r) in enumerate(zip(gate.rows(), got)):
        summary = summarise(r["labels"], r["values"], r["gate"], groups)
        ablation = {f: {g: {k: float(effects[f][k][idx, i].mean()) for k in ("total", "direct")}
                        for g, idx in groups.items() if idx} for f in fams}
        rows.append({"sites": names, "max_abs_gap": r["max_abs_gap"], "groups": summary,
                     "contrast": contrast(summary), "ablation": ablation})
    return {"config": ctx.config(), "read": gate.read, "window": list(gate.window) if gate.window else None,
            "concepts": len(gate.concepts), "n_items": len(items), "rows": rows}


def print_summary(res: dict[str, Any]) -> None:
    print(f"\nWhat the gate reads ({res['n_items']} questions; raw gate, before its window "
          f"{res['window']}; read: {res['read']}; the shares add up to each question's gate value)")
    for row in res["rows"]:
        groups = row["groups"]
        keys = [k for k in (f"{s}/{m}" for s in SPLITS for m in MODALITIES) if k in groups]
        print(f"  gate over {', '.join(row['sites'])} (largest gap to the eraser's own gate value: "
              f"{row['max_abs_gap']:.1e})")
        print("    " + f"{'':<14}" + "".join(f"{k:>15}" for k in keys))
        print("    " + f"{'n':<14}" + "".join(f"{groups[k]['n']:>15}" for k in keys))
        print("    " + f"{'raw gate':<14}" + "".join(f"{groups[k]['gate']:>15.3f}" for k in keys))
        for fam in groups[keys[0]]["families"]:
            print("    " + f"{fam:<14}" + "".join(f"{groups[k]['families'][fam]:>15.3f}" for k in keys))
        for m, diff in row["contrast"].items():
            top = sorted(((k, v) for k, v in diff.items() if k != "other"), key=lambda kv: -abs(kv[1]))[:4]
            print(f"    forget - retain, {m}: " + ", ".join(f"{k} {v:+.3f}" for k, v in top))
        ablation = row.get("ablation") or {}
        if ablation:
            keys2 = [k for k in ("forget/vqa", "forget/qa", "retain/vqa", "retain/qa") if k in groups]
            print("    mean-ablated to the retain means, the gate's change: total (direct share)")
            print("    " + f"{'':<14}" + "".join(f"{k:>18}" for k in keys2))
            for fam, by_group in ablation.items():
                print("    " + f"{fam:<14}" + "".join(
                    f"{by_group[k]['total']:>9.3f} ({by_group[k]['direct']:6.3f})" for k in keys2))
        for key in ("forget/vqa", "forget/qa"):
            if key in groups:
                comp = groups[key]["components"]
                top = sorted(comp.items(), key=lambda kv: -abs(kv[1]))[:5]
                print(f"    top components, {key}: " + ", ".join(f"{l} {v:.3f}" for l, v in top))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("gate_attribution", __doc__)
    args = ap.parse_args(argv)
    ctx = load_context(args)
    from eraser.plots import plot_gate_attribution

    return write_outputs(args, "gate_attribution", run(ctx), print_summary, plot_gate_attribution,
                         "gate_attribution.png")


if __name__ == "__main__":
    main(sys.argv[1:])
