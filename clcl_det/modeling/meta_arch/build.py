"""META_ARCH_REGISTRY and `build_model`."""
from typing import Any

import torch
from torch import nn

from ...utils.registry import Registry, lookup

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """Meta-architectures: (cfg) -> detector."""


def resolve_device(name: str) -> torch.device:
    """MODEL.DEVICE: auto (cuda if available) | cpu | cuda[:i]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_model(cfg: Any) -> nn.Module:
    """The detector named by MODEL.META_ARCHITECTURE, on MODEL.DEVICE."""
    model = lookup(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")(cfg)
    return model.to(resolve_device(cfg.MODEL.DEVICE))
