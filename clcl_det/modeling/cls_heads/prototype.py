"""SE-VPR (SECA): visual class prototypes from frozen CLIP region features, refined by the text
embeddings' inter-class relations, mixed with the text classifier."""
from __future__ import annotations

import math
from typing import Any, Dict, Iterable, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from ...utils import comm
from ..context import HeadContext
from ..roi_statistics import all_reduce_sum, clip_region_features, ground_truth_features
from .build import CLS_HEAD_REGISTRY
from .text_classifier import TextClassifier

__all__ = ["SemanticPrototypeHead", "PrototypeRefinement"]


class PrototypeRefinement(nn.Module):
    """c^ = normalise(LN_post(A . LN_v(c))), A = row-softmax(-||LN_t(t_k) H - LN_t(t_j) H||^2 / gamma)
    over the classes j that have a prototype; H a learned Linear(D, D, bias=False), gamma = 2 sqrt(D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.ln_text, self.ln_visual, self.ln_post = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, dim, bias=False)  # H
        self.gamma = 2.0 * math.sqrt(dim)

    def relations(self, text: Tensor, available: Tensor) -> Tensor:
        """A (K x K): row k's weights over the prototypes of the classes j with `available`[j]."""
        z = self.proj(self.ln_text(text))
        d2 = torch.cdist(z, z).pow(2)
        return (-d2 / self.gamma).masked_fill(~available[None, :], float("-inf")).softmax(dim=1)

    def forward(self, text: Tensor, prototypes: Tensor, available: Tensor) -> Tensor:
        mixed = self.relations(text, available) @ self.ln_visual(prototypes)
        return F.normalize(self.ln_post(mixed), dim=-1)


