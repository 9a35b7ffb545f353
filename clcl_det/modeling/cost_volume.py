"""CL-CLIP's cost volume: dense cosine responses V.T^T of the frozen CLIP map against the class
text embeddings, and the category prior derived from it (never trained, so it cannot drift)."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["cost_volume", "category_prior", "normalize_prior", "inset_boxes", "PRIOR_NORMS"]

PRIOR_NORMS = ("softmax", "sigmoid", "none")


def cost_volume(dense: Tensor, text: Tensor) -> Tensor:
    """C[b, k, y, x] = <V[b, :, y, x], T[k]>: B x D x h x w and K x D -> B x K x h x w (cosine for
    L2-normalised inputs)."""
    return torch.einsum("bdhw,kd->bkhw", dense, text.to(dense.dtype))


@torch.no_grad()
def normalize_prior(cost: Tensor, temperature: float, norm: str) -> Tensor:
    """The prior over [classes..., background] from cosines `cost` with the classes on dim 1 and
    the background last (a dense volume B x (K+1) x h x w, or RoI means R x (K+1)).

    softmax: softmax over the K+1 columns of C / T;
    sigmoid: sigmoid((C_k - C_bg) / T) per class, so class k's map depends on its own text and the
    background's only (background column = 1 - max_k);
    none: the raw cosines.
    """
    if norm == "softmax":
        return (cost / temperature).softmax(dim=1)
    if norm == "sigmoid":
        fg = torch.sigmoid((cost[:, :-1] - cost[:, -1:]) / temperature)
        return torch.cat([fg, 1 - fg.amax(dim=1, keepdim=True)], dim=1)
    if norm == "none":
        return cost
    raise ValueError(f"MODEL.CLCLIP.COST_VOLUME.NORM '{norm}' is not one of {PRIOR_NORMS}")


@torch.no_grad()
def category_prior(dense: Tensor, text: Tensor, background: Tensor, temperature: float = 0.01,
                   norm: str = "softmax") -> Tensor:
    """The prior over [classes..., background] of a dense map: B x (K+1) x h x w
    (`normalize_prior` of the cost volume against the classes' and the background's texts)."""
    return normalize_prior(cost_volume(dense, torch.cat([text, background[None]], dim=0)), temperature, norm)


def inset_boxes(boxes: Tensor, inset: float, stride: float) -> Tensor:
    """XYXY boxes (n x 4) moved in by `inset` cells of `stride` pixels on every side, never below
    half a cell across: the part of a box whose cells hold the object rather than its context."""
    centre, half = (boxes[:, :2] + boxes[:, 2:]) / 2, (boxes[:, 2:] - boxes[:, :2]) / 2
    half = (half - inset * stride).clamp(min=stride / 4)
    return torch.cat([centre - half, centre + half], dim=1)
