"""META_ARCH_REGISTRY and `build_model`."""
from typing import Any

import torch
from torch import nn

from ...utils.registry import Registry, lookup

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = """Meta-architectures: (cfg) -> detector."""


def resolve_device(name: str) -> torch.device:
    """MODEL.DEVICE: auto (cuda if available) | cpu | cuda[:i]."""
    from ...config import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"MODEL.DEVICE '{name}' is not a device: auto | cpu | cuda[:i]") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"MODEL.DEVICE '{name}': no CUDA GPU is available to this torch "
                              f"({torch.__version__}); use MODEL.DEVICE cpu (or auto)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"MODEL.DEVICE '{name}': only {n} CUDA GPU(s) are available")
    return dev


def build_model(cfg: Any) -> nn.Module:
    """The detector named by MODEL.META_ARCHITECTURE, on MODEL.DEVICE."""
    device = resolve_device(cfg.MODEL.DEVICE)  # before building: a wrong device fails fast
    model = lookup(META_ARCH_REGISTRY, cfg.MODEL.META_ARCHITECTURE, "MODEL.META_ARCHITECTURE")(cfg)
    return model.to(device)
