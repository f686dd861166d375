"""Direct attribution of a linear readout of the residual stream: which components write what a probe, a
steering gate or any direction reads, exactly.

Why: :func:`interp.attribution.logit_attribution` answers this for the logits.  The same question matters for
every linear readout in the middle of the model: a probe's score, a steering vector's projection, the gate of
a test-time eraser (``w . h`` at a block's input).  The residual stream at a block's input is the sum of what
wrote it (the embeddings, every earlier head and MLP), and a linear readout of a sum is the sum of the
readouts, so each component's share is exact, at the last prompt token or over the prompt's mean alike.  The
embeddings are split by modality: ``"image"`` (the image features placed at the image tokens, the whole vision
tower and projector) and ``"text"``, so a multimodal readout says how much of it the image writes directly.

A readout is ``{site: weights}`` over sites ``blocks.{l}.hook_resid_pre`` / ``hook_resid_mid`` /
``hook_resid_post`` (several sites add up: a gate over stacked layers), each ``[d_model]`` or one per row,
``[batch, d_model]``.

>>> from interp.tiny import tiny_vlm
>>> import torch
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None], prompts=["who is this person"])
>>> w = {"blocks.1.hook_resid_pre": torch.ones(model.d_model)}
>>> _, cache = model.run_with_cache(inputs, names=readout_names(model, w))
>>> att = readout_attribution(model, cache, w, read="mean")
>>> att.labels[:3], att.labels[-2:]
(['image', 'text', 'L0H0'], ['L0.mlp', 'other'])
>>> total = (cache["blocks.1.hook_resid_pre"][0].mean(0)).sum()
>>> bool(abs(att.values[:, 0].sum() - total) < 1e-4)
True
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING, Mapping

import torch
from jaxtyping import Float
from torch import Tensor

from .attribution import Attribution, head_outputs
from .cache import ActivationCache

if TYPE_CHECKING:
    from .model import HookedVLM

READS = ("last", "mean")
_SITE = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|mid|post)$")


def _site(model: "HookedVLM", name: str) -> tuple[int, str]:
    m = _SITE.match(name)
    if m is None or int(m.group(1)) >= model.n_layers:
        raise ValueError(f"a readout site is blocks.{{l}}.hook_resid_pre / _mid / _post of the language model "
                         f"(l < {model.n_layers}), got {name!r}")
    return int(m.group(1)), m.group(2)


def _writers(layer: int, kind: str) -> tuple[int, int]:
    """How many blocks' heads and MLPs wrote the residual stream at that site: ``(head_blocks, mlp_blocks)``."""
    return {"pre": (layer, layer), "mid": (layer + 1, layer), "post": (layer + 1, layer + 1)}[kind]


def site_writers(model: "HookedVLM", site: str) -> tuple[int, int]:
    """How many blocks' heads and MLPs wrote the residual stream at a readout site (``blocks.{l}.hook_resid_pre``:
    ``(l, l)``; ``_mid``: ``(l + 1, l)``; ``_post``: ``(l + 1, l + 1)``); the embeddings always did."""
    return _writers(*_site(model, site))


