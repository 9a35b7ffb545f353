"""F-ViT's classifier: tau * cos(x, t_k) over the vocabulary's text embeddings and background."""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...config import configurable
from ..context import HeadContext
from .build import CLS_HEAD_REGISTRY, ClsHead

__all__ = ["TextClassifier"]


@CLS_HEAD_REGISTRY.register()
class TextClassifier(ClsHead):
    """Cosine classifier against frozen prompt-ensembled text embeddings; learned scale tau and
    (optionally) a learned background embedding initialised from the background prompt."""

    @configurable
    def __init__(self, *, embed_dim: int, temperature: float = 50.0, learn_temperature: bool = True,
                 learn_background: bool = False):
        super().__init__()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(temperature)), requires_grad=learn_temperature)
        self.learn_background = learn_background
        if learn_background:
            self.background = nn.Parameter(torch.zeros(embed_dim))
            self.register_buffer("background_initialised", torch.tensor(False))

    @classmethod
    def from_config(cls, cfg: Any, embed_dim: int) -> Dict[str, Any]:
        h = cfg.MODEL.CLS_HEAD
        return {"embed_dim": embed_dim, "temperature": h.TEMPERATURE, "learn_temperature": h.LEARN_TEMPERATURE,
                "learn_background": h.LEARN_BACKGROUND}

    def scale(self) -> Tensor:
        return self.logit_scale.exp().clamp(max=100.0)

    def background_embedding(self, ctx: HeadContext) -> Tensor:
        if not self.learn_background:
            return ctx.background_embedding
        if not bool(self.background_initialised):
            with torch.no_grad():
                self.background.copy_(ctx.background_embedding)
                self.background_initialised.fill_(True)
        return F.normalize(self.background, dim=0)

    def cosine(self, x: Tensor, ctx: HeadContext) -> Tensor:
        """cos(x, [t_1..t_K, t_bg]): R x (K+1)."""
        x = F.normalize(x, dim=-1)
        weights = torch.cat([ctx.class_embeddings, self.background_embedding(ctx)[None]], dim=0)
        return x @ weights.t()

    def forward(self, x: Tensor, ctx: HeadContext, rois: Optional[list] = None) -> Tensor:
        return self.scale() * self.cosine(x, ctx)
