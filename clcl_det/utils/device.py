"""MODEL.DEVICE resolution, shared by the detector and the tiny-CLIP recipe."""
import torch

__all__ = ["resolve_device"]


def resolve_device(name: str) -> torch.device:
    """MODEL.DEVICE: auto (cuda if available) | cpu | cuda[:i]."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
