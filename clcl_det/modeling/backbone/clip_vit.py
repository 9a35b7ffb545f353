"""Frozen CLIP ViT -> simple feature pyramid -> FPN (F-ViT), plus the dense CLIP map V."""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, List, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.convnext import LayerNorm2d
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from ..clip.dense import build_dense_encoder
from .build import BACKBONE_REGISTRY
from .feature_cache import FrozenFeatureCache

__all__ = ["SimplePyramid", "CLIPViTBackbone", "get_norm"]


def get_norm(norm: str, channels: int) -> nn.Module:
    """LN (channels-last LayerNorm on NCHW), GN (32 groups or fewer), or none."""
    if norm == "LN":
        return LayerNorm2d(channels)
    if norm == "GN":
        return nn.GroupNorm(math.gcd(32, channels), channels)
    if norm in ("", "none"):
        return nn.Identity()
    raise ValueError(f"unknown norm '{norm}' (LN | GN | none)")


class SimplePyramid(nn.Module):
    """One tap per scale factor: 4 = two 2x2 transposed convs (norm, GELU between), 2 = one,
    1 = identity, 0.5 / 0.25 = 2x / 4x max-pool. F-ViT uses (4, 2, 1, 0.5)."""

    def __init__(self, width: int, scales: Sequence[float] = (4.0, 2.0, 1.0, 0.5), norm: str = "LN"):
        super().__init__()
        stages = []
        for s in scales:
            if s == 4:
                stages.append(nn.Sequential(
                    nn.ConvTranspose2d(width, width, 2, stride=2), get_norm(norm, width), nn.GELU(),
                    nn.ConvTranspose2d(width, width, 2, stride=2)))
            elif s == 2:
                stages.append(nn.ConvTranspose2d(width, width, 2, stride=2))
            elif s == 1:
                stages.append(nn.Identity())
            elif s in (0.5, 0.25):
                stages.append(nn.MaxPool2d(int(1 / s)))
            else:
                raise ValueError(f"MODEL.BACKBONE.SCALES: scale {s} is not one of 4, 2, 1, 0.5, 0.25")
        self.stages = nn.ModuleList(stages)

    def forward(self, taps: List[Tensor]) -> List[Tensor]:
        return [stage(t) for stage, t in zip(self.stages, taps)]


@BACKBONE_REGISTRY.register()
class CLIPViTBackbone(nn.Module):
    """F-ViT backbone. The CLIP visual tower is frozen and held outside the module tree (not in
    `parameters()`, `state_dict()` or DDP); the pyramid and FPN train.

    forward(images) -> {"taps": [4 token maps], "clip_dense": V (B x D x h x w),
                        "features": OrderedDict(p<k>: FPN level of stride 2^k, ..., incl. a max-pool level)}
    """

    def __init__(self, cfg: Any, clip_model: nn.Module):
        super().__init__()
        encoder = build_dense_encoder(clip_model.visual, cfg.MODEL.CLIP.TAP_INDICES).eval()  # ViT or EVA
        object.__setattr__(self, "encoder", encoder)  # frozen, outside the module tree
        mb = cfg.MODEL.CLIP.FEATURE_CACHE_MB
        self.feature_cache = FrozenFeatureCache(mb * 2**20) if mb > 0 else None
        p = encoder.patch_size
        scales = tuple(cfg.MODEL.BACKBONE.SCALES)
        if len(scales) != len(encoder.tap_indices) or list(scales) != sorted(scales, reverse=True):
            raise ValueError(f"MODEL.BACKBONE.SCALES {scales} must give one decreasing scale per CLIP tap "
                             f"({len(encoder.tap_indices)} taps)")
        if any(p / s != int(p / s) for s in scales):
            raise ValueError(f"MODEL.BACKBONE.SCALES {scales} give fractional strides for CLIP patch size {p}")
        self.strides = [int(p / s) for s in scales] + [int(2 * p / scales[-1])]
        self.level_names = [f"p{int(math.log2(s))}" for s in self.strides]
        self.out_channels = cfg.MODEL.FPN.OUT_CHANNELS
        self.embed_dim = encoder.embed_dim
        self.clip_stride = p
        self.pyramid = SimplePyramid(encoder.width, scales, cfg.MODEL.BACKBONE.NORM)
        fpn_norm = None if cfg.MODEL.FPN.NORM in ("", "none") else (
            lambda c: get_norm(cfg.MODEL.FPN.NORM, c))
        self.fpn = FeaturePyramidNetwork([encoder.width] * 4, self.out_channels,
                                         extra_blocks=LastLevelMaxPool(), norm_layer=fpn_norm)

    @property
    def size_divisibility(self) -> int:
        return self.strides[-1]

    def encode(self, images: Tensor):
        """Frozen CLIP pass: (taps, dense map V), from the feature cache for images seen before."""
        with torch.no_grad():
            if self.feature_cache is None:
                return self.encoder(images)
            return self.feature_cache(self.encoder, images)

    def pyramid_features(self, taps: List[Tensor]) -> "OrderedDict[str, Tensor]":
        """Trainable part: taps -> FPN levels keyed p<k>."""
        maps = self.pyramid(taps)
        out = self.fpn(OrderedDict((str(i), m) for i, m in enumerate(maps)))
        return OrderedDict(zip(self.level_names, out.values()))

    def forward(self, images: Tensor) -> Dict[str, Any]:
        taps, dense = self.encode(images)
        return {"taps": taps, "clip_dense": dense, "features": self.pyramid_features(taps)}
