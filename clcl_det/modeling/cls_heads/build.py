"""CLS_HEAD_REGISTRY, the base class of classification heads, and the builder."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch.nn.functional as F
from torch import Tensor, nn

from ...utils.registry import Registry, lookup
from ..context import HeadContext

__all__ = ["CLS_HEAD_REGISTRY", "ClsHead", "build_cls_head"]

CLS_HEAD_REGISTRY = Registry("CLS_HEAD")
CLS_HEAD_REGISTRY.__doc__ = """Classification heads: (cfg, embed_dim) -> ClsHead mapping RoI embeddings to
logits over [vocabulary classes..., background]."""


class ClsHead(nn.Module):
    """Base class: `forward(x, ctx, rois)` gives logits R x (K+1), background last; `losses`
    gives the classification loss (cross-entropy; label -1 is ignored)."""

    def forward(self, x: Tensor, ctx: HeadContext, rois: Optional[list] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def losses(self, logits: Tensor, labels: Tensor, x: Tensor, ctx: HeadContext) -> Dict[str, Tensor]:
        valid = labels >= 0
        if not bool(valid.any()):
            return {"loss_cls": logits.sum() * 0.0}
        return {"loss_cls": F.cross_entropy(logits[valid], labels[valid])}


def build_cls_head(cfg: Any, embed_dim: int) -> ClsHead:
    """The classification head named by MODEL.CLS_HEAD.NAME."""
    return lookup(CLS_HEAD_REGISTRY, cfg.MODEL.CLS_HEAD.NAME, "MODEL.CLS_HEAD.NAME")(cfg, embed_dim)
