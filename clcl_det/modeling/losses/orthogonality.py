"""CL-CLIP's orthogonality loss: on a RoI of class y, class y's pathway should not activate where the
other classes' pathways do (cross-category spatial co-activation)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ...config import configurable
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss

__all__ = ["Orthogonality", "orthogonality_loss"]


def orthogonality_loss(maps: Tensor, labels: Optional[Tensor] = None, classes: Optional[Tensor] = None,
                       trainable: Optional[Tensor] = None) -> Tensor:
    """maps: R x S x P, the L2-normalised activation maps of the S class pathways of each RoI.

    Without `labels`: mean_r mean_{k != k'} (a_{r,k} . a_{r,k'})^2 over every pair of pathways.
    With `labels` (R, the RoIs' classes; background and ignored RoIs have no pathway): cross-category
    co-activation, the sum over the foreground RoIs r and the classes k != y_r of
    (a_{r,y_r} . a_{r,k})^2, the labelled class's pathway against the others', divided by R (S - 1)
    like the box loss (by the sampled RoIs, so that a batch split over processes gives the same
    loss): a RoI's mean over its pairs, 0 for a background RoI. `classes` (R x S) names each pathway's class
    (default: pathway s is class s); `trainable` (a bool per class) drops the pairs of two frozen
    experts and detaches a frozen expert's map, so the loss trains the current experts (and the
    features under them), never moves a frozen expert's activations. 0 for disjoint maps, 1 for
    identical ones."""
    R, S, _ = maps.shape
    if labels is None:
        if S < 2 or R == 0:
            return maps.sum() * 0.0
        gram = maps @ maps.transpose(1, 2)
        off = ~torch.eye(S, dtype=torch.bool, device=maps.device)
        return gram[:, off].pow(2).mean()
    if classes is None:
        classes = torch.arange(S, device=maps.device).expand(R, S)
    own = classes == labels[:, None]  # R x S: the labelled class's pathway (none for background)
    pairs = ~own & own.any(dim=1, keepdim=True)
    if trainable is not None:
        live = trainable[classes]  # R x S
        maps = torch.where(live[..., None], maps, maps.detach())
        pairs &= live | (live & own).any(dim=1, keepdim=True)
    if not bool(pairs.any()):
        return maps.sum() * 0.0
    a_own = (maps * own[..., None]).sum(dim=1)  # R x P (zero for background RoIs)
    overlap = (maps @ a_own[:, :, None]).squeeze(2)  # R x S
    return overlap[pairs].pow(2).sum() / (R * (S - 1))


@CONTINUAL_LOSS_REGISTRY.register()
class Orthogonality(ContinualLoss):
    """L_orth over the multi-expert head's pathway maps on its sampled RoIs: each foreground RoI's
    labelled class against the other classes, pairs of two frozen experts left out
    (MODEL.CLCLIP.ORTH_WEIGHT)."""

    loss_names = ("loss_orth",)

    @configurable
    def __init__(self, *, weight: float = 0.1):
        super().__init__()
        self.weight = weight

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        return {"weight": cfg.MODEL.CLCLIP.ORTH_WEIGHT}

    def forward(self, model: nn.Module, outputs: Dict[str, Any], batched_inputs: List[Dict[str, Any]],
                teacher: Optional[nn.Module]) -> Dict[str, Tensor]:
        maps = outputs["roi"].get("expert_maps")
        if maps is None:
            raise ValueError("MODEL.CONTINUAL_LOSSES 'Orthogonality' needs MODEL.ROI_HEADS.NAME MultiExpertRoIHeads")
        if self.weight == 0:
            return {}
        roi = outputs["roi"]
        loss = orthogonality_loss(maps, roi["labels"], roi.get("expert_classes"), roi.get("expert_trainable"))
        return {"loss_orth": self.weight * loss}
