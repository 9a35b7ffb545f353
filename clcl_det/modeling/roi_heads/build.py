"""ROI_HEADS_REGISTRY and its builder."""
from typing import Any, Sequence

from torch import nn

from ...utils.registry import Registry, lookup

ROI_HEADS_REGISTRY = Registry("ROI_HEADS")
ROI_HEADS_REGISTRY.__doc__ = """RoI heads: (cfg, in_channels=, level_names=, embed_dim=) -> module."""


def build_roi_heads(cfg: Any, in_channels: int, level_names: Sequence[str], embed_dim: int) -> nn.Module:
    """The RoI head named by MODEL.ROI_HEADS.NAME."""
    cls = lookup(ROI_HEADS_REGISTRY, cfg.MODEL.ROI_HEADS.NAME, "MODEL.ROI_HEADS.NAME")
    return cls(cfg, in_channels=in_channels, level_names=level_names, embed_dim=embed_dim)
