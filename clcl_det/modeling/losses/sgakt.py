"""SG-AKT (SECA): distillation from a pool of frozen snapshots of the trainable feature path,
aggregated per RoI by a learned, text-queried attention over the snapshots' features."""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from ..continual_module import LifeCycleOptOut
from .build import CONTINUAL_LOSS_REGISTRY, ContinualLoss, LossInputs, TeacherOutputs

__all__ = ["SGAKTDistill", "SnapshotAggregator", "FeaturePathSnapshot", "sgakt_kl"]


class _SnapshotPool(LifeCycleOptOut, nn.ModuleList):
    """The pool of frozen snapshots; takes no part in the life cycle (no growth, no statistics)."""


class FeaturePathSnapshot(LifeCycleOptOut, nn.Module):
    """A frozen copy of the trainable feature path: simple pyramid + FPN (the backbone without its
    frozen CLIP encoder, which copies share), RoI pooler, box head and embedding layer.
    `train()` leaves it in eval mode; it takes no part in the life cycle."""

    def __init__(self, model: nn.Module):
        super().__init__()
        encoder = getattr(model.backbone, "encoder", None)
        memo = {id(encoder): encoder} if encoder is not None else {}
        self.backbone = copy.deepcopy(model.backbone, memo)
        heads = model.roi_heads
        self.pooler = copy.deepcopy(heads.pooler)
        self.box_head = copy.deepcopy(heads.box_head)
        self.embed = copy.deepcopy(heads.embed)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeaturePathSnapshot":
        return super().train(False)

    @torch.no_grad()
    def embeddings(self, taps: List[Tensor], rois: List[Tensor], image_sizes: List[Tuple[int, int]]) -> Tensor:
        """This snapshot's RoI embeddings (R x D) of `rois` on the frozen CLIP taps."""
        feats = self.backbone.pyramid_features(taps)
        return self.embed(self.box_head(self.pooler(feats, rois, image_sizes)))


