"""CL-CLIP's FPN drift regularisation: keep the pyramid close to the previous task's."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Union

import torch
from torch import Tensor, nn

from ...config import configurable
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss, LossInputs, TeacherOutputs

__all__ = ["FPNDrift", "feature_drift", "param_drift"]


def feature_drift(student: Dict[str, Tensor], teacher: Dict[str, Tensor]) -> Tensor:
    """mean over levels l of the mean squared difference ||P_l - P_l^{t-1}||^2."""
    return torch.stack([(student[k] - teacher[k]).pow(2).mean() for k in student]).mean()


def param_drift(student: nn.Module, teacher: Union[nn.Module, Dict[str, Tensor]]) -> Tensor:
    """sum ||theta - theta^{t-1}||^2 over the parameters of a module and the same-named
    parameters of the teacher (a module of the same structure, or its parameters by name)."""
    t = dict(teacher.named_parameters()) if isinstance(teacher, nn.Module) else teacher
    return sum((p - t[n].detach()).pow(2).sum() for n, p in student.named_parameters())


@CONTINUAL_LOSS_REGISTRY.register()
class FPNDrift(ContinualLoss):
    """L_drift on the simple pyramid + FPN, from task 2 on (MODEL.CLCLIP.DRIFT)."""

    needs_teacher = True
    loss_names = ("loss_drift",)

    @configurable
    def __init__(self, *, mode: str = "feature", weight: float = 1.0):
        super().__init__()
        if mode not in ("feature", "param"):
            raise ValueError(f"MODEL.CLCLIP.DRIFT.MODE '{mode}' is not one of feature | param")
        self.mode, self.weight = mode, weight

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        return {"mode": cfg.MODEL.CLCLIP.DRIFT.MODE, "weight": cfg.MODEL.CLCLIP.DRIFT.WEIGHT}

    def forward(self, model: nn.Module, outputs: LossInputs, batched_inputs: List[Dict[str, Any]],
                teacher: Optional[TeacherOutputs]) -> Dict[str, Tensor]:
        if teacher is None or self.weight == 0:
            return {}
        if self.mode == "feature":
            loss = feature_drift(outputs["backbone"]["features"], teacher.features())
        else:
            loss = param_drift(model.backbone, teacher.parameters())
        return {"loss_drift": self.weight * loss}
