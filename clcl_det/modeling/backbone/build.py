"""BACKBONE_REGISTRY and its builder."""
from typing import Any

from torch import nn

from ...utils.registry import Registry, lookup

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = """Backbones: (cfg, clip_model) -> module returning FPN features and the dense CLIP map."""


def build_backbone(cfg: Any, clip_model: nn.Module) -> nn.Module:
    """The backbone named by MODEL.BACKBONE.NAME."""
    return lookup(BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME, "MODEL.BACKBONE.NAME")(cfg, clip_model)