class SnapshotAggregator(nn.Module):
    """SECA's IntermAggregation for one query per RoI: q = W_q LN_q(query), k_p = W_k LN_k(V_p),
    R = softmax_p(q . k_p / sqrt(D)), o = LN_post(sum_p R_p LN_k(V_p)) (the values are the
    normalised snapshot features, as in SECA's code)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln_q, self.ln_k, self.ln_post = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q_proj = nn.Linear(dim, dim, bias=False)  # W_q
        self.k_proj = nn.Linear(dim, dim, bias=False)  # W_k
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, query: Tensor, values: Tensor) -> Tuple[Tensor, Tensor]:
        """query R x D, values R x P x D -> (o R x D, relevance R x P)."""
        q = self.q_proj(self.ln_q(query))
        v = self.ln_k(values)
        k = self.k_proj(v)
        rel = (torch.einsum("rd,rpd->rp", q, k) * self.scale).softmax(dim=1)
        return self.ln_post(torch.einsum("rp,rpd->rd", rel, v)), rel


def sgakt_kl(student: Tensor, teacher: Tensor, text: Tensor, temperature: float) -> Tensor:
    """mean_r KL(softmax(T cos(teacher_r, t)) || softmax(T cos(student_r, t))), teacher detached,
    no T^2 factor (SECA's KLDivergenceLoss)."""
    t = F.normalize(text, dim=-1)
    p = temperature * F.normalize(teacher.detach(), dim=-1) @ t.t()
    q = temperature * F.normalize(student, dim=-1) @ t.t()
    return F.kl_div(q.log_softmax(dim=1), p.log_softmax(dim=1), reduction="batchmean", log_target=True)


@CONTINUAL_LOSS_REGISTRY.register()
class SGAKTDistill(ContinualLoss):
    """At the start of task t > 1 a frozen `FeaturePathSnapshot` of the model (as trained up to task
    t-1) joins a pool of at most `pool_size`; when full, the snapshot with the lowest accumulated
    relevance (EMA `momentum` of the batch-mean relevance over the previous task; ties: the oldest)
    is replaced. Snapshots are registered (saved with the model); a resumed run rebuilds the pool
    by replaying `begin_task` before loading the checkpoint.

    For each positive RoI of the current task's classes, the snapshots' embeddings of the same RoI
    are aggregated by `SnapshotAggregator` queried with the RoI's label text embedding.
    `loss_sgakt_agg` = CE(agg_scale * cos(o, t_c) over the current task's classes) trains the
    aggregator; `loss_sgakt` = weight * task index * `sgakt_kl`(z_r, o) over the current task's
    classes at `temperature` (20)."""

    loss_names = ("loss_sgakt", "loss_sgakt_agg")
    # the relevance EMA is updated inside forward: the trainer combines every process's update,
    # weighted by the positive RoIs each process averaged over (utils/comm.py)
    training_statistics = {"relevance_rois": "sum", "accumulated": "weighted:relevance_rois"}

    @configurable
    def __init__(self, *, temperature: float = 20.0, weight: float = 1.0, pool_size: int = 5, momentum: float = 0.5,
                 agg_weight: float = 1.0, agg_scale: float = 50.0):
        super().__init__()
        if temperature <= 0 or pool_size < 1 or not 0.0 <= momentum <= 1.0 or agg_scale <= 0:
            raise ValueError(f"MODEL.SGAKT: TEMPERATURE ({temperature}) and AGG_SCALE ({agg_scale}) must be > 0, "
                             f"POOL_SIZE ({pool_size}) >= 1, MOMENTUM ({momentum}) in [0, 1]")
        self.temperature, self.weight, self.pool_size, self.momentum = temperature, weight, pool_size, momentum
        self.agg_weight, self.agg_scale = agg_weight, agg_scale
        self.snapshots = _SnapshotPool()
        self.aggregator: Optional[SnapshotAggregator] = None
        self.register_buffer("accumulated", torch.zeros(0))  # per snapshot: EMA of its mean relevance
        self.register_buffer("last_task", torch.tensor(-1))  # the task whose start took the last snapshot
        self.register_buffer("relevance_rois", torch.zeros(()))  # positive RoIs the EMA has averaged over

    @classmethod
    def from_config(cls, cfg: Any) -> Dict[str, Any]:
        s = cfg.MODEL.SGAKT
        return {"temperature": s.TEMPERATURE, "weight": s.WEIGHT, "pool_size": s.POOL_SIZE, "momentum": s.MOMENTUM,
                "agg_weight": s.AGG_WEIGHT, "agg_scale": s.AGG_SCALE}

    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Create the aggregator (first task); snapshot the feature path entering task t > 0 (once)."""
        if self.aggregator is None:
            self.aggregator = SnapshotAggregator(model.backbone.embed_dim).to(self.accumulated.device)
        if task.index == 0 or task.index <= int(self.last_task):
            return
        snap = FeaturePathSnapshot(model)
        if len(self.snapshots) < self.pool_size:
            self.snapshots.append(snap)
        else:  # evict the least relevant (argmin returns the first, i.e. the oldest, on ties)
            self.snapshots[int(self.accumulated.argmin())] = snap
        self.accumulated = torch.full((len(self.snapshots),), 1.0 / self.pool_size, device=self.accumulated.device)
        self.last_task.fill_(task.index)

    def snapshot_embeddings(self, taps: List[Tensor], rois: List[Tensor], image_sizes: List[Tuple[int, int]]) -> Tensor:
        """Every snapshot's embedding of the RoIs: R x P x D."""
        return torch.stack([s.embeddings(taps, rois, image_sizes) for s in self.snapshots], dim=1)

    def forward(self, model: nn.Module, outputs: LossInputs, batched_inputs: List[Dict[str, Any]],
                teacher: Optional[TeacherOutputs]) -> Dict[str, Tensor]:
        roi, ctx = outputs.roi, outputs.ctx
        z = roi["embeddings"]
        zero = z.sum() * 0.0
        task = ctx.task
        if not len(self.snapshots) or task is None or task.index == 0 or z.shape[0] == 0 or self.aggregator is None:
            return {"loss_sgakt": zero, "loss_sgakt_agg": zero}
        start, stop = task.start, min(task.stop, ctx.num_classes)
        labels = roi["labels"]
        pos = (labels >= start) & (labels < stop)
        if not bool(pos.any()):
            return {"loss_sgakt": zero, "loss_sgakt_agg": zero + sum(p.sum() for p in self.aggregator.parameters()) * 0}
        counts = [len(r) for r in roi["rois"]]
        pos_rois = [r[m] for r, m in zip(roi["rois"], pos.split(counts))]
        values = self.snapshot_embeddings(outputs.backbone["taps"], pos_rois, ctx.image_sizes)
        text = ctx.class_embeddings
        o, rel = self.aggregator(text[labels[pos]], values)
        current = text[start:stop]
        agg_logits = self.agg_scale * F.normalize(o, dim=-1) @ F.normalize(current, dim=-1).t()
        loss_agg = F.cross_entropy(agg_logits, labels[pos] - start)
        kl = sgakt_kl(z[pos], o, current, self.temperature)
        with torch.no_grad():
            m = self.momentum
            self.accumulated.mul_(m).add_((1 - m) * rel.mean(dim=0).to(self.accumulated))
            self.relevance_rois.add_(rel.shape[0])
        return {"loss_sgakt": self.weight * task.index * kl, "loss_sgakt_agg": self.agg_weight * loss_agg}
