"""SE-VPR (SECA): visual class prototypes refined by the text embeddings' inter-class relations, mixed
with the text classifier (docs/methods.md, SemanticPrototypeHead)."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from ..context import HeadContext
from .build import CLS_HEAD_REGISTRY
from ..roi_statistics import all_reduce_sum, ground_truth_embeddings
from .text_classifier import TextClassifier

__all__ = ["SemanticPrototypeHead", "refine_prototypes"]


def refine_prototypes(projected_text: Tensor, prototypes: Tensor, available: Tensor) -> Tensor:
    """p~_c = sum_j softmax_j(-||W t_c - W t_j||^2 / (2 sqrt(D))) p_j over the classes j that have a
    prototype. projected_text: K x D' (= W t), prototypes: K x D, available: K bool."""
    D = prototypes.shape[1]
    diff = projected_text[:, None, :] - projected_text[None, :, :]
    logits = -diff.pow(2).sum(-1) / (2.0 * math.sqrt(D))
    relations = logits.masked_fill(~available[None, :], float("-inf")).softmax(dim=1)
    return relations @ prototypes


@CLS_HEAD_REGISTRY.register()
class SemanticPrototypeHead(TextClassifier):
    """logit_c = tau * ((1 - w) cos(x, t_c) + w cos(x, p~_c)) for classes with a visual prototype
    (w = `proto_weight`, 0.5), tau * cos(x, t_c) for classes without one and for background.

    Prototypes p_c are means of L2-normalised RoI embeddings: an exponential moving average over
    the positive RoIs while training (`momentum`; 1 = off), replaced after each task by the exact
    mean over the task's ground-truth boxes (`on_task_data`). p~ refines them with relations from
    the text embeddings through a learned projection W (initialised to s·I with relations starting
    as softmax(-||t_c - t_j||^2 / init_temperature)). While later tasks train, `anchor_weight` ·
    mean_old (1 - cos(p~_c, p_c)) keeps the old classes' refined prototypes in place."""

    # the EMA of `update_prototypes`, combined over processes by the trainer (utils/comm.py)
    training_statistics = {"proto_counts": "sum", "prototypes": "weighted:proto_counts"}

    @configurable
    def __init__(self, *, embed_dim: int, proto_weight: float = 0.5, momentum: float = 0.99,
                 init_temperature: float = 0.1, anchor_weight: float = 1.0, temperature: float = 50.0,
                 learn_temperature: bool = True, learn_background: bool = False):
        super().__init__(embed_dim=embed_dim, temperature=temperature, learn_temperature=learn_temperature,
                         learn_background=learn_background)
        if not 0.0 <= proto_weight <= 1.0 or not 0.0 <= momentum <= 1.0 or init_temperature <= 0:
            raise ValueError(f"MODEL.SEVPR: PROTO_WEIGHT ({proto_weight}) and MOMENTUM ({momentum}) must be in [0, 1], "
                             f"INIT_TEMPERATURE ({init_temperature}) > 0")
        self.embed_dim = embed_dim
        self.proto_weight, self.momentum, self.anchor_weight = proto_weight, momentum, anchor_weight
        self.relation = nn.Linear(embed_dim, embed_dim, bias=False)  # W
        with torch.no_grad():
            self.relation.weight.copy_(torch.eye(embed_dim) * math.sqrt(2.0 * math.sqrt(embed_dim) / init_temperature))
        self.register_buffer("prototypes", torch.zeros(0, embed_dim))  # K x D visual prototypes
        self.register_buffer("proto_counts", torch.zeros(0))  # K, embeddings behind each prototype (0 = none yet)

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> Dict[str, Any]:
        s = cfg.MODEL.SEVPR
        return {**super().from_config(cfg, embed_dim), "proto_weight": s.PROTO_WEIGHT, "momentum": s.MOMENTUM,
                "init_temperature": s.INIT_TEMPERATURE, "anchor_weight": s.ANCHOR_WEIGHT}

    # -- prototypes ---------------------------------------------------------------------------------
    def _grow(self, num_classes: int) -> None:
        extra = num_classes - int(self.prototypes.shape[0])
        if extra > 0:
            self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(extra, self.embed_dim)])
            self.proto_counts = torch.cat([self.proto_counts, self.proto_counts.new_zeros(extra)])

    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Prototype slots for the task's seen classes (empty for the new ones)."""
        self._grow(task.stop)

    @torch.no_grad()
    def on_task_data(self, task: Any, model: nn.Module, loader: Iterable) -> None:
        """The task's prototypes become the exact means over its ground-truth boxes."""
        self.set_prototypes(torch.arange(task.start, task.stop), ground_truth_embeddings(model, loader))

    @torch.no_grad()
    def set_prototypes(self, classes: Tensor, batches: Iterable[Tuple[Tensor, Tensor]]) -> None:
        """Prototypes of `classes` = mean of the normalised embeddings of (embeddings, labels) batches
        (summed over processes); a class without embeddings keeps its prototype."""
        self._grow(int(classes.max()) + 1)
        dev = self.prototypes.device
        classes = classes.to(dev)
        n = torch.zeros(len(classes), dtype=torch.float64, device=dev)
        s = torch.zeros(len(classes), self.embed_dim, dtype=torch.float64, device=dev)
        pos = torch.full((self.prototypes.shape[0],), -1, dtype=torch.long, device=dev)
        pos[classes] = torch.arange(len(classes), device=dev)
        for emb, lab in batches:
            lab = lab.to(dev)
            inside = (lab >= 0) & (lab < len(pos))
            p = pos[lab[inside]]
            emb = F.normalize(emb[inside].to(s), dim=-1)[p >= 0]
            p = p[p >= 0]
            n.index_add_(0, p, torch.ones_like(p, dtype=n.dtype))
            s.index_add_(0, p, emb)
        all_reduce_sum(n, s)
        found = n > 0
        self.prototypes[classes[found]] = (s[found] / n[found, None]).to(self.prototypes)
        self.proto_counts[classes[found]] = n[found].to(self.proto_counts)

    def _available(self, K: int) -> Tuple[Tensor, Tensor]:
        """A copy of the prototypes (K x D, zeros where missing) and which exist, for K classes."""
        stored = min(K, int(self.prototypes.shape[0]))
        protos = self.prototypes.new_zeros(K, self.embed_dim)
        protos[:stored] = self.prototypes[:stored]
        has = torch.zeros(K, dtype=torch.bool, device=protos.device)
        has[:stored] = self.proto_counts[:stored] > 0
        return protos, has

    def refined(self, text: Tensor, protos: Tensor, has: Tensor) -> Tensor:
        """p~ (K x D) for the vocabulary's text embeddings."""
        return refine_prototypes(self.relation(text), protos, has)

    @torch.no_grad()
    def update_prototypes(self, x: Tensor, labels: Tensor, num_classes: int) -> None:
        """EMA of the prototypes of the positive RoIs' classes (the first sighting sets it)."""
        if self.momentum >= 1.0:
            return
        fg = (labels >= 0) & (labels < min(num_classes, int(self.prototypes.shape[0])))
        if not bool(fg.any()):
            return
        lab, emb = labels[fg], F.normalize(x[fg].float(), dim=-1)
        K = int(self.prototypes.shape[0])
        n = torch.zeros(K, device=emb.device).index_add_(0, lab, torch.ones_like(lab, dtype=emb.dtype))
        s = torch.zeros(K, self.embed_dim, device=emb.device).index_add_(0, lab, emb)
        seen = n > 0
        batch_mean = s[seen] / n[seen, None]
        old = self.prototypes[seen]
        m = torch.where(self.proto_counts[seen] > 0, self.momentum, 0.0)[:, None].to(old)
        # in place (the forward graph holds a copy, see `_available`; DDP broadcasts these tensors)
        self.prototypes[seen] = m * old + (1 - m) * batch_mean.to(old)
        self.proto_counts[seen] += n[seen].to(self.proto_counts)

    # -- classification -----------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: HeadContext, rois: Optional[list] = None) -> Tensor:
        K = ctx.num_classes
        cos = self.cosine(x, ctx)  # R x (K+1)
        protos, has = self._available(K)
        if not bool(has.any()):
            return self.scale() * cos
        proto_cos = F.normalize(x, dim=-1) @ F.normalize(self.refined(ctx.class_embeddings, protos, has), dim=-1).t()
        w = self.proto_weight
        mixed = torch.where(has[None, :], (1 - w) * cos[:, :K] + w * proto_cos, cos[:, :K])
        return self.scale() * torch.cat([mixed, cos[:, K:]], dim=1)

    def losses(self, logits: Tensor, labels: Tensor, x: Tensor, ctx: HeadContext) -> Dict[str, Tensor]:
        out = super().losses(logits, labels, x, ctx)
        if not self.training:
            return out
        K = ctx.num_classes
        protos, has = self._available(K)
        old = has.clone()
        old[(ctx.task.start if ctx.task is not None else 0):] = False
        if self.anchor_weight > 0 and bool(old.any()):
            p_ref = self.refined(ctx.class_embeddings, protos, has)
            out["loss_proto_anchor"] = self.anchor_weight * (1 - F.cosine_similarity(p_ref[old], protos[old], dim=-1)).mean()
        else:
            out["loss_proto_anchor"] = self.relation.weight.sum() * 0.0
        self.update_prototypes(x.detach(), labels, K)
        return out
