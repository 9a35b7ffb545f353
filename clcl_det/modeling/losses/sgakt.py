"""SG-AKT (SECA): distillation from snapshots of the earlier tasks' RoI heads, each weighted per RoI by
the text relevance of its classes to the RoI's label (docs/methods.md, SG-AKT)."""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from ..continual_module import LifeCycleOptOut
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss

__all__ = ["SGAKTDistill", "snapshot_relevance"]

RELEVANCE_MODES = ("max", "mean")


class _FrozenSnapshots(LifeCycleOptOut, nn.ModuleList):
    """Frozen copies; `train()` leaves them in eval mode; they take no part in the life cycle
    (no growth, no statistics)."""

    def train(self, mode: bool = True) -> "_FrozenSnapshots":
        return super().train(False)


def snapshot_relevance(query: Tensor, class_text: Tensor, ranges: Sequence[Tuple[int, int]],
                       temperature: float, mode: str = "max") -> Tensor:
    """Per query (R x D text embedding, or a row of NaN for "no label") the softmax over snapshots
    of the relevance of snapshot j's classes [a_j, b_j) to the query: max (or mean) over those
    classes of cos(query, t_c), divided by `temperature`. Rows of NaN get uniform weights. R x S."""
    sim = query.nan_to_num(0.0) @ class_text.t()  # R x K_old (text embeddings are L2-normalised)
    cols = []
    for a, b in ranges:
        part = sim[:, a:b]
        cols.append(part.amax(dim=1) if mode == "max" else part.mean(dim=1))
    weights = (torch.stack(cols, dim=1) / temperature).softmax(dim=1)
    no_label = query.isnan().any(dim=1)
    return torch.where(no_label[:, None], torch.full_like(weights, 1.0 / len(ranges)), weights)


def _restrict_vocabulary(ctx: Any, k: int) -> Any:
    """A copy of a HeadContext scoring only its first k classes (names too, where it carries them).
    Its `extras` start empty: cached per-batch tensors there (e.g. CL-CLIP's prior, normalised over
    the whole vocabulary) depend on the vocabulary and are recomputed by the heads that need them."""
    changes: Dict[str, Any] = {"class_embeddings": ctx.class_embeddings[:k], "extras": {}}
    if getattr(ctx, "class_names", None) is not None:
        changes["class_names"] = ctx.class_names[:k]
    if ctx.get("class_names") is not None:
        changes["extras"]["class_names"] = ctx.extras["class_names"][:k]
    return dataclasses.replace(ctx, **changes)


@CONTINUAL_LOSS_REGISTRY.register()
class SGAKTDistill(ContinualLoss):
    """At the start of task t a frozen copy of the RoI head (as trained up to task t-1) is kept; the
    copies are registered (saved with the model) and created from whatever weights the head has,
    so a resumed run rebuilds them by replaying `begin_task` before loading the checkpoint.

    For each training RoI, snapshot j (trained on classes [0, b_j), new in it [a_j, b_j)) is
    weighted by `snapshot_relevance` of its new classes to the RoI's label text embedding
    (uniform for background / ignored RoIs). The teacher logit of an old class c is the weighted
    mean over the snapshots that had learned c (weights renormalised per class; background: all
    snapshots). `loss_sgakt` = weight · task index · T² · KL(softmax(teacher/T) || softmax(student/T))
    over [old classes, background], T = 20, mean over RoIs (T² is Hinton's gradient scaling)."""

    loss_names = ("loss_sgakt",)

    @configurable
    def __init__(self, *, temperature: float = 20.0, weight: float = 1.0, attention_temperature: float = 0.1,
                 relevance: str = "max"):
        super().__init__()
        if relevance not in RELEVANCE_MODES:
            raise ValueError(f"MODEL.SGAKT.RELEVANCE '{relevance}' is not one of {' | '.join(RELEVANCE_MODES)}")
        if temperature <= 0 or attention_temperature <= 0:
            raise ValueError(f"MODEL.SGAKT: TEMPERATURE ({temperature}) and ATTENTION_TEMPERATURE "
                             f"({attention_temperature}) must be > 0")
        self.temperature, self.weight = temperature, weight
        self.attention_temperature, self.relevance = attention_temperature, relevance
        self.snapshots = _FrozenSnapshots()
        self.ranges: List[Tuple[int, int]] = []  # classes each snapshot learned in its own task

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        s = cfg.MODEL.SGAKT
        return {"temperature": s.TEMPERATURE, "weight": s.WEIGHT, "attention_temperature": s.ATTENTION_TEMPERATURE,
                "relevance": s.RELEVANCE}

    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Snapshot the RoI head as it enters task t > 0 (once per task)."""
        last = self.ranges[-1][1] if self.ranges else 0
        if task.index == 0 or task.start <= last:
            return
        snap = copy.deepcopy(model.roi_heads)
        snap.requires_grad_(False)
        self.snapshots.append(snap)
        self.ranges.append((last, task.start))

    def teacher_logits(self, features: Dict[str, Tensor], rois: List[Tensor], ctx: Any, labels: Tensor) -> Tensor:
        """Relevance-weighted snapshot logits over [old classes, background] (R x (start + 1))."""
        start = self.ranges[-1][1]
        text = ctx.class_embeddings
        fg = (labels >= 0) & (labels < ctx.num_classes)
        query = torch.full((len(labels), text.shape[1]), float("nan"), device=text.device, dtype=text.dtype)
        query[fg] = text[labels[fg]]
        w = snapshot_relevance(query, text[:start], self.ranges, self.attention_temperature, self.relevance)
        num = text.new_zeros(len(labels), start + 1)
        den = text.new_zeros(len(labels), start + 1)
        for j, (snap, (_, b)) in enumerate(zip(self.snapshots, self.ranges)):
            ctx_j = _restrict_vocabulary(ctx, b)
            logits = snap.predict(snap.pool(features, rois, ctx.image_sizes), rois, ctx_j)["logits"]
            wj = w[:, j:j + 1]
            num[:, :b] += wj * logits[:, :b]
            den[:, :b] += wj
            num[:, start] += wj[:, 0] * logits[:, b]
            den[:, start] += wj[:, 0]
        return num / den.clamp_min(1e-12)

    def forward(self, model: nn.Module, outputs: Dict[str, Any], batched_inputs: List[Dict[str, Any]],
                teacher: Optional[nn.Module]) -> Dict[str, Tensor]:
        roi, ctx = outputs["roi"], outputs["ctx"]
        student = roi["logits"]
        task = ctx.task
        if not self.snapshots or task is None or task.index == 0 or self.weight == 0 or student.shape[0] == 0:
            return {"loss_sgakt": student.sum() * 0.0}
        start, K = self.ranges[-1][1], ctx.num_classes
        with torch.no_grad():
            target = self.teacher_logits(outputs["backbone"]["features"], roi["rois"], ctx, roi["labels"])
        s = torch.cat([student[:, :start], student[:, K:K + 1]], dim=1)
        T = self.temperature
        kl = F.kl_div(F.log_softmax(s / T, dim=1), F.log_softmax(target / T, dim=1), reduction="batchmean",
                      log_target=True)
        return {"loss_sgakt": self.weight * task.index * T * T * kl}