def readout_names(model: "HookedVLM", readout: Mapping[str, Tensor]) -> list[str]:
    """The hook names a cache needs for :func:`readout_attribution` of ``readout``."""
    sites = [(_site(model, s), s) for s in readout]
    heads = max(_writers(*k)[0] for k, _ in sites)
    mlps = max(_writers(*k)[1] for k, _ in sites)
    names = (["hook_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(heads)]
             + [f"blocks.{l}.hook_mlp_out" for l in range(mlps)] + list(readout))
    return [n for n in model.hook_names() if n in set(names)]


def prompt_read(x: Float[Tensor, "batch pos *rest"], cache: ActivationCache, read: str) -> Float[Tensor, "batch *rest"]:
    """``x`` at each row's last prompt token (``"last"``) or its mean over the prompt's real positions, image
    and text tokens, up to the last prompt token (``"mean"``: what :func:`interp.collect.iter_query_activations`
    reads)."""
    b, p = x.shape[:2]
    idx = cache.last_index.to(x.device)
    if read == "last":
        return x[torch.arange(b, device=x.device), idx]
    if read != "mean":
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    pos = torch.arange(p, device=x.device)
    mask = (cache.image_mask | cache.text_mask).to(x.device) & (pos[None, :] <= idx[:, None])
    m = mask.to(x.dtype).reshape(b, p, *([1] * (x.dim() - 2)))
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


def _weights(w: Tensor, batch: int, d: int, site: str) -> Tensor:
    w = w.detach().float()
    if w.shape == (d,):
        return w.expand(batch, d)
    if w.shape == (batch, d):
        return w
    raise ValueError(f"readout weights at {site!r} must be [d_model] ({d}) or [batch, d_model] ({batch}, {d}), "
                     f"got {tuple(w.shape)}")


def readout_attribution(model: "HookedVLM", cache: ActivationCache, readout: Mapping[str, Tensor],
                        read: str = "last") -> Attribution:
    """Each component's direct share of ``sum over sites of weights . read(resid at site)``, per row.

    Components: ``"image"``, ``"text"``, each head ``"L{l}H{h}"`` and MLP ``"L{l}.mlp"`` that wrote any of the
    sites, and ``"other"``: the readout minus the components (what hooks wrote into the residual stream
    themselves, and float rounding), so the values always add up to the readout of that run.  ``cache`` must
    hold :func:`readout_names`.
    """
    if not readout:
        raise ValueError("an empty readout: give {site: weights} for at least one site")
    if read not in READS:
        raise ValueError(f"read must be one of {READS}, got {read!r}")
    missing = [n for n in readout_names(model, readout) if n not in cache]
    if missing:
        raise ValueError(f"the cache lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: run it with "
                         "names=interp.readout.readout_names(model, readout)")
    with torch.no_grad():  # weights may require grad; a readout's share needs none
        return _attribute(model, cache, readout, read)


def _attribute(model: "HookedVLM", cache: ActivationCache, readout: Mapping[str, Tensor], read: str) -> Attribution:
    embed = cache["hook_embed"].float()
    b, d = embed.shape[0], embed.shape[-1]
    n_heads = model.head_counts["lm"][0]
    weights = {s: _weights(w.to(embed.device), b, d, s) for s, w in readout.items()}
    sites = {s: _site(model, s) for s in readout}
    head_blocks = max(_writers(*k)[0] for k in sites.values())
    mlp_blocks = max(_writers(*k)[1] for k in sites.values())
    labels = ["image", "text"]
    for l in range(max(head_blocks, mlp_blocks)):
        labels += [f"L{l}H{h}" for h in range(n_heads)] if l < head_blocks else []
        labels += [f"L{l}.mlp"] if l < mlp_blocks else []
    values = torch.zeros(len(labels) + 1, b)
    total = torch.zeros(b)
    image = cache.image_mask.to(embed.device).unsqueeze(-1)
    # each component read once ([batch, d] or [batch, head, d]), however many sites it writes
    reads = {"image": prompt_read(embed * image, cache, read), "text": prompt_read(embed * ~image, cache, read)}
    reads |= {f"L{l}H": prompt_read(head_outputs(model, cache[f"blocks.{l}.attn.hook_z"].float(), l), cache, read)
              for l in range(head_blocks)}
    reads |= {f"L{l}.mlp": prompt_read(cache[f"blocks.{l}.hook_mlp_out"].float(), cache, read) for l in range(mlp_blocks)}
    for s, w in weights.items():
        heads, mlps = _writers(*sites[s])
        for key in ("image", "text"):
            values[labels.index(key)] += (reads[key] * w).sum(-1).cpu()
        for l in range(heads):
            first = labels.index(f"L{l}H0")
            values[first:first + n_heads] += (reads[f"L{l}H"] * w[:, None, :]).sum(-1).T.cpu()
        for l in range(mlps):
            values[labels.index(f"L{l}.mlp")] += (reads[f"L{l}.mlp"] * w).sum(-1).cpu()
        total += (prompt_read(cache[s].float(), cache, read) * w).sum(-1).cpu()
    values[-1] = total - values[:-1].sum(0)
    return Attribution(labels + ["other"], values, max(head_blocks, mlp_blocks), n_heads)


__all__ = ["prompt_read", "readout_attribution", "readout_names", "site_writers"]
