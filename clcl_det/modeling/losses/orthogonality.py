"""CL-CLIP's orthogonality loss: class pathways should not co-activate at the same places."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ...config import configurable
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss

__all__ = ["Orthogonality", "orthogonality_loss"]


def orthogonality_loss(maps: Tensor) -> Tensor:
    """maps: R x S x P (L2-normalised activation maps of the S pathways of each RoI).
    mean_r mean_{k != k'} (a_{r,k} . a_{r,k'})^2; 0 for disjoint maps, 1 for identical ones."""
    R, S, _ = maps.shape
    if S < 2 or R == 0:
        return maps.sum() * 0.0
    gram = maps @ maps.transpose(1, 2)
    off = ~torch.eye(S, dtype=torch.bool, device=maps.device)
    return gram[:, off].pow(2).mean()


@CONTINUAL_LOSS_REGISTRY.register()
class Orthogonality(ContinualLoss):
    """L_orth over the multi-expert head's pathway maps (MODEL.CLCLIP.ORTH_WEIGHT)."""

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
        return {"loss_orth": self.weight * orthogonality_loss(maps)}
