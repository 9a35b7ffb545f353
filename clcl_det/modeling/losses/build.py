"""CONTINUAL_LOSS_REGISTRY: extra training terms (drift, orthogonality, distillation, ...)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ...utils.registry import Registry, lookup

__all__ = ["CONTINUAL_LOSS_REGISTRY", "ContinualLoss", "build_continual_losses", "teacher_pyramid"]

CONTINUAL_LOSS_REGISTRY = Registry("CONTINUAL_LOSS")
CONTINUAL_LOSS_REGISTRY.__doc__ = """Continual losses: (cfg) -> ContinualLoss."""


class ContinualLoss(nn.Module):
    """A training term computed from the model's outputs on the batch (and, if `needs_teacher`,
    the previous task's frozen model). Returns a dict of named, already weighted losses."""

    needs_teacher: bool = False

    def forward(self, model: nn.Module, outputs: Dict[str, Any], batched_inputs: List[Dict[str, Any]],
                teacher: Optional[nn.Module]) -> Dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


def build_continual_losses(cfg: Any) -> nn.ModuleList:
    """The losses named in MODEL.CONTINUAL_LOSSES."""
    return nn.ModuleList(
        lookup(CONTINUAL_LOSS_REGISTRY, n, "MODEL.CONTINUAL_LOSSES")(cfg) for n in cfg.MODEL.CONTINUAL_LOSSES
    )


def teacher_pyramid(teacher: nn.Module, outputs: Dict[str, Any]) -> Dict[str, Tensor]:
    """The teacher's FPN levels on the batch, from the student's (shared, frozen) CLIP taps;
    computed once per batch and kept in `outputs`."""
    if "teacher_features" not in outputs:
        with torch.no_grad():
            outputs["teacher_features"] = teacher.backbone.pyramid_features(outputs["backbone"]["taps"])
    return outputs["teacher_features"]
