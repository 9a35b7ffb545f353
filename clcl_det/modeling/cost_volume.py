"""CL-CLIP's cost volume: dense cosine responses V.T^T of the frozen CLIP map against the class
text embeddings, and the category prior derived from it (never trained, so it cannot drift)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cost_volume", "category_prior", "PRIOR_NORMS"]

PRIOR_NORMS = ("softmax", "sigmoid", "none")


def cost_volume(dense: Tensor, text: Tensor) -> Tensor:
    """C[b, k, y, x] = <V[b, :, y, x], T[k]>: B x D x h x w and K x D -> B x K x h x w (cosine for
    L2-normalised inputs)."""
    return torch.einsum("bdhw,kd->bkhw", dense, text.to(dense.dtype))


@torch.no_grad()
def category_prior(dense: Tensor, text: Tensor, background: Tensor, temperature: float = 0.01,
                   norm: str = "softmax") -> Tensor:
    """The prior over [classes..., background]: B x (K+1) x h x w.

    sigmoid: sigmoid((C_k - C_bg) / T) per class, so class k's map depends on its own text and the
    background's only, never on classes added after it (background column = 1 - max_k);
    softmax: softmax over K+1 of C / T (every class's map changes when the vocabulary grows);
    none: the raw cosines.
    """
    cost = cost_volume(dense, torch.cat([text, background[None]], dim=0))
    if norm == "softmax":
        return (cost / temperature).softmax(dim=1)
    if norm == "sigmoid":
        fg = torch.sigmoid((cost[:, :-1] - cost[:, -1:]) / temperature)
        return torch.cat([fg, 1 - fg.amax(dim=1, keepdim=True)], dim=1)
    if norm == "none":
        return cost
    raise ValueError(f"MODEL.CLCLIP.COST_VOLUME.NORM '{norm}' is not one of {PRIOR_NORMS}")