@CLS_HEAD_REGISTRY.register()
class SemanticPrototypeHead(TextClassifier):
    """logit_c = tau * ((1 - w) cos(z, t_c) + w cos(z, c^_c)) for classes with a prototype
    (w = `proto_weight`), tau * cos(z, t_c) for the others and for background.

    Raw prototypes c_k are means of the L2-normalised frozen CLIP region features of class k's
    ground-truth boxes: exact at the end of its task (`on_task_data`); during that task, the
    running mean over the positive RoIs seen so far (also frozen CLIP features; the loop gives
    the task's data only after training). Once exact they never change. Refinement: see
    `PrototypeRefinement`. Training adds `loss_proto` = CE(tau cos(z_r, c^) over the current
    task's classes) on the RoIs of those classes and, from task 2 on, `loss_proto_reg` = mean over
    old classes of 1 - cos(c^_k stored at the end of its task, c^_k now)."""

    # The running sums of `accumulate` are updated inside `losses` with every process's RoIs (summed
    # there, before `loss_proto` reads them), so every process holds the same values: they need no
    # `training_statistics` rule (utils/comm.py), which would count the other processes twice.
    loss_names = ("loss_proto", "loss_proto_reg")

    @configurable
    def __init__(self, *, embed_dim: int, proto_weight: float = 0.5, proto_loss_weight: float = 1.0,
                 reg_weight: float = 1.0, temperature: float = 50.0, learn_temperature: bool = True,
                 learn_background: bool = False):
        super().__init__(embed_dim=embed_dim, temperature=temperature, learn_temperature=learn_temperature,
                         learn_background=learn_background)
        if not 0.0 <= proto_weight <= 1.0 or proto_loss_weight < 0 or reg_weight < 0:
            raise ValueError(f"MODEL.SEVPR: PROTO_WEIGHT ({proto_weight}) must be in [0, 1], PROTO_LOSS_WEIGHT "
                             f"({proto_loss_weight}) and REG_WEIGHT ({reg_weight}) >= 0")
        self.embed_dim = embed_dim
        self.proto_weight, self.proto_loss_weight, self.reg_weight = proto_weight, proto_loss_weight, reg_weight
        self.refine = PrototypeRefinement(embed_dim)
        self.register_buffer("prototypes", torch.zeros(0, embed_dim))  # K x D raw prototypes c_k (normalised)
        self.register_buffer("proto_counts", torch.zeros(0))  # K, boxes / RoIs behind each (0 = none yet)
        self.register_buffer("proto_final", torch.zeros(0, dtype=torch.bool))  # K, exact (never updated again)
        self.register_buffer("proto_sums", torch.zeros(0, embed_dim))  # K x D running sums while not final
        self.register_buffer("refined_stored", torch.zeros(0, embed_dim))  # K x D c^_k at the end of its task
        self.register_buffer("refined_has", torch.zeros(0, dtype=torch.bool))  # K, c^_k stored
        self._region: Optional[Tensor] = None  # frozen CLIP features of the last training forward's RoIs

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> Dict[str, Any]:
        s = cfg.MODEL.SEVPR
        return {**super().from_config(cfg, embed_dim), "proto_weight": s.PROTO_WEIGHT,
                "proto_loss_weight": s.PROTO_LOSS_WEIGHT, "reg_weight": s.REG_WEIGHT}

    # -- prototypes ---------------------------------------------------------------------------------
    def _grow(self, num_classes: int) -> None:
        extra = num_classes - int(self.prototypes.shape[0])
        if extra > 0:
            for name in ("prototypes", "proto_counts", "proto_final", "proto_sums", "refined_stored", "refined_has"):
                t = getattr(self, name)
                setattr(self, name, torch.cat([t, t.new_zeros((extra,) + tuple(t.shape[1:]))]))

    def on_task_start(self, task: Any, model: nn.Module) -> None:
        """Prototype slots for the task's seen classes (empty for the new ones)."""
        self._grow(task.stop)

    @torch.no_grad()
    def on_task_data(self, task: Any, model: nn.Module, loader: Iterable) -> None:
        """The task's prototypes become the exact means over its ground-truth boxes' frozen CLIP
        features; then the refined prototypes of the task's classes are stored."""
        classes = torch.arange(task.start, task.stop)
        self.set_prototypes(classes, ground_truth_features(model, loader, "clip"))
        self.store_refined(model.class_embeddings, classes)

    @torch.no_grad()
    def set_prototypes(self, classes: Tensor, batches: Iterable[Tuple[Tensor, Tensor]]) -> None:
        """Exact prototypes of `classes` = mean of the normalised features of (features, labels)
        batches (summed over processes); a class without features keeps what it had."""
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
        c = classes[found]
        self.prototypes[c] = F.normalize(s[found] / n[found, None], dim=-1).to(self.prototypes)
        self.proto_counts[c] = n[found].to(self.proto_counts)
        self.proto_final[c] = True

    @torch.no_grad()
    def store_refined(self, text: Tensor, classes: Tensor) -> None:
        """Keep c^ of `classes` (refined with the vocabulary `text`) as their reference from now on."""
        K = min(int(text.shape[0]), int(self.prototypes.shape[0]))
        protos, has = self._available(K)
        if not bool(has.any()):
            return
        ref = self.refine(text[:K].to(protos), protos, has)
        classes = classes.to(has.device)
        classes = classes[(classes < K)]
        classes = classes[has[classes]]
        self.refined_stored[classes] = ref[classes].to(self.refined_stored)
        self.refined_has[classes] = True

    @torch.no_grad()
    def accumulate(self, region: Tensor, labels: Tensor) -> None:
        """Running means of the positive RoIs' frozen CLIP features, for classes not final yet, over
        the RoIs of every process (every process calls this in each training step)."""
        K = int(self.prototypes.shape[0])
        if K == 0:
            return
        # masks as 0/1 weights instead of boolean indexing: no host sync (adding 0.0 leaves sums exact)
        lab = labels.clamp(0, K - 1)
        fg = ((labels >= 0) & (labels < K) & ~self.proto_final[lab]).to(self.proto_sums.dtype)
        ds = torch.zeros_like(self.proto_sums).index_add_(0, lab, region.to(self.proto_sums) * fg[:, None])
        dn = torch.zeros_like(self.proto_counts).index_add_(0, lab, fg.to(self.proto_counts.dtype))
        all_reduce_sum(ds, dn)  # every process's RoIs (a no-op in one process; called on every process)
        self.proto_sums += ds
        self.proto_counts += dn
        upd = (self.proto_counts > 0) & ~self.proto_final
        self.prototypes.copy_(torch.where(upd[:, None], F.normalize(self.proto_sums, dim=-1).to(self.prototypes),
                                          self.prototypes))

    def _available(self, K: int) -> Tuple[Tensor, Tensor]:
        """A copy of the raw prototypes (K x D, zeros where missing) and which exist, for K classes."""
        stored = min(K, int(self.prototypes.shape[0]))
        protos = self.prototypes.new_zeros(K, self.embed_dim)
        protos[:stored] = self.prototypes[:stored]
        has = torch.zeros(K, dtype=torch.bool, device=protos.device)
        has[:stored] = self.proto_counts[:stored] > 0
        return protos, has

    def refined(self, ctx: HeadContext) -> Tuple[Tensor, Tensor]:
        """c^ (K x D) for the vocabulary of ctx and which classes have one."""
        protos, has = self._available(ctx.num_classes)
        if not bool(has.any()):
            return protos, has
        return self.refine(ctx.class_embeddings, protos, has), has

    # -- classification -----------------------------------------------------------------------------
    def forward(self, x: Tensor, ctx: HeadContext, rois: Optional[list] = None) -> Tensor:
        K = ctx.num_classes
        if self.training and rois is not None:
            self._region = clip_region_features(ctx.clip_dense, rois, ctx.clip_stride)
        cos = self.cosine(x, ctx)  # R x (K+1)
        ref, has = self.refined(ctx)
        if not bool(has.any()):
            return self.scale() * cos
        proto_cos = F.normalize(x, dim=-1) @ ref.t()
        w = self.proto_weight
        mixed = torch.where(has[None, :], (1 - w) * cos[:, :K] + w * proto_cos, cos[:, :K])
        return self.scale() * torch.cat([mixed, cos[:, K:]], dim=1)

    def losses(self, logits: Tensor, labels: Tensor, x: Tensor, ctx: HeadContext) -> Dict[str, Tensor]:
        out = super().losses(logits, labels, x, ctx)
        if not self.training:
            return out
        region, self._region = self._region, None
        if region is not None and region.shape[0] == labels.shape[0]:
            self.accumulate(region, labels)
        K = ctx.num_classes
        start = ctx.task.start if ctx.task is not None else 0
        ref, has = self.refined(ctx)
        zero = sum(p.sum() for p in self.refine.parameters()) * 0.0
        cols = torch.nonzero(has[start:K]).squeeze(1) + start  # current classes with a prototype
        col = torch.full((K + 1,), -1, dtype=torch.long, device=labels.device)
        col[cols] = torch.arange(len(cols), device=labels.device)
        target = col[labels.clamp(0, K)]
        rows = (labels >= 0) & (target >= 0)
        # mean over the rows of every process: DDP's average of the per-process losses is then the
        # loss of the whole batch, as in one process (the rows per process differ)
        n_rows = rows.sum().to(self.proto_sums.dtype)
        all_reduce_sum(n_rows)
        n_rows = n_rows / comm.get_world_size()
        if self.proto_loss_weight > 0 and bool(rows.any()):
            proto_logits = self.scale() * F.normalize(x[rows], dim=-1) @ ref[cols].t()
            out["loss_proto"] = self.proto_loss_weight * F.cross_entropy(proto_logits, target[rows],
                                                                         reduction="sum") / n_rows
        else:
            out["loss_proto"] = zero
        stored = min(start, int(self.refined_has.shape[0]))
        old = torch.zeros(K, dtype=torch.bool, device=has.device)
        old[:stored] = self.refined_has[:stored]
        old &= has
        if self.reg_weight > 0 and bool(old.any()):
            cos = F.cosine_similarity(self.refined_stored[:K][old], ref[old], dim=-1)
            out["loss_proto_reg"] = self.reg_weight * (1.0 - cos).mean()
        else:
            out["loss_proto_reg"] = zero
        return out
