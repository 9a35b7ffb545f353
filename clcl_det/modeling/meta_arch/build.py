"""META_ARCH_REGISTRY and `build_model`."""
from typing import Any

from torch import nn

from ...utils.device import resolve_device
from ...utils.registry import Registry, lookup

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """Meta-architectures: (cfg) -> detector."""


def build_model(cfg: Any) -> nn.Module:
    """The detector named by MODEL.META_ARCHITECTURE, on MODEL.DEVICE."""
    device = resolve_device(cfg.MODEL.DEVICE)  # before building: a wrong device fails fast
    model = lookup(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")(cfg)
    return model.to(device)
