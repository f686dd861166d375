"""Probing: after MLLMEraser, can a linear probe still read the forgotten facts from the residual stream?

MLLMEraser changes behaviour by adding ``lambda * g(h) * d`` to the residual
stream; it does not remove information.  This script measures how much of a
profile's identity (which person), its forget/retain membership and one fact
(birthplace) stays linearly readable, layer by layer, before and after
steering.

Queries are the VQA questions (image + "the person in the image") of the
forget and retain profiles.  Features, one vector per query and site:

* every LM block's ``blocks.{l}.hook_resid_post`` at the last prompt token, the
  mean over image tokens, and the mean over text tokens;
* every vision block's ``vision.blocks.{l}.hook_resid_post`` (mean over patches).

They are collected twice: on the vanilla model and with the eraser's hooks
(the steered run).  One seeded, per-profile stratified split holds out ~30 %
of each profile's queries; with ``--split profiles`` whole profiles are held out
instead (forget and retain ones each in proportion), which asks whether a fact
is readable in people never seen rather than by recognising the person
(identity is then skipped).  Reported per task and site:

* ``vanilla_probe``: a probe trained on vanilla features, tested on the
  held-out queries of the vanilla run *and* of the steered run (does the
  probe a defender would have built still work after steering?);
* ``steered_probe``: a probe trained and tested on steered features (is the
  information there at all after steering?);
* accuracy on all held-out queries, balanced accuracy, and accuracy on the
  forget profiles' queries only (the number the question is about), with its
  chance level (a random guess with the training labels' frequencies) and what
  a constant guess of the training majority class scores on those queries (for
  identity, whose forget slice holds one label, it can be 1.0);
* ``shift``: how far steering moved the features (norm of the mean change,
  relative to the mean feature norm), on forget vs retain queries.

Writes ``OUT/probing.json`` and ``OUT/probe_accuracy.png``.

Run: ``python -m analyses.probing [--quick] [--eraser PATH] [--limit N]``.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from eraser.argtypes import nonneg_float
from eraser.data.schema import Profile
from eraser.evaluate import build_items
from interp.probe import LinearProbe, features_from_cache, group_split, stratified_split

from .common import Context, base_parser, limited, load_context, out_dir, save_json

POSITIONS = ("last", "image_mean", "text_mean")
TASKS = ("identity", "forget", "birthplace")
TASK_LABELS = {"identity": "profile identity", "forget": "forget vs retain", "birthplace": "birthplace"}
QUESTION = ("After MLLMEraser, can a linear probe still read the forgotten facts (identity, forget membership, "
            "birthplace) from the residual stream?")


# -- data ----------------------------------------------------------------------
def probe_queries(profiles: Sequence[Profile], forget_ids: set[str]) -> tuple[list, list[str], dict[str, torch.Tensor]]:
    """VQA queries of ``profiles`` and their labels for every task (identity, forget flag, birthplace)."""
    items = [it for it in build_items(profiles) if it.modality == "vqa"]
    if not items:
        raise ValueError("no VQA questions to probe")
    index = {p.id: i for i, p in enumerate(profiles)}
    facts = {p.id: p.facts for p in profiles}
    cities = sorted({f.get("birthplace", "?") for f in facts.values()})
    labels = {
        "identity": torch.tensor([index[it.profile_id] for it in items]),
        "forget": torch.tensor([int(it.profile_id in forget_ids) for it in items]),
        "birthplace": torch.tensor([cities.index(facts[it.profile_id].get("birthplace", "?")) for it in items]),
    }
    return [it.image for it in items], [it.prompt for it in items], labels


def site_list(model) -> list[dict[str, Any]]:
    """Vision blocks (image mean) then LM blocks x positions, each with a stable key."""
    sites = [{"key": f"vision.blocks.{l}.hook_resid_post", "name": f"vision.blocks.{l}.hook_resid_post",
              "tower": "vision", "layer": l, "position": "image_mean"} for l in range(model.n_vision_layers)]
    for pos in POSITIONS:
        sites += [{"key": f"blocks.{l}.hook_resid_post@{pos}", "name": f"blocks.{l}.hook_resid_post",
                   "tower": "lm", "layer": l, "position": pos} for l in range(model.n_layers)]
    return sites


def collect(model, images: list, prompts: list[str], sites: list[dict], batch_size: int, hooks: list | None,
            desc: str, progress: bool) -> dict[str, torch.Tensor]:
    """``{site key: [n_queries, d]}`` from one forward pass per batch (all sites and positions at once)."""
    names = sorted({s["name"] for s in sites})
    out: dict[str, list[torch.Tensor]] = {s["key"]: [] for s in sites}
    starts = range(0, len(prompts), batch_size)
    for s0 in tqdm(starts, desc=desc, disable=not progress, leave=False):
        inputs = model.encode(images=images[s0:s0 + batch_size], prompts=prompts[s0:s0 + batch_size])
        with torch.no_grad():
            _, cache = model.run_with_cache(inputs, names=names, hooks=hooks)
        by_pos = {pos: features_from_cache(model, cache, inputs, pos) for pos in POSITIONS}
        for s in sites:
            out[s["key"]].append(by_pos[s["position"]][s["name"]].detach().float().cpu())
    return {k: torch.cat(v) for k, v in out.items()}


# -- scoring -------------------------------------------------------------------
def scores(probe: LinearProbe, X: torch.Tensor, y: torch.Tensor, is_forget: torch.Tensor) -> dict[str, float | None]:
    """Accuracy, balanced accuracy (mean per-class recall) and accuracy on forget / retain queries."""
    pred = probe.predict(X)
    ok = (pred == y).float()
    recalls = [float(ok[y == c].mean()) for c in torch.unique(y)]
    f, r = is_forget.bool(), ~is_forget.bool()
    return {"acc": float(ok.mean()), "balanced_acc": sum(recalls) / len(recalls),
            "forget_acc": float(ok[f].mean()) if f.any() else None,
            "retain_acc": float(ok[r].mean()) if r.any() else None}


def forget_chance(y: torch.Tensor, tr: torch.Tensor, te: torch.Tensor, is_forget: torch.Tensor
                  ) -> dict[str, float | None]:
    """The references for ``forget_acc`` (accuracy on the forget profiles' held-out queries).

    ``chance``: the expected ``forget_acc`` of guessing at random with the training labels' frequencies.  Why not
    the majority class over the whole test set (what was printed before): on the forget rows, which all share
    a few labels (one, for identity), that number is not the chance level of ``forget_acc``.
    ``constant_guess``: the ``forget_acc`` of always answering the training majority class, which for a
    single-class slice can be 1.0: a probe near it has learned nothing the slice's label frequency does not
    give.  Both None without forget queries among the held-out ones.
    """
    rows = te[is_forget[te].bool()]
    if rows.numel() == 0:
        return {"chance": None, "constant_guess": None}
    prior = torch.bincount(y[tr], minlength=int(y.max()) + 1).double() / tr.numel()
    majority = int(torch.bincount(y[tr]).argmax())  # ties: the smallest label
    return {"chance": float(prior[y[rows]].mean()), "constant_guess": float((y[rows] == majority).double().mean())}


def relative_shift(v: torch.Tensor, s: torch.Tensor, mask: torch.Tensor) -> float | None:
    """``||mean(steered - vanilla)|| / mean ||vanilla||`` over the rows in ``mask``."""
    if not mask.any():
        return None
    delta = (s[mask] - v[mask]).mean(0).norm()
    return float(delta / v[mask].norm(dim=1).mean().clamp_min(1e-12))


def probe_site(Xv: torch.Tensor, Xs: torch.Tensor, y: torch.Tensor, is_forget: torch.Tensor, tr: torch.Tensor,
               te: torch.Tensor, weight_decay: float) -> dict[str, Any]:
    pv = LinearProbe.fit(Xv[tr], y[tr], weight_decay=weight_decay)
    res: dict[str, Any] = {"vanilla_probe": {"train_acc": pv.accuracy(Xv[tr], y[tr]),
                                             "vanilla": scores(pv, Xv[te], y[te], is_forget[te]),
                                             "steered": scores(pv, Xs[te], y[te], is_forget[te])}}
    if torch.equal(Xv, Xs):  # steering never reaches this site (e.g. the vision tower): same probe
        ps = pv
    else:
        ps = LinearProbe.fit(Xs[tr], y[tr], weight_decay=weight_decay)
    res["steered_probe"] = {"train_acc": ps.accuracy(Xs[tr], y[tr]),
                            "steered": scores(ps, Xs[te], y[te], is_forget[te])}
    return res


def summarise(results: dict[str, Any], sites: list[dict]) -> dict[str, Any]:
    """Per task and condition: the most readable LM site (earliest on ties) and the final block's last token.

    The metric is accuracy on the forget profiles' held-out queries for
    identity and birthplace (what was to be forgotten), balanced accuracy for
    forget vs retain.
    """
    out: dict[str, Any] = {}
    lm = [s for s in sites if s["tower"] == "lm"]
    final = max(s["layer"] for s in lm)
    final_key = next(s["key"] for s in lm if s["layer"] == final and s["position"] == "last")
    for task, tr in results.items():
        if "skipped" in tr:
            out[task] = {"skipped": tr["skipped"]}
            continue
        metric = "balanced_acc" if task == "forget" else "forget_acc"
        row: dict[str, Any] = {"metric": metric,
                               "chance": tr["balanced_chance"] if task == "forget" else tr["chance"],
                               "constant_guess": None if task == "forget" else tr["constant_guess"]}
        for probe, run in (("vanilla_probe", "vanilla"), ("vanilla_probe", "steered"), ("steered_probe", "steered")):
            vals = [(tr["sites"][s["key"]][probe][run][metric], s["key"]) for s in lm]
            vals = [v for v in vals if v[0] is not None]
            best = max(vals, key=lambda v: v[0]) if vals else (None, None)  # max() keeps the first (earliest) on ties
            row[f"{probe}_on_{run}"] = {"best": best[0], "best_site": best[1],
                                        "final_last_token": tr["sites"][final_key][probe][run][metric]}
        out[task] = row
    return out


SPLITS = ("queries", "profiles")


def run(ctx: Context, weight_decay: float = 1e-3, train_frac: float = 0.7, split: str = "queries") -> dict[str, Any]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    bench, model, limit = ctx.setup.bench, ctx.model, ctx.args.limit
    forget = limited(bench.forget, limit)
    retain = limited(bench.retain, None if limit is None else max(limit - len(forget), 2))
    profiles = forget + retain
    images, prompts, labels = probe_queries(profiles, {p.id for p in forget})
    sites = site_list(model)
    bs = ctx.args.batch_size
    t0 = time.perf_counter()
    Xv = collect(model, images, prompts, sites, bs, None, "features (vanilla)", ctx.progress)
    Xs = collect(model, images, prompts, sites, bs, ctx.hooks(), "features (steered)", ctx.progress)
    collect_s = time.perf_counter() - t0
    is_forget = labels["forget"]
    if split == "queries":
        tr, te = stratified_split(labels["identity"], train_frac=train_frac, seed=ctx.setup.seed)
    else:  # whole profiles held out, forget and retain ones each in proportion
        tr, te = group_split(labels["identity"], is_forget, train_frac=train_frac, seed=ctx.setup.seed)
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=len(TASKS) * len(sites), desc="probes", disable=not ctx.progress, leave=False)
    for task in TASKS:
        y = labels[task]
        why = None
        if split == "profiles" and task == "identity":
            why = "held-out profiles: a person never seen in training has no class to be read as"
        elif split == "profiles" and not bool(is_forget[te].any()):
            why = (f"no forget profile is held out ({len(forget)} forget profile(s): a single one trains); "
                   "use more profiles (--limit) or a larger forget ratio")
        elif torch.unique(y[tr]).numel() < 2:  # e.g. every probed profile born in the same city (tiny --limit)
            why = "fewer than 2 classes among these profiles" + (" (training side)" if split == "profiles" else "")
        elif te.numel() == 0:
            why = "no held-out queries"
        if why:
            results[task] = {"label": TASK_LABELS[task], "skipped": why}
            bar.update(len(sites))
            continue
        counts = torch.unique(y[te], return_counts=True)[1]
        task_res: dict[str, Any] = {"label": TASK_LABELS[task], "n_classes": int(torch.unique(y).numel()),
                                    **forget_chance(y, tr, te, is_forget),
                                    "majority_chance": float(counts.max()) / te.numel(),
                                    "balanced_chance": 1.0 / counts.numel(), "sites": {}}
        for s in sites:
            k = s["key"]
            task_res["sites"][k] = probe_site(Xv[k], Xs[k], y, is_forget, tr, te, weight_decay)
            bar.update(1)
        results[task] = task_res
    bar.close()
    probe_s = time.perf_counter() - t0
    fmask = is_forget.bool()
    shift = {s["key"]: {"forget": relative_shift(Xv[s["key"]], Xs[s["key"]], fmask),
                        "retain": relative_shift(Xv[s["key"]], Xs[s["key"]], ~fmask)} for s in sites}
    return {
        "question": QUESTION,
        "config": ctx.config(),
        "data": {"n_queries": len(prompts), "n_profiles": len(profiles), "n_forget_profiles": len(forget),
                 "n_train": int(tr.numel()), "n_test": int(te.numel()), "modality": "vqa",
                 "split": split, "split_note": (
                     "seeded per-profile stratified split of the queries (held-out queries of seen profiles)"
                     if split == "queries" else "seeded split of whole profiles, forget and retain ones each in "
                     "proportion (held-out profiles never seen in training)")},
        "sites": sites,
        "positions": list(POSITIONS),
        "tasks": results,
        "shift": shift,
        "summary": summarise(results, sites),
        "timing": {"collect_s": collect_s, "probe_s": probe_s},
    }


def print_summary(res: dict[str, Any]) -> None:
    print(f"\n{res['question']}")
    d = res["data"]
    print(f"  {d['n_queries']} VQA queries of {d['n_profiles']} profiles ({d['n_forget_profiles']} forget); "
          f"{d['n_test']} held out "
          f"({'whole profiles' if d.get('split') == 'profiles' else 'queries of every profile'}); "
          f"strength {res['config']['eraser']['strength']:g}")
    print("  best LM site / final block last token:")
    for task, s in res["summary"].items():
        if "skipped" in s:
            print(f"  {TASK_LABELS[task]:<17} skipped: {s['skipped']}")
            continue
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731

        def f(x: dict) -> str:
            return f"{fmt(x['best'])} / {fmt(x['final_last_token'])}"
        const = "" if s.get("constant_guess") is None else f" (constant guess {s['constant_guess']:.2f})"
        print(f"  {TASK_LABELS[task]:<17} {s['metric']:<12} chance {fmt(s['chance'])}{const} | "
              f"vanilla probe: vanilla run "
              f"{f(s['vanilla_probe_on_vanilla'])}, steered run {f(s['vanilla_probe_on_steered'])} | "
              f"steered probe: {f(s['steered_probe_on_steered'])}")
    lm = [s for s in res["sites"] if s["tower"] == "lm" and s["position"] == "last"]
    final = max(lm, key=lambda s: s["layer"])["key"]
    sh = res["shift"][final]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    print(f"  activation shift by steering at {final} (|mean change| / mean norm): forget {fmt(sh['forget'])}, "
          f"retain {fmt(sh['retain'])}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = base_parser("probing", __doc__)
    ap.add_argument("--weight-decay", type=nonneg_float, default=1e-3, help="probe L2 weight decay (>= 0)")
    ap.add_argument("--split", choices=SPLITS, default="queries",
                    help="hold out queries of every profile (queries), or whole profiles (profiles: is the fact "
                         "readable in people the probe never saw, not only by recognising the person; identity "
                         "is then skipped)")
    args = ap.parse_args(argv)
    ctx = load_context(args)
    out = out_dir(args)
    res = run(ctx, weight_decay=args.weight_decay, split=args.split)
    res = save_json(out / "probing.json", res)
    from eraser.plots import plot_probe_accuracy

    png = plot_probe_accuracy(res, out / "probe_accuracy.png")
    print_summary(res)
    print(f"  wrote {out / 'probing.json'} and {png}")
    return res


if __name__ == "__main__":
    main(sys.argv[1:])
