"""Distillation of the previous task's model on the current images: the Faster-ILOD baseline (RPN
outputs + L2 on centred old-class RoI logits) and the unbiased variant CL-CLIP uses (RPN outputs +
KL on [old classes, background] with the new classes counted as background, MiB's unbiased
distillation)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss, LossInputs, TeacherOutputs

__all__ = ["FasterILODDistill", "UnbiasedDistill", "rpn_distillation", "logit_distillation",
           "unbiased_logit_distillation", "teacher_outputs"]


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


def unbiased_logit_distillation(student: Tensor, teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(q || p) per RoI, averaged: q = softmax(teacher / T) over [old classes, background]
    (R x (k_old + 1)); p = the student's softmax(student / T) over [old, new, background]
    (R x (K + 1)) with the new classes' probability added to the background's, so a new object
    the teacher called background costs nothing when the student calls it new. Times T^2.

    Both distributions are taken over the same classes: an old class that either model leaves
    out for a RoI (logit -inf, e.g. outside a per-RoI top-k) is dropped from both, and both are
    renormalised over what remains (background always remains), so the loss stays finite."""
    k_old = teacher.shape[1] - 1
    s = student / temperature
    s = torch.cat([s[:, :k_old], s[:, k_old:].logsumexp(dim=1, keepdim=True)], dim=1)  # new -> background
    t = teacher.to(s.dtype) / temperature
    both = torch.isfinite(s) & torch.isfinite(t)
    logp = s.masked_fill(~both, float("-inf")).log_softmax(dim=1)
    q = t.masked_fill(~both, float("-inf")).softmax(dim=1)
    kl = (torch.xlogy(q, q) - q * logp.masked_fill(~both, 0.0)).sum(dim=1)
    return kl.mean() * temperature ** 2 if kl.numel() else student.sum() * 0.0


def teacher_outputs(teacher: TeacherOutputs, outputs: LossInputs) -> Tuple[List[Tensor], List[Tensor], Tensor]:
    """The teacher's RPN objectness and deltas on the batch and its RoI logits on the student's
    sampled RoIs (R x (k_old + 1), background last)."""
    t_obj, t_deltas = teacher.rpn()
    return t_obj, t_deltas, teacher.roi_logits()


@CONTINUAL_LOSS_REGISTRY.register()
class FasterILODDistill(ContinualLoss):
    """RPN distillation + old-class RoI logit distillation (MODEL.DISTILL)."""

    needs_teacher = True
    loss_names = ("loss_ilod_rpn", "loss_ilod_roi")

    @configurable
    def __init__(self, *, rpn_weight: float = 1.0, roi_weight: float = 1.0):
        super().__init__()
        self.rpn_weight, self.roi_weight = rpn_weight, roi_weight

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        return {"rpn_weight": cfg.MODEL.DISTILL.RPN_WEIGHT, "roi_weight": cfg.MODEL.DISTILL.ROI_WEIGHT}

    def forward(self, model: nn.Module, outputs: LossInputs, batched_inputs: List[Dict[str, Any]],
                teacher: Optional[TeacherOutputs]) -> Dict[str, Tensor]:
        if teacher is None:
            return {}
        t_obj, t_deltas, t_logits = teacher_outputs(teacher, outputs)
        k_old = t_logits.shape[1] - 1
        s_logits = outputs["roi"]["logits"]
        s_old = torch.cat([s_logits[:, :k_old], s_logits[:, -1:]], dim=1)
        rpn = rpn_distillation(outputs["rpn"]["objectness"], outputs["rpn"]["deltas"], t_obj, t_deltas)
        return {"loss_ilod_rpn": self.rpn_weight * rpn,
                "loss_ilod_roi": self.roi_weight * logit_distillation(s_old, t_logits)}


@CONTINUAL_LOSS_REGISTRY.register()
class UnbiasedDistill(ContinualLoss):
    """RPN distillation + unbiased RoI logit distillation (MODEL.CLCLIP.UNBIASED_DISTILL): the previous
    model's old-class/background distribution is kept on every sampled RoI without teaching new
    objects as background."""

    needs_teacher = True
    loss_names = ("loss_distill_rpn", "loss_distill_roi")

    @configurable
    def __init__(self, *, rpn_weight: float = 1.0, roi_weight: float = 0.5, temperature: float = 1.0):
        super().__init__()
        self.rpn_weight, self.roi_weight, self.temperature = rpn_weight, roi_weight, temperature

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        d = cfg.MODEL.CLCLIP.UNBIASED_DISTILL
        return {"rpn_weight": d.RPN_WEIGHT, "roi_weight": d.ROI_WEIGHT, "temperature": d.TEMPERATURE}

    def forward(self, model: nn.Module, outputs: LossInputs, batched_inputs: List[Dict[str, Any]],
                teacher: Optional[TeacherOutputs]) -> Dict[str, Tensor]:
        if teacher is None:
            return {}
        t_obj, t_deltas, t_logits = teacher_outputs(teacher, outputs)
        losses = {"loss_distill_roi": self.roi_weight * unbiased_logit_distillation(
            outputs["roi"]["logits"], t_logits, self.temperature)}
        if self.rpn_weight > 0:
            losses["loss_distill_rpn"] = self.rpn_weight * rpn_distillation(
                outputs["rpn"]["objectness"], outputs["rpn"]["deltas"], t_obj, t_deltas)
        return losses
