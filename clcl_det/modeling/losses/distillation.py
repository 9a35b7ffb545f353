"""Faster-ILOD-style distillation baseline: the previous task's RPN outputs and old-class RoI
logits, on the current images."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import torch
from torch import Tensor, nn

from ...config import configurable
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss, teacher_pyramid

__all__ = ["FasterILODDistill", "rpn_distillation", "logit_distillation"]


def rpn_distillation(student_obj: List[Tensor], student_deltas: List[Tensor], teacher_obj: List[Tensor],
                     teacher_deltas: List[Tensor]) -> Tensor:
    """Where the teacher's objectness is higher than the student's: L2 on the objectness logits
    and on the box deltas of those anchors (Faster ILOD)."""
    losses = []
    for so, sd, to, td in zip(student_obj, student_deltas, teacher_obj, teacher_deltas):
        mask = (to > so).float()  # B x A x H x W
        B, A, H, W = so.shape
        obj = ((so - to).pow(2) * mask).sum()
        dd = (sd - td).pow(2).view(B, A, 4, H, W).sum(2)
        losses.append((obj + (dd * mask).sum()) / max(so.numel(), 1))
    return torch.stack(losses).sum()


def logit_distillation(student: Tensor, teacher: Tensor) -> Tensor:
    """Mean squared difference of class-centred logits (R x C each)."""
    s = student - student.mean(dim=1, keepdim=True)
    t = teacher - teacher.mean(dim=1, keepdim=True)
    return (s - t).pow(2).mean()


@CONTINUAL_LOSS_REGISTRY.register()
class FasterILODDistill(ContinualLoss):
    """RPN distillation + old-class RoI logit distillation (MODEL.DISTILL)."""

    needs_teacher = True

    @configurable
    def __init__(self, *, rpn_weight: float = 1.0, roi_weight: float = 1.0):
        super().__init__()
        self.rpn_weight, self.roi_weight = rpn_weight, roi_weight

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        return {"rpn_weight": cfg.MODEL.DISTILL.RPN_WEIGHT, "roi_weight": cfg.MODEL.DISTILL.ROI_WEIGHT}

    def forward(self, model: nn.Module, outputs: Dict[str, Any], batched_inputs: List[Dict[str, Any]],
                teacher: Optional[nn.Module]) -> Dict[str, Tensor]:
        if teacher is None:
            return {}
        feats = teacher_pyramid(teacher, outputs)
        rois = outputs["roi"]["rois"]
        with torch.no_grad():
            t_obj, t_deltas = teacher.proposal_generator.head(list(feats.values()))
            t_ctx = teacher.make_context(outputs["ctx"].clip_dense, outputs["ctx"].image_sizes)
            t_logits = teacher.roi_heads.predict(teacher.roi_heads.pool(feats, rois, t_ctx.image_sizes), rois,
                                                 t_ctx)["logits"]
        k_old = t_logits.shape[1] - 1
        s_logits = outputs["roi"]["logits"]
        s_old = torch.cat([s_logits[:, :k_old], s_logits[:, -1:]], dim=1)
        rpn = rpn_distillation(outputs["rpn"]["objectness"], outputs["rpn"]["deltas"], t_obj, t_deltas)
        return {"loss_distill_rpn": self.rpn_weight * rpn,
                "loss_distill_roi": self.roi_weight * logit_distillation(s_old, t_logits)}
