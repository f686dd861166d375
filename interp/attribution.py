"""Direct logit attribution: how much each attention head and each MLP writes a logit direction, exactly.

Why: patching says which sites *matter* (through everything downstream);
direct attribution says which components *write* the answer into the final
residual stream themselves.  The residual stream at the last block's output is
a sum of components: the block-0 input (``hook_embed``: token embeddings with
the image features scattered in), every head's output (``attn.hook_z``
through its slice of ``o_proj``) and every MLP's output.  The final RMSNorm is
linear once its per-position scale is fixed, so with the scale read from the
run itself each component's share of a logit difference is exact: the shares
add up to the logit difference the model computed (tested to float rounding).

>>> from interp.tiny import tiny_vlm
>>> model = tiny_vlm("llava", n_layers=2)
>>> inputs = model.encode(images=[None], prompts=["who is this person"])
>>> logits, cache = model.run_with_cache(inputs, names=attribution_names(model))
>>> att = logit_attribution(model, cache, good=[5], bad=[7])
>>> att.labels[:3], att.values.shape                   # [component, batch]
(['embed', 'L0H0', 'L0H1'], torch.Size([12, 1]))
>>> last = logits[0, inputs.last_index[0]]
>>> bool(abs(att.values.sum(0)[0] - (last[5] - last[7])) < 1e-4)
True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from .adapters import get_module
from .cache import ActivationCache
from .io import JsonRecord, json_number
from .lens import final_norm_scale

if TYPE_CHECKING:
    from .model import HookedVLM

Ids = Union[int, Sequence[int], Tensor]


def attribution_names(model: "HookedVLM") -> list[str]:
    """The hook names :func:`logit_attribution` needs in the cache."""
    n = model.n_layers
    return (["hook_embed"] + [f"blocks.{l}.attn.hook_z" for l in range(n)]
            + [f"blocks.{l}.hook_mlp_out" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"])


def o_proj_weight(model: "HookedVLM", layer: int) -> Float[Tensor, "d_model head_x_d_head"]:
    """Block ``layer``'s attention output projection weight: each head writes through its column slice.

    Raises for an output projection with a bias (no supported architecture has one; its share would belong to
    no head).
    """
    o_proj = get_module(model.hf_model, model.site(f"blocks.{layer}.attn.hook_z").module)
    if getattr(o_proj, "bias", None) is not None:
        raise NotImplementedError(f"layer {layer}'s output projection has a bias: heads do not sum to its output")
    return o_proj.weight


def head_outputs(model: "HookedVLM", z: Float[Tensor, "... head d_head"], layer: int
                 ) -> Float[Tensor, "... head d_model"]:
    """Each head's own output in the residual stream: ``z_h @ W_O[:, h]^T`` (they sum to ``hook_attn_out``)."""
    n_heads, d_head = z.shape[-2:]
    w = o_proj_weight(model, layer).T.reshape(n_heads, d_head, -1).to(z)  # [head, d_head, d_model]
    return torch.einsum("...hd,hdm->...hm", z, w)


@dataclass
class Attribution(JsonRecord):
    """Each component's direct contribution to a logit difference at the last prompt token: ``values[i, b]``
    is component ``labels[i]`` (``"embed"``, ``"L{l}H{h}"``, ``"L{l}.mlp"``, ``"other"``) in batch row ``b``.

    ``"other"`` is the part of the final residual no component wrote: what hooks added to the residual
    stream directly (a steering vector's own share), and float rounding (~1e-6) in an unhooked run."""

    labels: list[str]
    values: Float[Tensor, "component batch"]
    n_layers: int
    n_heads: int

    def by_head(self) -> np.ndarray:
        """Batch-mean contribution of every head, ``[layer, head]``."""
        idx = [self.labels.index(f"L{l}H{h}") for l in range(self.n_layers) for h in range(self.n_heads)]
        return self.values[idx].mean(1).reshape(self.n_layers, self.n_heads).numpy()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``save`` writes it as strict JSON): labels, ``values[component][row]``, the model's shape."""
        return {"format": "interp.Attribution", "labels": list(self.labels), "values": self.values.tolist(),
                "n_layers": self.n_layers, "n_heads": self.n_heads}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Attribution":
        if d.get("format") != "interp.Attribution":
            raise ValueError(f"format is {d.get('format')!r}, not 'interp.Attribution'")
        values = torch.tensor([[json_number(x) for x in row] for row in d["values"]], dtype=torch.float32)
        labels = [str(x) for x in d["labels"]]
        if values.dim() != 2 or values.shape[0] != len(labels):
            raise ValueError(f"{len(labels)} labels for values of shape {tuple(values.shape)}")
        return cls(labels, values, int(d["n_layers"]), int(d["n_heads"]))

    def top(self, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` components with the largest batch-mean contribution in absolute value."""
        mean = self.values.mean(1)
        order = torch.argsort(mean.abs(), descending=True)[:k]
        return [(self.labels[i], float(mean[i])) for i in order.tolist()]


def _ids(ids: Ids, b: int) -> Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        return t.expand(b)
    if t.numel() != b:
        raise ValueError(f"need one token id or one per row ({b}), got {t.numel()}")
    return t


def logit_attribution(model: "HookedVLM", cache: ActivationCache, good: Ids, bad: Ids | None = None
                      ) -> Attribution:
    """Direct contribution of every component to ``logit[good] - logit[bad]`` (``logit[good]`` without ``bad``)
    at each row's last prompt token; ``cache`` must hold :func:`attribution_names` (one run, any hooks).

    Exact: the final norm's per-row scale is recovered from the cached final residual and the norm's weight
    (RMSNorm: ``norm(x) = w * x / rms(x)``), so the contributions sum to the logit difference of that run,
    hooks included: whatever a hook wrote to the residual stream itself is the ``"other"`` component.
    """
    missing = [n for n in attribution_names(model) if n not in cache]
    if missing:
        raise ValueError(f"the cache lacks {missing[:3]}{'...' if len(missing) > 3 else ''}: run it with "
                         "names=interp.attribution.attribution_names(model)")
    n = model.n_layers
    x = cache.last(f"blocks.{n - 1}.hook_resid_post").float()  # [batch, d_model]
    b = x.shape[0]
    w = get_module(model.hf_model, model.adapter.final_norm).weight.float()
    inv_rms = final_norm_scale(model, cache.last(f"blocks.{n - 1}.hook_resid_post"))  # y = inv_rms * w * x
    w_u = get_module(model.hf_model, model.adapter.lm_head).weight.float()  # [vocab, d_model]
    direction = w_u[_ids(good, b).to(w_u.device)]
    if bad is not None:
        direction = direction - w_u[_ids(bad, b).to(w_u.device)]
    read = (direction * w * inv_rms[:, None]).detach()  # [batch, d_model]: what one unit of residual is worth

    labels, parts = ["embed"], [cache.last("hook_embed").float()]
    for l in range(n):
        heads = head_outputs(model, cache.last(f"blocks.{l}.attn.hook_z").float(), l)  # [batch, head, d_model]
        labels += [f"L{l}H{h}" for h in range(heads.shape[1])]
        parts += list(heads.unbind(1))
        labels.append(f"L{l}.mlp")
        parts.append(cache.last(f"blocks.{l}.hook_mlp_out").float())
    labels.append("other")  # what hooks wrote into the residual stream themselves (steering), plus rounding
    parts.append(x - torch.stack(parts).sum(0).to(x.device))
    values = torch.stack([(p.to(read.device) * read).sum(-1) for p in parts]).detach().cpu()
    return Attribution(labels, values, n, model.head_counts["lm"][0])
