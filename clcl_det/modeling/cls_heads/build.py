"""CLS_HEAD_REGISTRY, the base class of classification heads, and the builder."""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...utils.registry import Registry, lookup
from ..context import HeadContext
from ..continual_module import ContinualModule
from ..roi_statistics import clip_region_features

__all__ = ["CLS_HEAD_REGISTRY", "ClsHead", "build_cls_head", "unbiased_cross_entropy", "clip_region_features"]

CLS_HEAD_REGISTRY = Registry("CLS_HEAD")
CLS_HEAD_REGISTRY.__doc__ = """Classification heads: (cfg, embed_dim) -> ClsHead mapping RoI embeddings to
logits over [vocabulary classes..., background]."""


def unbiased_cross_entropy(logits: Tensor, labels: Tensor, num_old: int = 0) -> Tensor:
    """Cross-entropy over [classes..., background] in which the background label (K) is met by
    background *or* any of the first `num_old` classes: -log(p_bg + sum_{k<num_old} p_k)
    (MMA's unbiased loss: an unlabelled old object is not taught as background).
    `num_old` 0 is the plain cross-entropy."""
    if num_old <= 0:
        return F.cross_entropy(logits, labels)
    bg = logits.shape[1] - 1
    target = logits.gather(1, labels[:, None]).squeeze(1)
    absorbed = torch.cat([logits[:, :num_old], logits[:, bg:]], dim=1).logsumexp(dim=1)
    target = torch.where(labels == bg, absorbed, target)
    return (logits.logsumexp(dim=1) - target).mean()


class ClsHead(ContinualModule):
    """Base class: `forward(x, ctx, rois)` gives logits R x (K+1), background last; `losses`
    gives the classification loss (cross-entropy, unbiased for background when
    `ctx.background_absorbs` > 0; label -1 is ignored).

    Feature replay (`GaussianReplay`) asks the head which space its statistics live in
    (`replay_space`: "box" = the box-head output that enters the RoI head's trainable `embed`
    layer, "clip" = the frozen CLIP region feature) and how replayed features are classified
    (`replay_logits`)."""

    replay_space: str = "box"

    def forward(self, x: Tensor, ctx: HeadContext, rois: Optional[list] = None) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def losses(self, logits: Tensor, labels: Tensor, x: Tensor, ctx: HeadContext) -> Dict[str, Tensor]:
        valid = labels >= 0
        if not bool(valid.any()):
            return {"loss_cls": logits.sum() * 0.0}
        return {"loss_cls": unbiased_cross_entropy(logits[valid], labels[valid], ctx.background_absorbs)}

    def replay_logits(self, feats: Tensor, ctx: HeadContext, embed: Optional[nn.Module]) -> Tensor:
        """Logits R x (K+1) of replayed features of `replay_space` ("box": through the RoI head's
        trainable `embed` layer, then this head)."""
        return self(embed(feats) if embed is not None else feats, ctx, None)


def build_cls_head(cfg: Any, embed_dim: int) -> ClsHead:
    """The classification head named by MODEL.CLS_HEAD.NAME."""
    return lookup(CLS_HEAD_REGISTRY, cfg.MODEL.CLS_HEAD.NAME, "MODEL.CLS_HEAD.NAME")(cfg, embed_dim)
