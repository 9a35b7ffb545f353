"""Distillation of the previous task's model on the current images: the Faster-ILOD baseline (FPN
features, RPN outputs, RoI head on the teacher's proposals) and the unbiased variant CL-CLIP uses (RPN outputs +
KL on [old classes, background] with the new classes counted as background, MiB's unbiased
distillation)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from ..sampling import image_generator
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss, LossInputs, TeacherOutputs

__all__ = ["FasterILODDistill", "UnbiasedDistill", "rpn_distillation", "logit_distillation",
           "unbiased_logit_distillation", "teacher_outputs", "filtered_feature_distillation",
           "filtered_rpn_distillation", "roi_distillation", "teacher_proposals"]


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


def filtered_feature_distillation(student: Dict[str, Tensor], teacher: Dict[str, Tensor]) -> Tensor:
    """Faster ILOD's feature term, summed over levels: mean of max(0, (t - mean t) - (s - mean s))
    (L1 on mean-subtracted maps, only where the teacher's response exceeds the student's)."""
    terms = [F.relu((teacher[k] - teacher[k].mean()) - (student[k] - student[k].mean())).mean() for k in student]
    return torch.stack(terms).sum()


def filtered_rpn_distillation(student_obj: List[Tensor], student_deltas: List[Tensor], teacher_obj: List[Tensor],
                              teacher_deltas: List[Tensor], box_threshold: float = 0.1) -> Tensor:
    """Faster ILOD's RPN term, averaged over levels: mean of max(0, t - s)^2 on the objectness
    logits, plus the squared delta error summed over the 4 coordinates and averaged over anchors,
    counted where the teacher's objectness exceeds the student's by more than `box_threshold`."""
    terms = []
    for so, sd, to, td in zip(student_obj, student_deltas, teacher_obj, teacher_deltas):
        diff = to - so  # B x A x H x W
        B, A, H, W = so.shape
        mask = (diff > box_threshold).to(sd.dtype)
        box = ((sd - td).view(B, A, 4, H, W).pow(2).sum(2) * mask).mean()
        terms.append(F.relu(diff).pow(2).mean() + box)
    return torch.stack(terms).mean()


def roi_distillation(student_logits: Tensor, student_deltas: Tensor, teacher_logits: Tensor,
                     teacher_deltas: Tensor) -> Tensor:
    """Faster ILOD's RoI term on the teacher's proposals: L2 (mean over RoIs and classes) between
    the logits of [old classes, background], each model's logits centred on its own mean over
    all of its classes (student: old + new + background), plus the box-delta L2 summed over the
    4 coordinates and averaged over RoIs (class-agnostic regression here)."""
    k_old = teacher_logits.shape[1] - 1
    s = student_logits - student_logits.mean(dim=1, keepdim=True)
    t = teacher_logits - teacher_logits.mean(dim=1, keepdim=True)
    s = torch.cat([s[:, :k_old], s[:, -1:]], dim=1)
    cls = (s - t).pow(2).mean()
    box = (student_deltas - teacher_deltas).pow(2).sum(dim=1).mean()
    return cls + box


def teacher_proposals(boxes: List[Tensor], seeds: List[Optional[int]], top: int, num: int) -> List[Tensor]:
    """Per image, `num` proposals drawn without replacement from the teacher's `top` highest-scoring
    ones (its proposals come sorted by objectness), seeded by the image's sample seed."""
    out = []
    for b, seed in zip(boxes, seeds):
        b = b[:top]
        g = image_generator(seed, 7)
        perm = torch.randperm(len(b), generator=g) if g is not None else torch.randperm(len(b))
        out.append(b[perm[:num].to(b.device)])
    return out


@CONTINUAL_LOSS_REGISTRY.register()
class FasterILODDistill(ContinualLoss):
    """Faster ILOD (Peng et al. 2020): the previous task's model distilled on the current images by
    three terms (MODEL.DISTILL): `loss_ilod_feat` on the FPN maps, `loss_ilod_rpn` on the
    RPN outputs, `loss_ilod_roi` on `roi_samples` of the teacher's `roi_top` best proposals,
    both models' RoI heads run on them."""

    needs_teacher = True
    loss_names = ("loss_ilod_feat", "loss_ilod_rpn", "loss_ilod_roi")

    @configurable
    def __init__(self, *, feature_weight: float = 1.0, rpn_weight: float = 1.0, roi_weight: float = 1.0,
                 rpn_box_threshold: float = 0.1, roi_top: int = 128, roi_samples: int = 64):
        super().__init__()
        if roi_top < 1 or roi_samples < 1:
            raise ValueError(f"MODEL.DISTILL: ROI_TOP ({roi_top}) and ROI_SAMPLES ({roi_samples}) must be >= 1")
        self.feature_weight, self.rpn_weight, self.roi_weight = feature_weight, rpn_weight, roi_weight
        self.rpn_box_threshold, self.roi_top, self.roi_samples = rpn_box_threshold, roi_top, roi_samples

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        d = cfg.MODEL.DISTILL
        return {"feature_weight": d.FEATURE_WEIGHT, "rpn_weight": d.RPN_WEIGHT, "roi_weight": d.ROI_WEIGHT,
                "rpn_box_threshold": d.RPN_BOX_THRESHOLD, "roi_top": d.ROI_TOP, "roi_samples": d.ROI_SAMPLES}

    def forward(self, model: nn.Module, outputs: LossInputs, batched_inputs: List[Dict[str, Any]],
                teacher: Optional[TeacherOutputs]) -> Dict[str, Tensor]:
        if teacher is None:
            return {}
        s_feats = outputs.backbone["features"]
        t_feats = teacher.features()
        ctx = outputs.ctx
        # the teacher's proposals (sorted by objectness), sampled per image by its sample seed
        props = teacher_proposals(teacher.proposals(), [x.get("seed") for x in batched_inputs], self.roi_top,
                                  self.roi_samples)
        t_out = teacher.roi_outputs(props)
        s_out = model.roi_heads.predict(model.roi_heads.pool(s_feats, props, ctx.image_sizes), props, ctx)
        t_obj, t_deltas = teacher.rpn()
        rpn = filtered_rpn_distillation(outputs.rpn["objectness"], outputs.rpn["deltas"], t_obj, t_deltas,
                                        self.rpn_box_threshold)
        return {"loss_ilod_feat": self.feature_weight * filtered_feature_distillation(s_feats, t_feats),
                "loss_ilod_rpn": self.rpn_weight * rpn,
                "loss_ilod_roi": self.roi_weight * roi_distillation(s_out["logits"], s_out["deltas"],
                                                                   t_out["logits"], t_out["deltas"])}


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
