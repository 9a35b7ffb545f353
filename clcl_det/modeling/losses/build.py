"""CONTINUAL_LOSS_REGISTRY: extra training terms (drift, orthogonality, distillation, ...), the
typed inputs they receive and the declared interface through which they see the teacher."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple, runtime_checkable

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...utils.registry import Registry, lookup
from ..context import HeadContext
from ..continual_module import ContinualModule

__all__ = ["CONTINUAL_LOSS_REGISTRY", "ContinualLoss", "build_continual_losses", "LossInputs", "Teacher",
           "TeacherOutputs", "check_loss_names", "merge_losses"]

CONTINUAL_LOSS_REGISTRY = Registry("CONTINUAL_LOSS")
CONTINUAL_LOSS_REGISTRY.__doc__ = """Continual losses: (cfg) -> ContinualLoss."""


@dataclass
class LossInputs:
    """What the detector computed on a training batch, handed to every continual loss.
    Fields are also readable as `inputs["roi"]` (the untyped dict of earlier versions)."""

    backbone: Dict[str, Any]  # the backbone's outputs: features (FPN levels), taps (CLIP blocks), clip_dense
    ctx: HeadContext  # the heads' per-batch context (vocabulary, dense CLIP map, task)
    rpn: Dict[str, List[Tensor]]  # raw RPN outputs per level: objectness B x A x H x W, deltas B x 4A x H x W
    roi: Dict[str, Any]  # the RoI head's training outputs: rois, labels, logits, embeddings (+ head extras)
    images: Any = None  # the padded ImageList
    proposals: List[Tensor] = field(default_factory=list)  # RPN proposals per image
    targets: List[Dict[str, Tensor]] = field(default_factory=list)  # ground truth per image: boxes, labels

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@runtime_checkable
class Teacher(Protocol):
    """What a meta-architecture offers as the previous task's frozen model. Losses never read a
    teacher's attributes; they call these (through `TeacherOutputs`)."""

    def teacher_features(self, taps: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Its FPN levels from the (shared, frozen) CLIP taps of the batch."""

    def teacher_rpn(self, features: Dict[str, Tensor]) -> Tuple[List[Tensor], List[Tensor]]:
        """Its RPN objectness and deltas per level on those features."""

    def teacher_roi_logits(self, features: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Tensor:
        """Its classification logits (R x (K_old + 1), background last) on the given RoIs."""

    def teacher_roi_outputs(self, features: Dict[str, Tensor], rois: List[Tensor], ctx: HeadContext) -> Dict[str, Tensor]:
        """Its RoI head's outputs on the given RoIs: logits (R x (K_old + 1)), box deltas, embeddings."""

    def teacher_proposals(self, images: Any, features: Dict[str, Tensor]) -> List[Tensor]:
        """Its own proposals per image (inference mode: after NMS, by decreasing objectness)."""

    def teacher_parameters(self) -> Dict[str, Tensor]:
        """Its trainable backbone parameters by name (what parameter drift compares)."""


class TeacherOutputs:
    """The teacher's outputs on one batch, computed on demand and once (no gradient)."""

    def __init__(self, teacher: Teacher, inputs: LossInputs):
        if not isinstance(teacher, Teacher):
            raise TypeError(f"{type(teacher).__name__} does not implement the Teacher interface "
                            f"(clcl_det.modeling.losses.build.Teacher)")
        self._teacher, self._inputs = teacher, inputs
        self._features: Optional[Dict[str, Tensor]] = None
        self._rpn: Optional[Tuple[List[Tensor], List[Tensor]]] = None
        self._logits: Optional[Tensor] = None
        self._proposals: Optional[List[Tensor]] = None

    def features(self) -> Dict[str, Tensor]:
        """The teacher's FPN levels on the batch."""
        if self._features is None:
            with torch.no_grad():
                self._features = self._teacher.teacher_features(self._inputs.backbone["taps"])
        return self._features

    def rpn(self) -> Tuple[List[Tensor], List[Tensor]]:
        """The teacher's RPN objectness and deltas on the batch."""
        if self._rpn is None:
            with torch.no_grad():
                self._rpn = self._teacher.teacher_rpn(self.features())
        return self._rpn

    def roi_logits(self) -> Tensor:
        """The teacher's logits on the student's sampled RoIs (R x (K_old + 1), background last)."""
        if self._logits is None:
            with torch.no_grad():
                self._logits = self._teacher.teacher_roi_logits(self.features(), self._inputs.roi["rois"],
                                                                self._inputs.ctx)
        return self._logits

    def proposals(self) -> List[Tensor]:
        """The teacher's own proposals per image, by decreasing objectness."""
        if self._proposals is None:
            with torch.no_grad():
                self._proposals = self._teacher.teacher_proposals(self._inputs.images, self.features())
        return self._proposals

    def roi_outputs(self, rois: List[Tensor]) -> Dict[str, Tensor]:
        """The teacher's RoI head outputs (logits R x (K_old + 1), deltas, embeddings) on `rois`
        (e.g. its own proposals), not cached."""
        with torch.no_grad():
            return self._teacher.teacher_roi_outputs(self.features(), rois, self._inputs.ctx)

    def parameters(self) -> Dict[str, Tensor]:
        """The teacher's trainable backbone parameters (detached)."""
        return {k: v.detach() for k, v in self._teacher.teacher_parameters().items()}


class ContinualLoss(ContinualModule):
    """A training term computed from the model's outputs on the batch (and, if `needs_teacher`,
    the previous task's frozen model's outputs). Returns a dict of named, already weighted losses."""

    loss_names: Tuple[str, ...] = ()  # every key forward may return (checked against the model's other losses)

    def forward(self, model: nn.Module, outputs: LossInputs, batched_inputs: List[Dict[str, Any]],
                teacher: Optional[TeacherOutputs]) -> Dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError


def build_continual_losses(cfg: Any) -> nn.ModuleList:
    """The losses named in MODEL.CONTINUAL_LOSSES."""
    return nn.ModuleList(
        lookup(CONTINUAL_LOSS_REGISTRY, n, "MODEL.CONTINUAL_LOSSES")(cfg) for n in cfg.MODEL.CONTINUAL_LOSSES
    )


def _describe(path: str, module: nn.Module) -> str:
    return f"{type(module).__name__} ({path or 'the model'})"


def check_loss_names(model: nn.Module) -> None:
    """Refuse two modules of `model` that declare the same loss name (`loss_names`): a dict update
    would silently keep one of them. The error names both modules."""
    owner: Dict[str, Tuple[str, nn.Module]] = {}
    for path, m in model.named_modules():
        for name in getattr(type(m), "loss_names", ()) or ():
            if name in owner and owner[name][1] is not m:
                raise ConfigError(f"loss '{name}' is returned by both {_describe(*owner[name])} and "
                                  f"{_describe(path, m)}; one would silently replace the other (check MODEL.CONTINUAL_LOSSES)")
            owner.setdefault(name, (path, m))


def merge_losses(losses: Dict[str, Tensor], new: Dict[str, Tensor], source: str) -> None:
    """losses.update(new), refusing a name already present (the run-time twin of check_loss_names,
    for losses no module declares)."""
    clash = sorted(set(losses) & set(new))
    if clash:
        raise ConfigError(f"loss(es) {clash} of {source} are already returned by another module of the model; "
                          f"one would silently replace the other")
    losses.update(new)
