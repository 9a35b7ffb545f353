"""CL-CLIP's FPN drift regularisation: keep the pyramid close to the previous task's."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss, LossInputs, TeacherOutputs

__all__ = ["FPNDrift", "feature_drift", "weighted_feature_drift", "param_drift"]


def feature_drift(student: Dict[str, Tensor], teacher: Dict[str, Tensor]) -> Tensor:
    """mean over levels l of the mean squared difference ||P_l - P_l^{t-1}||^2."""
    return torch.stack([(student[k] - teacher[k]).pow(2).mean() for k in student]).mean()


def weighted_feature_drift(student: Dict[str, Tensor], teacher: Dict[str, Tensor], weight: Tensor) -> Tensor:
    """mean over levels l of sum(w_l ||P_l - P_l^{t-1}||^2) / (C sum(w_l)): the squared difference
    averaged with the weight map `weight` (B x 1 x h x w, >= 0) resized to each level (bilinear)."""
    out = []
    for k in student:
        w = F.interpolate(weight, size=student[k].shape[-2:], mode="bilinear", align_corners=False)
        d = (student[k] - teacher[k]).pow(2).sum(dim=1, keepdim=True)
        out.append((w * d).sum() / (w.sum() * student[k].shape[1]).clamp(min=1e-12))
    return torch.stack(out).mean()


def param_drift(student: nn.Module, teacher: Union[nn.Module, Dict[str, Tensor]]) -> Tensor:
    """sum ||theta - theta^{t-1}||^2 over the parameters of a module and the same-named
    parameters of the teacher (a module of the same structure, or its parameters by name)."""
    t = dict(teacher.named_parameters()) if isinstance(teacher, nn.Module) else teacher
    return sum((p - t[n].detach()).pow(2).sum() for n, p in student.named_parameters())


@CONTINUAL_LOSS_REGISTRY.register()
class FPNDrift(ContinualLoss):
    """L_drift on the simple pyramid + FPN, from task 2 on (MODEL.CLCLIP.DRIFT). With
    `prior_weighted` (MODE feature), each cell's difference is weighted by the highest cost-volume
    prior of the earlier tasks' classes there (the multi-expert head's per-batch prior maps): the
    pyramid is held where old objects probably lie and left free elsewhere."""

    needs_teacher = True
    loss_names = ("loss_drift",)

    @configurable
    def __init__(self, *, mode: str = "feature", weight: float = 1.0, prior_weighted: bool = False):
        super().__init__()
        if mode not in ("feature", "param"):
            raise ValueError(f"MODEL.CLCLIP.DRIFT.MODE '{mode}' is not one of feature | param")
        if prior_weighted and mode != "feature":
            raise ValueError(f"MODEL.CLCLIP.DRIFT.PRIOR_WEIGHTED needs MODE feature, not '{mode}'")
        self.mode, self.weight, self.prior_weighted = mode, weight, prior_weighted

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        d = cfg.MODEL.CLCLIP.DRIFT
        return {"mode": d.MODE, "weight": d.WEIGHT, "prior_weighted": d.PRIOR_WEIGHTED}

    def forward(self, model: nn.Module, outputs: LossInputs, batched_inputs: List[Dict[str, Any]],
                teacher: Optional[TeacherOutputs]) -> Dict[str, Tensor]:
        if teacher is None or self.weight == 0:
            return {}
        if self.prior_weighted:
            prior, task = outputs.ctx.extras.get("prior"), outputs.ctx.task
            if prior is None or task is None:
                raise ValueError("MODEL.CLCLIP.DRIFT.PRIOR_WEIGHTED needs the cost-volume prior of "
                                 "MultiExpertRoIHeads (COST_VOLUME.ENABLED) in a continual task")
            old = prior[:, :task.start].amax(dim=1, keepdim=True)
            loss = weighted_feature_drift(outputs["backbone"]["features"], teacher.features(), old)
        elif self.mode == "feature":
            loss = feature_drift(outputs["backbone"]["features"], teacher.features())
        else:
            loss = param_drift(model.backbone, teacher.parameters())
        return {"loss_drift": self.weight * loss}
