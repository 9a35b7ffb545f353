"""CONTINUAL_LOSS_REGISTRY: extra training terms (drift, orthogonality, distillation, ...)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from ...config import ConfigError
from ...utils.registry import Registry, lookup

__all__ = ["CONTINUAL_LOSS_REGISTRY", "ContinualLoss", "build_continual_losses", "teacher_pyramid",
           "check_loss_names", "merge_losses"]

CONTINUAL_LOSS_REGISTRY = Registry("CONTINUAL_LOSS")
CONTINUAL_LOSS_REGISTRY.__doc__ = """Continual losses: (cfg) -> ContinualLoss."""


class ContinualLoss(nn.Module):
    """A training term computed from the model's outputs on the batch (and, if `needs_teacher`,
    the previous task's frozen model). Returns a dict of named, already weighted losses."""

    needs_teacher: bool = False
    loss_names: Tuple[str, ...] = ()  # every key forward may return (checked against the model's other losses)

    def forward(self, model: nn.Module, outputs: Dict[str, Any], batched_inputs: List[Dict[str, Any]],
                teacher: Optional[nn.Module]) -> Dict[str, Tensor]:  # pragma: no cover
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


def teacher_pyramid(teacher: nn.Module, outputs: Dict[str, Any]) -> Dict[str, Tensor]:
    """The teacher's FPN levels on the batch, from the student's (shared, frozen) CLIP taps;
    computed once per batch and kept in `outputs`."""
    if "teacher_features" not in outputs:
        with torch.no_grad():
            outputs["teacher_features"] = teacher.backbone.pyramid_features(outputs["backbone"]["taps"])
    return outputs["teacher_features"]
